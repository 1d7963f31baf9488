"""Framework and ORM adapters, importable as ``aiocrypt.integrations.<name>``.

Each adapter depends on aiocrypt's core, never the other way round, and needs
its extra installed (``aiocrypt[sqlalchemy]``, ``[arq]``, ``[quart]``, ``[flask]``).
"""
