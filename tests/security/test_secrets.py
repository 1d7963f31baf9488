"""No key material or plaintext where an attacker (or a log shipper) could read it.

Secrets tracked: the master key (and the one it is rotated to), every DEK that
existed at any point (raw bytes read from the manager's keyring), the file
store's MAC key, passwords inside configured URLs, and a random plaintext
marker encrypted in every way the service offers. Each is searched in raw,
hex (lower and upper) and base64 / base64url (with and without padding) form
(tests/security/_helpers.py ``secret_forms``) in:

* every log record of every ``aiocrypt`` logger at DEBUG, over a whole life
  cycle (encrypt, decrypt, batch, bulk, stream, cache, session, rotation,
  revocation, compromise, expiry + cleanup, master-key rotation, failures);
* the repr and str of every public object;
* str, repr, args and traceback of every raised error, with its chain;
* the key file, and every file the library left in the temp directory (the
  master key must be in none of them), whose modes are checked too;
* every Redis key and value the Redis key store and the session store wrote;
* the arq job payloads the ARQ integration enqueues, read back from Redis.

Run: .venv/bin/python -m pytest tests/security/test_secrets.py -q -s
"""

from __future__ import annotations

import base64
import logging
import os
import pickle
import secrets
import stat
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from aiocrypt import (
    CryptoConfigManager,
    EncryptionConfig,
    EncryptionService,
    KeyManager,
    KeyType,
)
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import FileKeyStore
from aiocrypt.keystore.redis import RedisKeyStore
from aiocrypt.testing import FakeKekProvider, ManualClock, MemoryKeyStore

from ._helpers import exception_texts, find_secrets

COUNTS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _figures() -> Any:
    yield
    print(f"\nFIGURES test_secrets: {dict(sorted(COUNTS.items()))}")


class Secrets:
    """Everything that must never be seen, by name."""

    def __init__(self) -> None:
        self.items: dict[str, bytes] = {}
        self.marker = f"MARKER-{secrets.token_hex(12)}"
        self.items["plaintext marker"] = self.marker.encode()

    def add_deks(self, service: EncryptionService) -> None:
        for dk in service.keyring:
            self.items[f"DEK {dk.key_id}"] = dk._material

    def check(self, where: str, haystack: bytes | str) -> None:
        COUNTS["bytes_scanned"] += len(haystack)
        COUNTS["scans"] += 1
        found = find_secrets(haystack, self.items)
        assert not found, f"secret material in {where}: {found}"

    @property
    def dek_count(self) -> int:
        return sum(name.startswith("DEK ") for name in self.items)


def test_scanner_finds_every_form() -> None:
    """Positive control: the scanner sees a secret in each form it claims to cover."""
    secret = os.urandom(32)
    forms: list[bytes | str] = [
        secret,
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        "prefix " + base64.b64encode(secret).decode()[:24] + " suffix",
    ]
    for form in forms:
        haystack = form if isinstance(form, bytes) else form.encode()
        assert find_secrets(b"log: " + haystack, {"s": secret}), form
    assert find_secrets(b"nothing here", {"s": secret}) == []


async def _collect(source: AsyncIterator[bytes]) -> bytes:
    out = bytearray()
    async for part in source:
        out += part
    return bytes(out)


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 1000):
        yield data[i : i + 1000]


def _texts_of_error(call: Any) -> list[str]:
    try:
        call()
    except Exception as exc:  # every error is collected and scanned
        return list(exception_texts(exc))
    return []


async def _error_texts(coro: Any) -> list[str]:
    try:
        await coro
    except Exception as exc:  # every error is collected and scanned
        return list(exception_texts(exc))
    pytest.fail("expected the call to fail")


