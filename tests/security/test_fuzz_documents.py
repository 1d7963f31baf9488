"""Hostile documents: the file key store, key records, the JSON config file, ENCRYPTION_*.

* A file key store document that was edited, truncated, corrupted or replaced
  is refused with ``KeyStoreIntegrityError`` / ``KeyStoreError`` (never another
  exception), and no altered key is ever accepted: a read either fails or
  returns exactly the original records (edits that keep the canonical JSON, such
  as whitespace or key order, are not changes).
* Stored key records (what the Redis and Postgres stores hold) that do not
  parse give ``KeyStoreIntegrityError``.
* A config file (``ENCRYPTION_CONFIG_FILE``) and ``ENCRYPTION_*`` values of any
  content give a working config or ``ConfigurationError``, nothing else.

Run: .venv/bin/python -m pytest tests/security/test_fuzz_documents.py -q -s
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aiocrypt import (
    ConfigurationError,
    EncryptionConfig,
    KeyManager,
    KeyStoreError,
    KeyStoreIntegrityError,
    KeyType,
)
from aiocrypt._config import _ENV_VARS
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import FileKeyStore
from aiocrypt.keystore._base import decode_records

from ._helpers import LoopRunner

COUNTS: Counter[str] = Counter()
SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


class Store:
    """A real file key store with five keys, and its pristine bytes."""

    def __init__(self, directory: Path) -> None:
        self.runner = LoopRunner()
        self.kek = LocalKekProvider(os.urandom(32))
        self.path = directory / "keys.json"
        manager = KeyManager(FileKeyStore(self.path, self.kek), self.kek, watch=False)

        async def build() -> list[dict[str, Any]]:
            await manager.open()
            await manager.ensure_active([KeyType.PII, KeyType.SESSION, KeyType.FINANCIAL_DATA])
            await manager.rotate_key(KeyType.PII, force=True)
            await manager.revoke_key(manager.keyring.active(KeyType.SESSION).key_id)
            await manager.close()
            keyset = await FileKeyStore(self.path, self.kek).read()
            return [k.to_dict() for k in keyset.keys]

        self.records = self.runner.run(build())
        self.pristine = self.path.read_bytes()
        self.doc = json.loads(self.pristine)

    def __repr__(self) -> str:
        return "<Store>"

    def read_back(self, data: bytes) -> list[dict[str, Any]] | None:
        """Write ``data`` as the store file and read it with a fresh store: records or None
        when refused. Any exception other than KeyStoreError fails the test."""
        self.path.write_bytes(data)
        os.chmod(self.path, 0o600)
        try:
            keyset = self.runner.run(FileKeyStore(self.path, self.kek).read())
        except KeyStoreIntegrityError:
            COUNTS["store_refused_integrity"] += 1
            return None
        except KeyStoreError:
            COUNTS["store_refused_other"] += 1
            return None
        return [k.to_dict() for k in keyset.keys]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    directory = tmp_path_factory.mktemp("fuzzstore")
    os.chmod(directory, 0o700)
    s = Store(directory)
    yield s
    s.runner.close()
    shutil.rmtree(directory)
    print(f"\nFIGURES test_fuzz_documents: {dict(sorted(COUNTS.items()))}")


def assert_not_silently_changed(store: Store, data: bytes) -> None:
    COUNTS["store_documents"] += 1
    records = store.read_back(data)
    if records is not None:
        COUNTS["store_accepted_unchanged"] += 1
        assert records == store.records, "an altered key store document was accepted"


def test_pristine_store_reads_back(store: Store) -> None:
    assert store.read_back(store.pristine) == store.records
    assert len(store.records) >= 4
    # reformatting (no change to the canonical form) is not tampering
    assert store.read_back(json.dumps(store.doc, indent=4).encode()) == store.records


def _set_path(doc: Any, path: list[Any], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(doc, dict):
        key = head if head in doc else next(iter(doc), head)
        doc[key] = _set_path(doc.get(key), rest, value)
    elif isinstance(doc, list) and doc:
        i = head % len(doc) if isinstance(head, int) else 0
        doc[i] = _set_path(doc[i], rest, value)
    else:
        return value
    return doc


@SETTINGS
@given(data=st.data())
@example(data=None)
def test_mutated_store_documents_are_refused(store: Store, data: st.DataObject | None) -> None:
    if data is None:  # a kek_id of an unhashable type
        doc = json.loads(store.pristine)
        doc["kek_id"] = ["local:0"]
        assert_not_silently_changed(store, json.dumps(doc).encode())
        return
    kind = data.draw(
        st.sampled_from(
            [
                "bitflip",
                "truncate",
                "extend",
                "field",
                "record_field",
                "drop_field",
                "swap_records",
                "random_json",
                "bytes",
            ]
        )
    )
    raw = bytearray(store.pristine)
    doc = json.loads(store.pristine)
    if kind == "bitflip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
        out = bytes(raw)
    elif kind == "truncate":
        out = bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    elif kind == "extend":
        out = bytes(raw) + data.draw(st.binary(min_size=1, max_size=50))
    elif kind == "field":
        field = data.draw(
            st.sampled_from(
                ["format", "version", "kek_id", "mac_key", "mac", "revision", "keys", "extra"]
            )
        )
        doc[field] = data.draw(json_values)
        out = json.dumps(doc).encode()
    elif kind == "record_field":
        i = data.draw(st.integers(0, len(doc["keys"]) - 1))
        field = data.draw(st.sampled_from([*doc["keys"][i].keys(), "extra"]))
        value = data.draw(
            st.one_of(
                json_values,
                st.sampled_from(
                    ["active", "ACTIVE", "destroyed", "pii", "session", 2, 0, -1, None]
                ),
            )
        )
        doc["keys"][i] = _set_path(doc["keys"][i], [field], value)
        out = json.dumps(doc).encode()
    elif kind == "drop_field":
        if data.draw(st.booleans()):
            doc.pop(data.draw(st.sampled_from(sorted(doc))))
        else:
            rec = doc["keys"][data.draw(st.integers(0, len(doc["keys"]) - 1))]
            rec.pop(data.draw(st.sampled_from(sorted(rec))))
        out = json.dumps(doc).encode()
    elif kind == "swap_records":  # move wrapped keys between records (a key-swap attack)
        a, b = doc["keys"][0], doc["keys"][1]
        a["wrapped_key"], b["wrapped_key"] = b["wrapped_key"], a["wrapped_key"]
        out = json.dumps(doc).encode()
    elif kind == "random_json":
        out = json.dumps(data.draw(json_values)).encode()
    else:
        out = data.draw(st.binary(max_size=300))
    if out == store.pristine:
        return
    assert_not_silently_changed(store, out)


@pytest.mark.parametrize(
    "name, data",
    [
        ("deep nesting", b"[" * 100_000 + b"]" * 100_000),
        ("deep object", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
        ("huge integer", b'{"format":"aiocrypt.keystore","version":' + b"9" * 5000 + b"}"),
        ("NaN revision", None),
        ("non-UTF-8", b'{"format":"\xff\xfe"}'),
        ("UTF-16", '{"format":"aiocrypt.keystore"}'.encode("utf-16")),
        ("empty", b""),
        ("null", b"null"),
        ("over 64 MiB", b" " * (64 * 2**20 + 1)),
    ],
)
def test_pathological_store_documents(store: Store, name: str, data: bytes | None) -> None:
    if data is None:
        doc = json.loads(store.pristine)
        doc["revision"] = float("nan")
        data = json.dumps(doc).encode()
    assert_not_silently_changed(store, data)
    assert store.read_back(data) is None, f"{name}: accepted"


@SETTINGS
@given(
    records=st.lists(
        st.one_of(
            json_values.map(json.dumps),
            st.binary(max_size=60),
            st.dictionaries(
                st.sampled_from(
                    [
                        "key_id",
                        "key_type",
                        "version",
                        "status",
                        "created_at",
                        "expires_at",
                        "wrapped_key",
                        "activated_at",
                        "key_size_bits",
                    ]
                ),
                json_values,
            ).map(json.dumps),
        ),
        min_size=1,
        max_size=3,
    )
)
@example(
    records=[
        '{"key_id":"pii-v1-00000000","key_type":"pii","version":1e999,"status":'
        '"active","created_at":0,"expires_at":0}'
    ]
)
@example(
    records=[
        '{"key_id":"pii-v1-00000000","key_type":"pii","version":1,"status":'
        '"active","created_at":1e300,"expires_at":1e300}'
    ]
)
@example(records=["[" * 5000 + "]" * 5000])
def test_stored_records_parse_or_integrity_error(records: list[Any]) -> None:
    """What the Redis / Postgres stores hand to ``decode_records`` when a record is bad."""
    COUNTS["stored_records"] += 1
    try:
        decode_records(records, "fuzzed store")
    except KeyStoreIntegrityError as exc:
        assert "fuzzed store" in str(exc)


# -- configuration ----------------------------------------------------------------

config_docs = st.one_of(
    st.dictionaries(
        st.sampled_from(
            [
                "algorithm",
                "key_size_bits",
                "performance_mode",
                "compression_enabled",
                "rotation_policies",
                "other",
            ]
        ),
        json_values,
        max_size=4,
    ),
    st.fixed_dictionaries(
        {
            "rotation_policies": st.lists(
                st.one_of(
                    json_values,
                    st.fixed_dictionaries(
                        {
                            "key_type": st.sampled_from(["pii", "session", "Bad", "x" * 40]),
                        },
                        optional={
                            "max_encryptions": json_values,
                            "rotation_interval_days": json_values,
                            "max_key_age_days": json_values,
                            "grace_period_days": json_values,
                            "auto_rotation": json_values,
                            "batch_size": json_values,
                        },
                    ),
                ),
                max_size=3,
            )
        }
    ),
    json_values,
)


def _check_config(config_file: Path | None, env: dict[str, str]) -> None:
    try:
        config = EncryptionConfig.from_env(env, config_file)
        config.require_valid()
        config.master_key_bytes()
        _ = (
            config.performance,
            config.compression_level,
            repr(config),
            config.to_public_dict(),
            [config.rotation_policy(k) for k in KeyType.builtin()],
        )
        COUNTS["config_accepted"] += 1
    except ConfigurationError:
        COUNTS["config_refused"] += 1


@SETTINGS
@given(doc=config_docs)
@example(doc={"performance_mode": 3})
@example(doc={"rotation_policies": [{"key_type": "pii", "max_encryptions": float("inf")}]})
@example(doc={"rotation_policies": [{"key_type": "pii", "batch_size": float("nan")}]})
def test_config_file_contents(tmp_path_factory: pytest.TempPathFactory, doc: Any) -> None:
    path = tmp_path_factory.getbasetemp() / "encryption.json"
    path.write_text(json.dumps(doc))
    COUNTS["config_files"] += 1
    _check_config(
        path,
        {
            "ENCRYPTION_MASTER_KEY": "A" * 43 + "=",
            "ENCRYPTION_KEY_STORAGE_PATH": str(path.parent / "k.json"),
        },
    )


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe\x00",
        b"[" * 100_000,
        b'{"key_size_bits":' + b"9" * 5000 + b"}",
        b'{"rotation_policies":[{"key_type":"pii","max_encryptions":Infinity}]}',
        b"",
        b"null",
    ],
)
def test_pathological_config_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "encryption.json"
    path.write_bytes(content)
    with pytest.raises(ConfigurationError):
        EncryptionConfig.from_env({}, path)


@SETTINGS
@given(
    values=st.dictionaries(
        st.sampled_from([*_ENV_VARS.values(), "ENCRYPTION_CONFIG_FILE"]),
        st.one_of(
            st.text(max_size=60),
            st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape")),
            st.sampled_from(
                [
                    "",
                    " ",
                    "\x00",
                    "true",
                    "security",
                    "redis",
                    "postgres",
                    "vault",
                    "aws_kms",
                    "file",
                    "A" * 43 + "=",
                    "a" * 44,
                ]
            ),
        ),
        min_size=1,
    )
)
@example(values={"ENCRYPTION_CONFIG_FILE": "a\x00b"})
@example(values={"ENCRYPTION_KEY_STORAGE_PATH": "/tmp/\x00/k.json"})
@example(values={"ENCRYPTION_MASTER_KEY": "\udcff" * 44})
def test_environment_values(values: dict[str, str]) -> None:
    COUNTS["environments"] += 1
    _check_config(None, values)
