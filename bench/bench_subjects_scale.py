"""Subject keys at scale: a million subjects in the real PostgreSQL and Redis stores.

    python bench/bench_subjects_scale.py                      # 1,000,000 subjects, both stores
    python bench/bench_subjects_scale.py --store redis --quick   # 50,000 subjects, Redis only
    python bench/bench_subjects_scale.py --subjects 200000 --json out.json

The "Scale" requirement of issue 20 (docs/subjects.md, "At scale"). For each
store, under a schema or prefix of its own that is dropped at the end:

* **insert**: ``--subjects`` PII subject keys made as the service makes them
  (random DEK, wrapped by the active PII version, filed under the subject's
  lookup hash) and filed through the store's bulk path (``insert_many``: one
  ``unnest`` INSERT or one pipeline of the insert script per 10,000), wrapping
  the next batch while the store files the last;
* **lookup**: the key of ``--samples`` random existing subjects, cold (a fresh
  ``KeyManager``, the store read and the unwrap) and warm (cached), p50/p99;
  the first key of new subjects (creation); the cold read of a token's key by
  a process that never saw it (decryption);
* **round trip**: ``encrypt_field`` + ``decrypt_field`` of a known, cached
  subject against a plain field in the same interleaved rounds (the 1.3x bound);
* **forget**: ``forget_subject`` of subjects holding 1 value and 10,000 values
  (their tokens are checked unreadable afterwards);
* **census**: ``subject_census(PII)``, three times;
* **size**: PostgreSQL ``pg_total_relation_size`` of the table (and its parts),
  Redis ``INFO memory`` before and after the insert and ``MEMORY USAGE`` of the
  three structures.

No figure is asserted; the script prints a table and, with ``--json``, writes
the raw figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import machine_info  # noqa: E402

from aiocrypt import DecryptionError, DecryptionFailure, EncryptionService, KeyManager, KeyType  # noqa: E402
from aiocrypt.kek import LocalKekProvider  # noqa: E402
from aiocrypt.keystore.postgres import PostgresKeyStore  # noqa: E402
from aiocrypt.keystore.redis import RedisKeyStore  # noqa: E402

PII = KeyType.PII
CONTEXT = "users.email"
VALUE = "ada.lovelace@example.com"
BATCH = 10_000


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def latency(samples: list[float]) -> dict[str, float]:
    """p50 / p99 / max in microseconds."""
    return {
        "p50_us": pct(samples, 0.50) * 1e6,
        "p99_us": pct(samples, 0.99) * 1e6,
        "max_us": max(samples) * 1e6,
        "n": len(samples),
    }


async def timed(calls: list[Callable[[], Awaitable[Any]]]) -> list[float]:
    took = []
    for call in calls:
        start = time.perf_counter()
        await call()
        took.append(time.perf_counter() - start)
    return took


class Deployment:
    """One store and KEK; each service over it stands for a process started afresh."""

    def __init__(self, kind: str, args: argparse.Namespace) -> None:
        self.kind = kind
        self.kek = LocalKekProvider(os.urandom(32))
        tag = secrets.token_hex(4)
        if kind == "postgres":
            self.where = f"subjects_scale_{tag}"
            self.dsn = args.dsn
        else:
            self.where = f"aiocrypt-subjects-scale-{tag}:"
            self.url = args.redis
        self.opened = contextlib.AsyncExitStack()

    def make_store(self) -> Any:
        if self.kind == "postgres":
            from aiocrypt.keystore.postgres import PostgresKeyStore

            return PostgresKeyStore(self.dsn, schema=self.where)
        from aiocrypt.keystore.redis import RedisKeyStore

        return RedisKeyStore(self.url, prefix=self.where)

    async def service(self) -> EncryptionService:
        """A started service over the store, closed by :meth:`close`."""
        svc = EncryptionService(KeyManager(self.make_store(), self.kek, watch=False))
        self.opened.push_async_callback(svc.close)
        await svc.start()
        return svc

    async def close(self) -> None:
        await self.opened.aclose()

    async def drop(self) -> None:
        store = self.make_store()
        try:
            if self.kind == "redis":  # big structures freed in the background, then the rest
                names = [f"{self.where}subjects:id", f"{self.where}subjects:lookup"]
                async for name in store._redis.scan_iter(match=f"{self.where}subjects:wrap:*"):
                    names.append(name)
                await store._redis.unlink(*names)
            await store.drop()
        finally:
            await store.close()


# -- the measurements ----------------------------------------------------------------


async def insert(
    svc: EncryptionService, n: int, keep: set[int]
) -> tuple[dict[str, Any], dict[int, str]]:
    """``n`` subject keys ``user:0`` .. ``user:n-1`` filed through the bulk path; the key
    ids of the subjects in ``keep``."""
    subjects = svc.key_manager.subjects
    store = await subjects.store()
    kept: dict[int, str] = {}
    wrap_s = 0.0
    filed = 0

    def batch(start: int) -> list[Any]:
        nonlocal wrap_s
        began = time.perf_counter()
        records = []
        for i in range(start, min(n, start + BATCH)):
            # what a first encryption for the subject makes (key_for), filed in bulk
            record = subjects._new_record(PII, subjects.reference(f"user:{i}", PII))
            if i in keep:
                kept[i] = record.key_id
            records.append(record)
        wrap_s += time.perf_counter() - began
        return records

    start = time.perf_counter()
    pending: asyncio.Task[int] | None = None
    for first in range(0, n, BATCH):
        records = batch(first)  # made while the store files the previous batch
        if pending is not None:
            filed += await pending
        pending = asyncio.create_task(store.insert_many(records))
        await asyncio.sleep(0)  # let it send
        if first // BATCH % 10 == 9:
            print(f"  {first + BATCH:>9,} filed, {time.perf_counter() - start:6.1f} s", flush=True)
    if pending is not None:
        filed += await pending
    took = time.perf_counter() - start
    if filed != n:
        raise RuntimeError(f"filed {filed} of {n} subject keys")
    return {"subjects": n, "seconds": took, "per_second": n / took, "wrap_seconds": wrap_s}, kept


async def lookups(
    deployment: Deployment, sample: list[int], kept: dict[int, str]
) -> dict[str, Any]:
    """Cold and warm key lookups of existing subjects, creation of new ones."""
    svc = await deployment.service()  # a fresh process: nothing cached
    subjects = svc.key_manager.subjects
    cold = await timed([partial(subjects.key_for, PII, f"user:{i}") for i in sample])
    for i in sample[:200]:  # the keys found are the ones filed in bulk, and they open
        dk = await subjects.key_for(PII, f"user:{i}")
        if dk.key_id != kept[i]:
            raise RuntimeError("a lookup found another key than the one filed")
    warm = await timed([partial(subjects.key_for, PII, f"user:{i}") for i in sample])
    tag = secrets.token_hex(3)
    new = [f"new:{tag}:{i}" for i in range(len(sample) // 4)]
    created = await timed([partial(subjects.key_for, PII, s) for s in new])

    tokens = [
        await svc.encrypt_field(VALUE, PII, context=CONTEXT, subject=f"user:{i}") for i in sample
    ]
    reader = await deployment.service()  # never saw these keys
    cold_read = await timed(
        [partial(reader.decrypt_field, t, PII, context=CONTEXT) for t in tokens]
    )
    warm_read = await timed(
        [partial(reader.decrypt_field, t, PII, context=CONTEXT) for t in tokens]
    )
    store = await subjects.store()
    raw = await timed([partial(store.find, subjects.reference(f"user:{i}", PII)) for i in sample])
    return {
        "store_find": latency(raw),
        "cold": latency(cold),
        "warm": latency(warm),
        "create": latency(created),
        "cold_decrypt": latency(cold_read),
        "warm_decrypt": latency(warm_read),
    }


async def round_trips(  # noqa: C901 - one timed loop per case (plain, one subject, many), linear
    svc: EncryptionService, known: list[int], rounds: int, seconds: float
) -> dict[str, Any]:
    """Plain and known-subject field round trips, interleaved round by round."""
    names = [f"user:{i}" for i in known]
    for name in names:  # known: cached by this process
        await svc.encrypt_field(VALUE, PII, context=CONTEXT, subject=name)

    async def plain(n: int) -> None:
        for _ in range(n):
            token = await svc.encrypt_field(VALUE, PII, context=CONTEXT)
            await svc.decrypt_field(token, PII, context=CONTEXT)

    async def subject(n: int) -> None:
        for k in range(n):
            token = await svc.encrypt_field(
                VALUE, PII, context=CONTEXT, subject=names[k % len(names)]
            )
            await svc.decrypt_field(token, PII, context=CONTEXT)

    async def one(n: int) -> None:  # one hot subject, as bench/bench_fields.py measures
        for _ in range(n):
            token = await svc.encrypt_field(VALUE, PII, context=CONTEXT, subject=names[0])
            await svc.decrypt_field(token, PII, context=CONTEXT)

    cases = {"plain": plain, "subject": subject, "one": one}
    sizes = {}
    for name, run in cases.items():
        n = 64
        while True:
            start = time.perf_counter()
            await run(n)
            took = time.perf_counter() - start
            if took >= seconds / 4:
                sizes[name] = max(1, int(n * seconds / took))
                break
            n *= 4
    per_op: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, run in cases.items():
            start = time.perf_counter()
            await run(sizes[name])
            per_op[name].append((time.perf_counter() - start) / sizes[name])
    ratios = [s / p for s, p in zip(per_op["subject"], per_op["plain"], strict=True)]
    one_ratios = [s / p for s, p in zip(per_op["one"], per_op["plain"], strict=True)]
    return {
        "plain_us": statistics.median(per_op["plain"]) * 1e6,
        "subject_us": statistics.median(per_op["subject"]) * 1e6,
        "ratio": statistics.median(ratios),
        "best_ratio": min(ratios),
        "one_us": statistics.median(per_op["one"]) * 1e6,
        "one_ratio": statistics.median(one_ratios),
        "known_subjects": len(names),
        "rounds": rounds,
    }


async def forgets(svc: EncryptionService, light: list[int], heavy: list[int]) -> dict[str, Any]:
    """``forget_subject`` of existing subjects holding 1 value (``light``) and 10,000
    values (``heavy``) each, forgotten in turn so that load hits both alike."""
    values = {i: 1 for i in light} | {i: 10_000 for i in heavy}
    last = {}
    for i, n in values.items():
        for k in range(n):
            last[i] = await svc.encrypt_field(
                f"{VALUE} {k}", PII, context=CONTEXT, subject=f"user:{i}"
            )
    order = [i for pair in itertools.zip_longest(light, heavy) for i in pair if i is not None]
    took: dict[int, float] = {}
    for i in order:
        start = time.perf_counter()
        report = await svc.forget_subject(f"user:{i}", key_type=PII, actor="bench")
        took[i] = time.perf_counter() - start
        if len(report.subject_key_ids) != 1:
            raise RuntimeError("a forget destroyed no key")
    for token in last.values():
        try:
            await svc.decrypt_field(token, PII, context=CONTEXT)
        except DecryptionError as exc:
            if exc.reason is not DecryptionFailure.SUBJECT_FORGOTTEN:
                raise
        else:
            raise RuntimeError("a forgotten subject's value still decrypts")
    return {
        "1": {**latency([took[i] for i in light]), "values": 1},
        "10000": {**latency([took[i] for i in heavy]), "values": 10_000},
    }


async def census(svc: EncryptionService, n: int) -> dict[str, Any]:
    took = []
    for _ in range(3):
        start = time.perf_counter()
        counts = await svc.key_manager.subject_census(PII)
        took.append(time.perf_counter() - start)
    live = sum(counts.values())
    return {"ms": [t * 1e3 for t in took], "live": live}


async def size(
    deployment: Deployment, svc: EncryptionService, n: int, before: int | None
) -> dict[str, Any]:
    store = svc.key_manager.store
    if deployment.kind == "postgres":
        assert isinstance(store, PostgresKeyStore)
        pool = await store._ready()
        table = f'"{deployment.where}".subject_keys'
        await pool.execute(f"ANALYZE {table}")
        row = await pool.fetchrow(
            f"SELECT pg_total_relation_size('{table}') AS total, "
            f"pg_relation_size('{table}') AS heap, pg_indexes_size('{table}') AS indexes, "
            f"pg_total_relation_size('{table}') - pg_relation_size('{table}') "
            f"- pg_indexes_size('{table}') AS toast"
        )
        total = int(row["total"])
        return {
            "total_bytes": total,
            "heap_bytes": int(row["heap"]),
            "index_bytes": int(row["indexes"]),
            "toast_bytes": int(row["toast"]),
            "bytes_per_subject": total / n,
        }
    assert isinstance(store, RedisKeyStore)
    client = store._redis
    info = await client.info("memory")
    usage = {}
    for part in ("id", "lookup"):
        usage[part] = int(await client.memory_usage(f"{deployment.where}subjects:{part}") or 0)
    active = svc.keyring.active(PII).key_id
    usage["wrap"] = int(await client.memory_usage(f"{deployment.where}subjects:wrap:{active}") or 0)
    total = sum(usage.values())
    delta = None if before is None else int(info["used_memory"]) - before
    return {
        "memory_usage_bytes": usage,
        "total_bytes": total,
        "bytes_per_subject": total / n,
        "info_delta_bytes": delta,
        "info_delta_per_subject": None if delta is None else delta / n,
    }


async def run_store(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    deployment = Deployment(kind, args)
    rng = random.Random(20)
    n = args.subjects
    sample = rng.sample(range(n), min(args.samples, n))
    result: dict[str, Any] = {"store": kind, "subjects": n}
    print(f"{kind}: {n:,} subjects under {deployment.where}", flush=True)
    try:
        svc = await deployment.service()
        await svc.encrypt_field("first", PII)  # the active PII version wraps them
        before = None
        if kind == "redis":
            redis_store = svc.key_manager.store
            assert isinstance(redis_store, RedisKeyStore)
            before = int((await redis_store._redis.info("memory"))["used_memory"])
        result["insert"], kept = await insert(svc, n, set(sample))
        print(f"  insert: {result['insert']['per_second']:,.0f} subjects/s", flush=True)
        result["size"] = await size(deployment, svc, n, before)
        result["lookup"] = await lookups(deployment, sample, kept)
        print(f"  lookup: {json.dumps(result['lookup'])}", flush=True)
        fresh = await deployment.service()
        result["round_trip"] = await round_trips(fresh, sample[:1000], args.rounds, args.seconds)
        print(f"  round trip: {json.dumps(result['round_trip'])}", flush=True)
        # forgotten subjects come from outside the sample (still known to other phases)
        taken = set(sample)
        outside = list(itertools.islice((i for i in range(n) if i not in taken), 2 * args.heavy))
        result["forget"] = await forgets(fresh, outside[: args.heavy], outside[args.heavy :])
        print(f"  forget: {json.dumps(result['forget'])}", flush=True)
        result["census"] = await census(fresh, n)
        print(f"  census: {json.dumps(result['census'])}", flush=True)
    finally:
        await deployment.close()
        start = time.perf_counter()
        await deployment.drop()
        result["cleanup_seconds"] = time.perf_counter() - start
    return result


def report(results: list[dict[str, Any]]) -> str:
    lines = [
        "| | " + " | ".join(r["store"] for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]

    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(r) for r in results) + " |")

    def lat(part: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: (
            f"{r['lookup'][part]['p50_us'] / 1e3:.2f} / {r['lookup'][part]['p99_us'] / 1e3:.2f} ms"
        )

    row("subject keys", lambda r: f"{r['subjects']:,}")
    row(
        "bulk insert",
        lambda r: (
            f"{r['insert']['seconds']:.0f} s "
            f"({r['insert']['per_second']:,.0f}/s; wrapping {r['insert']['wrap_seconds']:.0f} s)"
        ),
    )
    row(
        "size",
        lambda r: (
            f"{r['size']['total_bytes'] / 2**20:,.0f} MiB "
            f"({r['size']['bytes_per_subject']:,.0f} B/subject)"
        ),
    )
    row(
        "... of which",
        lambda r: (
            f"table {r['size']['heap_bytes'] / 2**20:,.0f} MiB, indexes "
            f"{r['size']['index_bytes'] / 2**20:,.0f} MiB"
            if "heap_bytes" in r["size"]
            else f"INFO used_memory grew {r['size']['info_delta_bytes'] / 2**20:,.0f} MiB "
            f"({r['size']['info_delta_per_subject']:,.0f} B/subject)"
        ),
    )
    row("store read (find), p50 / p99", lat("store_find"))
    row("key lookup, cold, p50 / p99", lat("cold"))
    row(
        "key lookup, warm, p50 / p99",
        lambda r: f"{r['lookup']['warm']['p50_us']:.1f} / {r['lookup']['warm']['p99_us']:.1f} µs",
    )
    row("new subject's key, p50 / p99", lat("create"))
    row("decrypt, key not cached, p50 / p99", lat("cold_decrypt"))
    row("field round trip: plain", lambda r: f"{r['round_trip']['plain_us']:.1f} µs")
    row(
        "... one known subject",
        lambda r: f"{r['round_trip']['one_us']:.1f} µs (**{r['round_trip']['one_ratio']:.2f}x**)",
    )
    row(
        "... 1,000 known subjects in turn",
        lambda r: f"{r['round_trip']['subject_us']:.1f} µs (**{r['round_trip']['ratio']:.2f}x**)",
    )

    def forget_cell(k: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: (
            f"{r['forget'][k]['p50_us'] / 1e3:.1f} / {r['forget'][k]['max_us'] / 1e3:.1f} ms "
            f"(n={r['forget'][k]['n']})"
        )

    for k, label in (("1", "forget, 1 value"), ("10000", "forget, 10,000 values")):
        row(label + ", p50 / max", forget_cell(k))
    row("census (3 runs)", lambda r: " / ".join(f"{t:.0f}" for t in r["census"]["ms"]) + " ms")
    row("cleanup", lambda r: f"{r['cleanup_seconds']:.1f} s")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=("postgres", "redis", "both"), default="both")
    parser.add_argument("--subjects", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="50,000 subjects, short rounds")
    parser.add_argument(
        "--samples",
        type=int,
        default=3000,
        help="random existing subjects looked up (at most the cache size)",
    )
    parser.add_argument(
        "--heavy",
        type=int,
        default=5,
        help="subjects forgotten with 10,000 values each (and as many with 1)",
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument(
        "--dsn",
        default=os.environ.get("AIOCRYPT_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument(
        "--redis", default=os.environ.get("AIOCRYPT_BENCH_REDIS", "redis://127.0.0.1:6379/15")
    )
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()
    if args.quick:
        args.subjects = min(args.subjects, 50_000)
        args.rounds, args.seconds, args.samples = 5, 0.3, min(args.samples, 2000)
    machine = machine_info()
    kinds = ["postgres", "redis"] if args.store == "both" else [args.store]
    results = []
    for kind in kinds:
        results.append(await run_store(kind, args))
    print(
        f"\n{machine['cpu']}, {machine['cores']} cores, {machine['python']}, "
        f"load {machine['load_before']}, {machine['date']}"
    )
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