async def test_file_store_life_cycle_leaks_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiocrypt")
    s = Secrets()
    master, new_master = os.urandom(32), os.urandom(32)
    s.items["master key"], s.items["new master key"] = master, new_master
    s.items["redis password"] = b"redis-pw-" + secrets.token_hex(8).encode()
    s.items["postgres password"] = b"pg-pw-" + secrets.token_hex(8).encode()
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o700)
    key_path = directory / "keys.json"
    config = EncryptionConfig(
        master_key=base64.b64encode(master).decode(),
        storage_path=str(key_path),
        redis_url=f"redis://:{s.items['redis password'].decode()}@127.0.0.1:6379/15",
        postgres_dsn=f"postgresql://u:{s.items['postgres password'].decode()}@127.0.0.1/test",
    )
    clock = ManualClock()
    kek = LocalKekProvider(master)
    store = FileKeyStore(key_path, kek)
    manager = KeyManager(store, kek, config, clock=clock, watch=False)
    service = EncryptionService(manager, clock=clock)
    texts: list[str] = []
    m = s.marker
    async with service:
        tokens = {}
        for kt in KeyType.builtin():
            tokens[kt] = await service.encrypt_field(m, kt, context="t.c")
            assert await service.decrypt_field(tokens[kt], kt, context="t.c") == m
        many = await service.encrypt_many([m, {"m": m}], KeyType.PII)
        assert await service.decrypt_many(many, KeyType.PII) == [m, {"m": m}]
        blob = await service.encrypt_bulk_data(m.encode() * 50, KeyType.PII)
        assert bytes(await service.decrypt_bulk_data(blob, key_type=KeyType.PII)) == m.encode() * 50
        streamed = await _collect(service.encrypt_stream(_chunks(m.encode() * 3000)))
        assert (
            await _collect(
                service.decrypt_stream(_chunks(streamed), key_type=KeyType.FINANCIAL_DATA)
            )
            == m.encode() * 3000
        )
        cache = await service.encrypt_cache_data("user:" + m, {"m": m})
        assert await service.decrypt_cache_data(*cache) == ("user:" + m, {"m": m})
        session = await service.encrypt_session_data({"m": m}, context="sid")
        assert await service.decrypt_session_data(session, context="sid") == {"m": m}
        s.add_deks(service)
        s.items["file store MAC key"] = store._mac_key or b""

        # key life cycle
        await manager.rotate_key(KeyType.PII, force=True)
        revoked = await manager.revoke_key((await manager.get_active_key("api_keys")).key_id)
        compromised = await manager.mark_compromised(
            (await manager.get_active_key("financial_data")).key_id, reason="test leak"
        )
        await service.encrypt_field(m, KeyType.FINANCIAL_DATA)
        s.add_deks(service)
        clock.advance(days=3000)  # everything expires: rotate all, then destroy the old keys
        await manager.rotate_keys_due()
        await service.encrypt_field(m, KeyType.PII)
        s.add_deks(service)
        destroyed = await manager.cleanup_expired_keys(force=True)
        assert destroyed >= 5
        await manager.rotate_master_key(LocalKekProvider(new_master))
        s.add_deks(service)

        # failures
        for bad in (
            tokens[KeyType.PII][:-3],
            tokens[KeyType.PII].replace("ac2.", "ac1."),
            tokens[KeyType.SESSION][:30] + "A" + tokens[KeyType.SESSION][31:],
            tokens[KeyType.PII] + "x",
        ):
            texts += await _error_texts(service.decrypt_field(bad, KeyType.PII, context="t.c"))
        texts += await _error_texts(
            service.decrypt_field(tokens[KeyType.SESSION], KeyType.SESSION, context="other")
        )
        texts += await _error_texts(service.decrypt_many([many[0], many[1][:-2]], KeyType.PII))
        texts += await _error_texts(service.decrypt_cache_data(cache[0], cache[1][:-4]))
        texts += await _error_texts(
            service.decrypt_bulk_data(blob.to_bytes()[:-1], key_type=KeyType.PII)
        )
        texts += await _error_texts(
            _collect(
                service.decrypt_stream(_chunks(streamed[:-5]), key_type=KeyType.FINANCIAL_DATA)
            )
        )
        texts += await _error_texts(service.encrypt_field(object()))
        texts += await _error_texts(manager.rotate_master_key(LocalKekProvider(new_master)))
        texts += _texts_of_error(lambda: config.replace(master_key="bad").require_valid())
        texts += _texts_of_error(
            lambda: EncryptionConfig(
                master_key=base64.b64encode(master[:31]).decode()
            ).master_key_bytes()
        )
        for old in (master, os.urandom(32)):  # the old or a wrong master key cannot open it
            wrong = LocalKekProvider(old)
            texts += await _error_texts(
                KeyManager(FileKeyStore(key_path, wrong), wrong, watch=False).open()
            )

        # reprs of every public object
        public: list[Any] = [
            service,
            manager,
            store,
            kek,
            manager.kek,
            config,
            CryptoConfigManager(config),
            config.rotation_policy(KeyType.PII),
            config.performance,
            service.keyring,
            *service.keyring,
            revoked,
            compromised,
            *(await manager.list_keys()),
            blob,
            FakeKekProvider(),
            MemoryKeyStore(),
            manager.auditor,
            RedisKeyStore(config.redis_url or ""),
        ]
        from aiocrypt.keystore.postgres import PostgresKeyStore

        public.append(PostgresKeyStore(config.postgres_dsn))
        for obj in public:
            texts += [repr(obj), str(obj)]
        COUNTS["objects_repr_checked"] += len(public)
        texts += [
            str(await manager.get_key_statistics()),
            str(await service.get_encryption_stats()),
            str(config.to_public_dict()),
            str(await manager.health()),
        ]
        for dk in service.keyring:
            with pytest.raises(TypeError):
                pickle.dumps(dk)
            with pytest.raises(TypeError):
                pickle.dumps(dk.key)

    COUNTS["deks_tracked"] += s.dek_count
    COUNTS["error_texts"] += len(texts)
    s.check("reprs, statistics and error messages", "\n".join(texts))
    records = caplog.records
    assert any("key generated" in r.getMessage() for r in records)  # logging was captured
    log_text = "\n".join(
        [r.getMessage() for r in records]
        + [repr(r.args) for r in records]
        + [r.exc_text or "" for r in records]
        + [caplog.text]
    )
    COUNTS["log_records"] += len(records)
    s.check("log records", log_text)

    # the disk: the key file holds wrapped keys only; the master key is nowhere
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert key_path in files
    for path in files:
        COUNTS["files_scanned"] += 1
        s.check(f"file {path.name}", path.read_bytes())
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path.name} has mode {mode:o}"
    assert stat.S_IMODE(directory.stat().st_mode) & 0o002 == 0
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_kek_provider_and_config_reprs_hide_credentials() -> None:
    """Cloud KEK providers built from a config full of credentials: reprs, str, the
    config's repr and public dict, and the errors of using them name none of them."""
    from aiocrypt._factory import build_kek_provider

    s = Secrets()
    cred = {
        name: f"{name}-{secrets.token_hex(10)}"
        for name in ("vault_token", "aws_secret", "azure_secret", "url_password")
    }
    s.items.update({k: v.encode() for k, v in cred.items()})
    configs = [
        EncryptionConfig(
            storage_backend="vault",
            vault_token=cred["vault_token"],
            vault_url=f"http://user:{cred['url_password']}@127.0.0.1:1",
        ),
        EncryptionConfig(
            storage_backend="aws_kms",
            aws_region="us-east-1",
            aws_kms_key_id="alias/x",
            aws_access_key_id="AKIAEXAMPLE",
            aws_secret_access_key=cred["aws_secret"],
            aws_endpoint_url=f"http://user:{cred['url_password']}@127.0.0.1:1",
        ),
        EncryptionConfig(
            storage_backend="azure_kv",
            azure_vault_url="https://x.vault.azure.net",
            azure_key_name="k",
            azure_tenant_id="t",
            azure_client_id="c",
            azure_client_secret=cred["azure_secret"],
        ),
        EncryptionConfig(
            storage_backend="gcp_kms",
            gcp_project_id="p",
            gcp_location="l",
            gcp_keyring="r",
            gcp_key_name="k",
            gcp_endpoint="127.0.0.1:1",
        ),
    ]
    texts = []
    for config in configs:
        provider = build_kek_provider(config)
        texts += [
            repr(provider),
            str(provider),
            provider.kek_id,
            repr(config),
            str(config.to_public_dict()),
            repr(CryptoConfigManager(config)),
        ]
        texts += _texts_of_error(lambda p=provider: pickle.dumps(p))
    COUNTS["objects_repr_checked"] += 3 * len(configs)
    s.check("KEK provider and config reprs", "\n".join(texts))


