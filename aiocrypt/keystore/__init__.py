"""Key stores: ``KeyStore`` and the file and memory stores.

Redis and Postgres stores live in sibling modules behind extras:
``aiocrypt.keystore.redis`` (``aiocrypt[redis]``), ``aiocrypt.keystore.postgres``
(``aiocrypt[postgres]``).
"""

from ._base import KeySet, KeyStore
from ._subjects_base import SubjectKeyStore
from .file import FileKeyStore
from .memory import MemoryKeyStore

__all__ = ["FileKeyStore", "KeySet", "KeyStore", "MemoryKeyStore", "SubjectKeyStore"]
