"""What both example apps share: the users table, its encrypted columns, demo data.

The sensitive columns are aiocrypt's SQLAlchemy column types
(``EncryptedDecimal``, ``EncryptedString``): the table holds tokens bound to
``users.<column>``, the application reads and writes plain values.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aiocrypt import (
    ConfigurationError,
    EncryptionConfig,
    EncryptionService,
    KeyType,
    build_key_manager,
)
from aiocrypt.integrations.sqlalchemy import EncryptedDecimal, EncryptedString

__all__ = [
    "DEMO_PASSWORD",
    "USER_FIELDS",
    "ReportMaker",
    "User",
    "UserRepository",
    "build_service",
    "default_config",
    "jsonable",
    "new_csrf_token",
    "prepare_data_dir",
    "tokens_match",
]

USER_FIELDS: Final = {  # column -> key type
    "income": KeyType.FINANCIAL_DATA,
    "savings": KeyType.FINANCIAL_DATA,
    "ssn": KeyType.PII,
}
DEMO_PASSWORD: Final = "correct horse battery staple"  # noqa: S105 (demo users only)
DEMO_USERS: Final = (
    ("alice", Decimal("85000.00"), Decimal("12000.50"), "123-45-6789"),
    ("bob", Decimal("52000.00"), Decimal("3100.00"), "987-65-4321"),
)


def users_table(service: EncryptionService) -> sa.Table:
    """The users table, its sensitive columns encrypted with ``service``'s keys."""
    encrypted = {"income": EncryptedDecimal, "savings": EncryptedDecimal, "ssn": EncryptedString}
    return sa.Table(
        "users",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("username", sa.String(64), unique=True, nullable=False),
        sa.Column("password_hash", sa.String(200), nullable=False),
        *(
            sa.Column(name, encrypted[name](key_type, service=service), nullable=False)
            for name, key_type in USER_FIELDS.items()
        ),
    )


def default_config() -> dict[str, Any]:
    """App config of the examples (``EXAMPLE_*`` keys are the examples' own)."""
    return {
        "EXAMPLE_DATA_DIR": os.environ.get("EXAMPLE_DATA_DIR"),  # None: a fresh temp dir
        "REPORT_CACHE_TTL": 60,
        "AIOCRYPT_REDIS_URL": os.environ.get("AIOCRYPT_REDIS_URL", "redis://127.0.0.1:6379/0"),
        "AIOCRYPT_SESSION_PREFIX": "example:session:",
        "AIOCRYPT_CACHE_PREFIX": "example:cache:",
        # The frameworks' own cookie keys, read by the extensions. Served over plain
        # HTTP on localhost here: set SESSION_COOKIE_SECURE=true behind HTTPS.
        "SESSION_COOKIE_SECURE": os.environ.get("SESSION_COOKIE_SECURE", "false"),
        "SESSION_COOKIE_SAMESITE": "Lax",
        "SESSION_COOKIE_HTTPONLY": True,
        "PERMANENT_SESSION_LIFETIME": 3600,  # idle timeout of sessions (Redis TTL)
        # The default, spelled out: pages that read a logged-in session are never
        # stored by the browser, so the back button after logout shows nothing.
        "AIOCRYPT_SESSION_CACHE_CONTROL": "private, no-store",
    }


