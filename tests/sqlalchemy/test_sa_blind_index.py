"""Blind indexes: exact lookups that survive a rotation of the index key."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from aiocrypt import EncryptionService, KeyType
from aiocrypt.integrations.sqlalchemy import (
    BLIND_INDEX_KEY_TYPE,
    BlindIndex,
    EncryptedString,
    blind_index_usage,
    normalize_digits,
    normalize_email,
    rebuild_blind_indexes,
)

SSNS = ["123-45-6789", "987-65-4321", "123-45-6789", "555-12-3456", "123 45 6789"]


def make_models(suffix: str) -> tuple[Any, Any]:
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = f"bi_users_{suffix}"
        id: Mapped[int] = mapped_column(primary_key=True)
        ssn_encrypted: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII))
        ssn_index: Mapped[str | None] = mapped_column(
            BlindIndex("ssn_encrypted", normalizer=normalize_digits), index=True
        )
        email: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII))
        email_index: Mapped[str | None] = mapped_column(
            BlindIndex("email", normalizer=normalize_email, length=12)
        )

    return Base, User


async def test_lookup_before_and_after_index_key_rotation(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    base, user_cls = make_models(suffix)
    async with engine.begin() as conn:
        await conn.run_sync(base.metadata.create_all)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def find(value: str) -> list[int]:
        async with sessions() as session:
            return sorted(
                (
                    await session.execute(
                        sa.select(user_cls.id).where(user_cls.ssn_index.matches(value))
                    )
                ).scalars()
            )

    try:
        async with sessions() as session:
            session.add_all([user_cls(id=i + 1, ssn_encrypted=s) for i, s in enumerate(SSNS)])
            await session.commit()
        assert await find("123-45-6789") == [1, 3, 5]
        assert await find("987654321") == [2]
        assert await find("000-00-0000") == []

        old_key = bound_service.keyring.active(BLIND_INDEX_KEY_TYPE)
        await bound_service.key_manager.rotate_key(BLIND_INDEX_KEY_TYPE, force=True)
        new_key = bound_service.keyring.active(BLIND_INDEX_KEY_TYPE)
        assert new_key.key_id != old_key.key_id
        # Old rows keep their old-version index values and are still found.
        assert await find("123-45-6789") == [1, 3, 5]

        async with sessions() as session:
            session.add(user_cls(id=6, ssn_encrypted="123456789"))
            moved = await session.get(user_cls, 2)
            moved.ssn_encrypted = "123-45-6789"  # type: ignore[union-attr]  # get() is Optional; update re-indexes under the new key
            changed = await session.get(user_cls, 3)
            changed.ssn_encrypted = "111-11-1111"  # type: ignore[union-attr]  # get() is Optional
            await session.commit()
        assert await find("123-45-6789") == [1, 2, 5, 6]
        assert await find("987-65-4321") == []
        assert await find("111111111") == [3]
        async with sessions() as session:
            # == on the index column means the same lookup.
            assert sorted(
                (
                    await session.execute(
                        sa.select(user_cls.id).where(user_cls.ssn_index == "123456789")
                    )
                ).scalars()
            ) == [1, 2, 5, 6]
            # Updating another column leaves the index untouched.
            user = await session.get(user_cls, 1)
            before = user.ssn_index  # type: ignore[union-attr]  # get() is Optional
            user.email = "Ann@Example.org"  # type: ignore[union-attr]  # get() is Optional
            await session.commit()
            assert user.ssn_index == before  # type: ignore[union-attr]  # get() is Optional

        async with engine.connect() as conn:
            rows: dict[int, str] = dict(
                (await conn.execute(sa.text(f"SELECT id, ssn_index FROM bi_users_{suffix}"))).all()
            )
        assert rows[1].startswith(f"{old_key.key.version}:")
        assert rows[6].startswith(f"{new_key.key.version}:")
        assert rows[2].startswith(f"{new_key.key.version}:")
        assert all("6789" not in v for v in rows.values())

        async with sessions() as session:
            assert (
                await session.execute(
                    sa.select(user_cls.id).where(user_cls.email_index.matches(" ann@EXAMPLE.org"))
                )
            ).scalars().all() == [1]

        usage = await blind_index_usage(engine, base.metadata)
        assert usage[old_key.key_id] == 3 and usage[new_key.key_id] == 3 + 1  # ssn + email
        # Rebuild under the new index key; then the old version can go.
        rebuilt = await rebuild_blind_indexes(engine, user_cls.__table__, batch_size=2)
        assert rebuilt == 3  # ssn of ids 1, 4, 5 (2, 3, 6 and the e-mail changed after it)
        async with engine.connect() as conn:
            rows = dict(
                (await conn.execute(sa.text(f"SELECT id, ssn_index FROM bi_users_{suffix}"))).all()
            )
        assert all(v.startswith(f"{new_key.key.version}:") for v in rows.values())
        assert await rebuild_blind_indexes(engine, user_cls.__table__) == 0
        usage = await blind_index_usage(engine, base.metadata)
        assert old_key.key_id not in usage and usage[new_key.key_id] == 6 + 1
        assert await find("123-45-6789") == [1, 2, 5, 6]
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(base.metadata.drop_all)


async def test_core_insert_and_context_separation(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    base, user_cls = make_models(suffix)
    table = user_cls.__table__
    async with engine.begin() as conn:
        await conn.run_sync(base.metadata.create_all)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.insert(table),
                [
                    {
                        "id": 1,
                        "ssn_encrypted": "123-45-6789",
                        "ssn_index": "123-45-6789",
                        "email": "123456789",
                        "email_index": "123456789",
                    }
                ],
            )
        async with engine.connect() as conn:
            assert (
                await conn.execute(
                    sa.select(table.c.id).where(table.c.ssn_index.matches("123456789"))
                )
            ).scalars().all() == [1]
            ssn_index, email_index = (
                await conn.execute(sa.text(f"SELECT ssn_index, email_index FROM bi_users_{suffix}"))
            ).one()
        # Same normalized input, different columns: unrelated index values.
        assert ssn_index.split(":")[1][:16] != email_index.split(":")[1][:16]
        assert len(email_index.split(":")[1]) == 16  # 12 bytes, base64url
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(base.metadata.drop_all)


def test_blind_index_arguments() -> None:
    with pytest.raises(ValueError, match=r"8\.\.32"):
        BlindIndex("ssn", length=4)
    with pytest.raises(TypeError, match="BlindIndex column"):
        from aiocrypt.integrations.sqlalchemy import blind_index_matches

        blind_index_matches(sa.column("x", sa.String()), "v")
