"""The re-encryption engine's write step two ways, in CPU time per row (issue 19).

    python bench/bench_copy_vs_unnest.py [--rows 100000] [--batch 2000] [--rounds 2]

``unnest``: what :class:`aiocrypt.reencrypt.AsyncpgDatabase` does, one
``UPDATE ... FROM unnest($1::bigint[], $2::text[], ...)`` per batch (compare-and-swap
on both columns). ``copy``: the batch sent with binary ``COPY`` into a temporary
table (``ON COMMIT DELETE ROWS``), then the same ``UPDATE ... FROM`` that table, in
one transaction. Each round loads a fresh table of two 70-character text columns.

CPU time is read from the client process (``time.process_time``) and from the
server backend (``/proc/<pid>/stat``), so the verdict does not depend on what
else the machine runs; wall time is printed too. On the 2-core machines the two
share the cores, so what counts is their sum.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import time
from typing import Any

import asyncpg

TICKS = os.sysconf("SC_CLK_TCK")
UNNEST = (
    "WITH v AS (SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], "
    "$5::text[]) AS v(pk, o0, n0, o1, n1)), "
    "upd AS (UPDATE bench_copy_t t SET a = CASE WHEN t.a = v.o0 THEN v.n0 ELSE t.a END, "
    "b = CASE WHEN t.b = v.o1 THEN v.n1 ELSE t.b END FROM v "
    "WHERE t.id = v.pk AND (t.a = v.o0 OR t.b = v.o1) RETURNING 1) SELECT count(*) FROM upd"
)
FROM_TEMP = (
    "WITH upd AS (UPDATE bench_copy_t t SET a = CASE WHEN t.a = v.o0 THEN v.n0 ELSE t.a END, "
    "b = CASE WHEN t.b = v.o1 THEN v.n1 ELSE t.b END FROM bench_copy_v v "
    "WHERE t.id = v.pk AND (t.a = v.o0 OR t.b = v.o1) RETURNING 1) SELECT count(*) FROM upd"
)


def backend_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def token() -> str:
    return "ac2.pii-v1." + secrets.token_urlsafe(45)


async def one_round(conn: Any, method: str, rows: int, batch: int) -> dict[str, float]:
    await conn.execute("DROP TABLE IF EXISTS bench_copy_t")
    await conn.execute("CREATE TABLE bench_copy_t (id bigint PRIMARY KEY, a text, b text)")
    old = [(i, token(), token()) for i in range(rows)]
    await conn.copy_records_to_table("bench_copy_t", records=old)
    await conn.execute("VACUUM ANALYZE bench_copy_t")
    new = [(pk, a, token(), b, token()) for pk, a, b in old]
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    client, server, wall = time.process_time(), backend_cpu(pid), time.perf_counter()
    for start in range(0, rows, batch):
        part = new[start : start + batch]
        if method == "unnest":
            columns = [list(c) for c in zip(*part, strict=True)]
            updated = await conn.fetchval(UNNEST, *columns)
        else:
            async with conn.transaction():
                await conn.copy_records_to_table("bench_copy_v", records=part)
                updated = await conn.fetchval(FROM_TEMP)
        assert updated == len(part)
    return {
        "client_us": (time.process_time() - client) / rows * 1e6,
        "server_us": (backend_cpu(pid) - server) / rows * 1e6,
        "wall_us": (time.perf_counter() - wall) / rows * 1e6,
    }


async def run(dsn: str, rows: int, batch: int, rounds: int) -> dict[str, dict[str, float]]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TEMP TABLE bench_copy_v (pk bigint, o0 text, n0 text, "
            "o1 text, n1 text) ON COMMIT DELETE ROWS"
        )
        results: dict[str, list[dict[str, float]]] = {"unnest": [], "copy": []}
        for _ in range(rounds):
            for method in results:
                results[method].append(await one_round(conn, method, rows, batch))
        await conn.execute("DROP TABLE IF EXISTS bench_copy_t")
    finally:
        await conn.close()
    return {
        method: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for method, runs in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get("BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    medians = asyncio.run(run(args.dsn, args.rows, args.batch, args.rounds))
    print(f"{args.rows:,} rows, batches of {args.batch:,}, median of {args.rounds} rounds")
    print("| write | client CPU / row | server CPU / row | sum | wall / row |")
    print("|---|---:|---:|---:|---:|")
    for method, m in medians.items():
        print(
            f"| {method} | {m['client_us']:.2f} us | {m['server_us']:.2f} us | "
            f"{m['client_us'] + m['server_us']:.2f} us | {m['wall_us']:.2f} us |"
        )


if __name__ == "__main__":
    main()
