"""Key-encryption-key providers: ``KekProvider`` and the local master-key provider.

Cloud providers live in sibling modules behind extras and are imported only
when asked for: ``aiocrypt.kek.aws`` (``aiocrypt[aws]``), ``aiocrypt.kek.vault``
(``[vault]``), ``aiocrypt.kek.azure`` (``[azure]``), ``aiocrypt.kek.gcp`` (``[gcp]``).
"""

from ._base import KekProvider, canonical_context
from .local import LocalKekProvider

__all__ = ["KekProvider", "LocalKekProvider", "canonical_context"]
