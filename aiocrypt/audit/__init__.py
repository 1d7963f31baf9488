"""The audit trail: structured key-lifecycle and security events.

Events never carry plaintext or key material: key ids, key types, counts,
reasons. Sinks receive every event:

* ``LoggingAuditSink``: JSON lines on the ``aiocrypt.audit`` logger (the default).
* ``aiocrypt.audit.postgres.PostgresAuditSink``: an append-only, hash-chained
  table whose ``verify()`` detects an edited, inserted or deleted row.

``Auditor`` fans events out to its sinks and turns floods of decryption
failures into one loud ``decrypt_failure_spike`` event instead of thousands of
lines.
"""

from ._auditor import (
    AuditEvent,
    Auditor,
    AuditSink,
    LoggingAuditSink,
    MemoryAuditSink,
)

__all__ = ["AuditEvent", "AuditSink", "Auditor", "LoggingAuditSink", "MemoryAuditSink"]