def test_cli_init_writes_a_private_key_file_and_prints_no_key(tmp_path: Path) -> None:
    """``aiocrypt init`` is the one command meant to write a master key to disk: the
    directory it creates is 0700, the key file 0600, and the key is not printed (nor put
    in the config file) unless asked."""
    from click.testing import CliRunner

    from aiocrypt.cli import main

    key_file = tmp_path / "new" / "dir" / "master.key"
    config_file = tmp_path / "cfg" / "encryption.json"
    result = CliRunner().invoke(
        main, ["init", "--key-file", str(key_file), "--config-file", str(config_file)], env={}
    )
    assert result.exit_code == 0, result.output
    master = base64.b64decode(key_file.read_text().strip())
    assert len(master) == 32
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert find_secrets(result.output, {"master": master}) == []
    assert find_secrets(config_file.read_bytes(), {"master": master}) == []
    COUNTS["files_scanned"] += 1


# -- Redis: key store, session store, arq jobs -----------------------------------------


async def _redis_dump(client: aioredis.Redis, pattern: str) -> tuple[int, bytes]:
    """Every key matching ``pattern`` and its value(s), whatever the type, as one blob."""
    parts: list[bytes] = []
    count = 0
    async for key in client.scan_iter(match=pattern):
        count += 1
        parts.append(key)
        kind = (await client.type(key)).decode()
        if kind == "string":
            parts.append(await client.get(key) or b"")
        elif kind == "hash":
            # redis-py types each reply as Awaitable | the value, which await refuses
            for k, v in (await client.hgetall(key)).items():  # type: ignore[misc]
                parts += [k, v]
        elif kind == "set":
            parts += list(await client.smembers(key))  # type: ignore[misc]
        elif kind == "zset":
            parts += [m for m, _ in await client.zrange(key, 0, -1, withscores=True)]
        elif kind == "list":
            parts += await client.lrange(key, 0, -1)  # type: ignore[misc]
        elif kind == "stream":
            for _, fields in await client.xrange(key):
                for k, v in fields.items():
                    parts += [k, v]
        else:
            pytest.fail(f"unexpected Redis type {kind} at {key!r}")
    return count, b"\n".join(parts)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    prefix = f"aiocrypt-sec-{secrets.token_hex(6)}:"
    client.test_prefix = prefix
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        keys += [k async for k in client.scan_iter(match=f"arq:*{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_redis_key_store_and_sessions_hold_no_secrets(
    redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    from aiocrypt.integrations.sessions import RedisSessionStore, SessionSettings

    caplog.set_level(logging.DEBUG, logger="aiocrypt")
    prefix: str = redis_client.test_prefix  # type: ignore[attr-defined]
    s = Secrets()
    master = os.urandom(32)
    s.items["master key"] = master
    kek = LocalKekProvider(master)
    manager = KeyManager(RedisKeyStore(redis_client, prefix=prefix + "keys:"), kek, watch=False)
    service = EncryptionService(manager)
    sessions = RedisSessionStore(service, redis_client, SessionSettings(prefix=prefix + "session:"))
    async with service:
        for i in range(5):
            session = await sessions.load(None)
            session["user"] = s.marker
            session["n"] = i
            await sessions.save(session)
        await service.encrypt_field(s.marker, KeyType.PII)
        await manager.rotate_key(KeyType.SESSION, force=True)
        session = await sessions.load(None)
        session["user"] = s.marker
        await sessions.save(session)
        await manager.rotate_key(KeyType("session_index"), force=True)
        s.add_deks(service)
        texts = [repr(sessions), repr(session), repr(manager.store)]
    count, dump = await _redis_dump(redis_client, prefix + "*")
    assert count >= 7, f"only {count} Redis keys under the test prefix"
    assert dump.count(b"ac2.") >= 6  # the sessions are there, encrypted
    COUNTS["redis_keys_scanned"] += count
    COUNTS["deks_tracked"] += s.dek_count
    s.check("Redis keys and values", dump)
    s.check("reprs", "\n".join(texts))
    s.check("log records", "\n".join(r.getMessage() for r in caplog.records) + caplog.text)


async def test_arq_job_payloads_hold_identifiers_only(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.jobs import deserialize_job

    from aiocrypt.integrations.arq import enqueue_cleanup, enqueue_reencryption, enqueue_rotation
    from aiocrypt.integrations.arq.config import ArqWorkerConfig

    prefix: str = redis_client.test_prefix  # type: ignore[attr-defined]
    job_prefix = prefix.rstrip(":").replace(":", "-")
    queue = f"{prefix}queue"
    s = Secrets()
    master = os.urandom(32)
    s.items["master key"] = master
    kek = LocalKekProvider(master)
    manager = KeyManager(MemoryKeyStore(), kek, watch=False)
    service = EncryptionService(manager)
    cfg = ArqWorkerConfig.from_env(
        {"ENCRYPTION_ARQ_PREFIX": job_prefix, "ENCRYPTION_REDIS_URL": redis_url}
    )
    from aiocrypt.integrations.arq import job_deserializer, job_serializer

    pool = await create_pool(
        RedisSettings(host="127.0.0.1", port=6379, database=15),
        job_serializer=job_serializer,
        job_deserializer=job_deserializer,
    )
    try:
        async with service:
            await service.encrypt_field(s.marker, KeyType.PII)
            old = (await manager.get_active_key(KeyType.PII)).key_id
            await manager.rotate_key(KeyType.PII, force=True)
            s.add_deks(service)
            ids = [
                await enqueue_rotation(pool, KeyType.PII, force=True, queue_name=queue),
                await enqueue_cleanup(pool, queue_name=queue),
                cfg.job_id(
                    await enqueue_reencryption(pool, KeyType.PII, old, config=cfg, queue_name=queue)
                ),
            ]
        payloads = []
        for job_id in ids:
            assert job_id is not None
            raw = await redis_client.get(f"arq:job:{job_id}")
            assert raw is not None, f"job {job_id} not found in Redis"
            payloads.append(raw)
            job = deserialize_job(raw, deserializer=job_deserializer)
            for arg in [*job.args, *job.kwargs.values()]:
                assert arg is None or isinstance(arg, (str, int, bool)), (
                    f"{job.function} carries a {type(arg).__name__}"
                )
                COUNTS["arq_job_args_checked"] += 1
            s.check(f"arq job {job.function}", repr((job.args, job.kwargs)))
        s.check("arq job payloads", b"\n".join(payloads))
        _, queued = await _redis_dump(redis_client, f"{queue}*")
        s.check("arq queue", queued)
        COUNTS["arq_jobs_scanned"] += len(payloads)
    finally:
        keys = [f"arq:job:{i}" for i in ids if i] if "ids" in locals() else []
        if keys:
            await redis_client.delete(*keys, queue)
        await pool.aclose()
