"""Example apps: ``python -m examples.quart_app`` and ``python -m examples.flask_app``."""
