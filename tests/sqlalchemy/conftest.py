"""Fixtures for the SQLAlchemy integration and the re-encryption engine.

``db_url`` runs a test on SQLite (aiosqlite, a fresh file) and on the real
Postgres (asyncpg); every test names its tables with a unique suffix and drops
them afterwards, so runs can share the database.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aiocrypt import EncryptionService
from aiocrypt.integrations.sqlalchemy import set_encryption_service


@pytest.fixture
def suffix() -> str:
    """A unique table-name suffix for this test."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def pg_async_url(postgres_dsn: str) -> str:
    return postgres_dsn.replace("postgresql://", "postgresql+asyncpg://", 1)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/test.db"
    return str(request.getfixturevalue("pg_async_url"))


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(db_url)
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest.fixture
def bound_service(service: EncryptionService) -> Iterator[EncryptionService]:
    """The started memory service, used by column types declared without ``service=``."""
    set_encryption_service(service)
    try:
        yield service
    finally:
        set_encryption_service(None)
