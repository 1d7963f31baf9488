"""_format's SQL for the key id of a token, run on the databases it is written for."""

from __future__ import annotations

import sqlite3

import asyncpg

from aiocrypt._format import key_id_sql

TOKENS = {
    "ac2.pii-v3-0a1b2c3d.QUJD": "pii-v3-0a1b2c3d",
    "ac1.financial_data-v1-ffffffff.AAAA": "financial_data-v1-ffffffff",
}


def test_key_id_on_sqlite() -> None:
    conn = sqlite3.connect(":memory:")
    try:
        for token, key_id in TOKENS.items():
            sql = f"SELECT {key_id_sql('t', 'sqlite')} FROM (SELECT ? AS t)"
            assert conn.execute(sql, (token,)).fetchone() == (key_id,)
    finally:
        conn.close()


async def test_key_id_on_postgres(postgres_dsn: str) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        for token, key_id in TOKENS.items():
            sql = f"SELECT {key_id_sql('t')} FROM (SELECT $1::text AS t) AS s"
            assert await conn.fetchval(sql, token) == key_id
    finally:
        await conn.close()