def prepare_data_dir(configured: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """(directory for keys and the database, whether it is a temp dir made here)."""
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path, False
    return Path(tempfile.mkdtemp(prefix="aiocrypt-example-")), True


def build_service(data_dir: Path) -> EncryptionService:
    """A service over a file key store in ``data_dir``.

    The master key comes from ENCRYPTION_MASTER_KEY; without it a random one is
    made for this run only (never printed), which cannot reopen an existing
    key file.
    """
    key_file = data_dir / "keys.json"
    master_key = os.environ.get("ENCRYPTION_MASTER_KEY")
    if not master_key:
        if key_file.exists():
            raise ConfigurationError(
                f"{key_file} exists: set ENCRYPTION_MASTER_KEY to the "
                "master key it was created with, or use a new directory"
            )
        master_key = base64.b64encode(os.urandom(32)).decode("ascii")
    config = EncryptionConfig(master_key=master_key, storage_path=str(key_file))
    return EncryptionService(build_key_manager(config))


def database_engine(data_dir: Path) -> AsyncEngine:
    return create_async_engine(f"sqlite+aiosqlite:///{data_dir / 'app.db'}")


# -- passwords and CSRF tokens ---------------------------------------------------

_SCRYPT: Final = {"n": 2**14, "r": 8, "p": 1}


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, **_SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    _, salt, digest = stored.split("$")
    candidate = hashlib.scrypt(password.encode("utf-8"), salt=bytes.fromhex(salt), **_SCRYPT)
    return hmac.compare_digest(candidate, bytes.fromhex(digest))


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def tokens_match(expected: object, given: object) -> bool:
    return (
        isinstance(expected, str)
        and isinstance(given, str)
        and hmac.compare_digest(expected.encode(), given.encode())
    )


# -- users ---------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    id: int
    username: str
    income: Decimal = field(repr=False)
    savings: Decimal = field(repr=False)
    ssn: str = field(repr=False)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "username": self.username,
            "income": str(self.income),
            "savings": str(self.savings),
            "ssn": "***-**-" + self.ssn[-4:],
        }


class UserRepository:
    """Users in SQLite; the ``USER_FIELDS`` columns are encrypted."""

    def __init__(self, engine: AsyncEngine, service: EncryptionService) -> None:
        self.engine = engine
        self.service = service
        self.users = users_table(service)

    async def create_schema(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(self.users.metadata.create_all)

    async def add(
        self, username: str, password: str, *, income: Decimal, savings: Decimal, ssn: str
    ) -> int:
        password_hash = await asyncio.to_thread(hash_password, password)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                self.users.insert().values(
                    username=username,
                    password_hash=password_hash,
                    income=income,
                    savings=savings,
                    ssn=ssn,
                )
            )
        primary_key = result.inserted_primary_key
        assert primary_key is not None
        return int(primary_key[0])

    @staticmethod
    def _user(row: sa.Row[Any]) -> User:
        return User(
            id=row.id, username=row.username, income=row.income, savings=row.savings, ssn=row.ssn
        )

    async def get(self, user_id: int) -> User | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(self.users.select().where(self.users.c.id == user_id))
            ).first()
        return None if row is None else self._user(row)

    async def authenticate(self, username: str, password: str) -> User | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(self.users.select().where(self.users.c.username == username))
            ).first()
        stored = row.password_hash if row is not None else hash_password(password)  # same cost
        if not await asyncio.to_thread(verify_password, password, stored) or row is None:
            return None
        return self._user(row)

    async def seed_demo_users(self) -> None:
        await self.create_schema()
        async with self.engine.connect() as conn:
            existing = set((await conn.execute(sa.select(self.users.c.username))).scalars())
        for username, income, savings, ssn in DEMO_USERS:
            if username not in existing:
                await self.add(username, DEMO_PASSWORD, income=income, savings=savings, ssn=ssn)


class ReportMaker:
    """A deliberately "expensive" report; ``computations`` counts real computations."""

    def __init__(self) -> None:
        self.computations = 0

    async def compute(self, user: User) -> dict[str, Any]:
        self.computations += 1
        await asyncio.sleep(0.01)  # stands in for real work
        monthly = user.income / 12
        return {
            "username": user.username,
            "annual_income": user.income,
            "savings": user.savings,
            "savings_rate": (user.savings / user.income).quantize(Decimal("0.0001")),
            "months_of_runway": (user.savings / monthly).quantize(Decimal("0.1")),
            "ssn_last4": user.ssn[-4:],
        }


def jsonable(report: dict[str, Any]) -> dict[str, Any]:
    """Decimals as strings (money never goes through float)."""
    return {k: str(v) if isinstance(v, Decimal) else v for k, v in report.items()}
