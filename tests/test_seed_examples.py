"""The seed's examples, run as an async user writes them (issue 17).

The seed (the application code aiocrypt replaces) encrypts a report with
``encrypt_bulk_data``, writes ``encrypted_report.encrypted_data`` to a file,
keeps the other fields, and later rebuilds
``EncryptedData(encrypted_data=..., key_id=..., algorithm=..., iv=..., tag=...)``
to decrypt it. Here that code is a script run with ``asyncio.run(main())`` in a
fresh Python process, configured only through the environment, as a user runs
it: a 1 MiB and a 10 MiB report, in every performance mode, without compression,
with ``ENCRYPTION_COMPRESSION_ENABLED`` and with ``ENCRYPTION_COMPRESSED_KEY_TYPES``.
The fields kept beside the file go through JSON, as a database row would hold them.

The one change from the seed's text: ``decrypt_bulk_data`` takes ``key_type=``
(required, so an endpoint decrypts only the kind of data it names: docs/format.md).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aiocrypt import CryptoConfigManager, EncryptionConfig, PerformanceMode, PerformanceSettings

SEED_BULK_EXAMPLE = """\
import asyncio
import base64
import json
import random

from aiocrypt import EncryptedData, KeyType, get_crypto_config, get_encryption_service


def generate_financial_report(size: int) -> bytes:
    rng = random.Random(size)
    lines = [b"account,date,amount,currency,memo\\n"]
    total = len(lines[0])
    while total < size:
        line = b"%08d,2026-%02d-%02d,%d.%02d,EUR,%s\\n" % (
            rng.randrange(10**8), rng.randrange(1, 13), rng.randrange(1, 29),
            rng.randrange(10**6), rng.randrange(100), rng.randbytes(6).hex().encode())
        lines.append(line)
        total += len(line)
    return b"".join(lines)[:size]


async def main() -> None:
    crypto_service = get_encryption_service()
    settings = get_crypto_config().get_performance_settings()
    assert type(settings) is dict
    print(json.dumps({"settings": settings}))

    for size in (1024 * 1024, 10 * 1024 * 1024):
        large_report = generate_financial_report(size)
        encrypted_report = await crypto_service.encrypt_bulk_data(
            large_report, KeyType.FINANCIAL_DATA)

        # Store the encrypted report; keep its other fields (here: a JSON "row").
        with open("encrypted_report.bin", "wb") as f:
            f.write(encrypted_report.encrypted_data)
        with open("encrypted_report.json", "w") as f:
            json.dump({"key_id": encrypted_report.key_id,
                       "algorithm": encrypted_report.algorithm,
                       "iv": base64.b64encode(encrypted_report.iv).decode(),
                       "tag": base64.b64encode(encrypted_report.tag).decode()}, f)

        # Later, maybe in another process: read it back and decrypt.
        with open("encrypted_report.json") as f:
            row = json.load(f)
        with open("encrypted_report.bin", "rb") as f:
            encrypted_data = EncryptedData(
                encrypted_data=f.read(),
                key_id=row["key_id"],
                algorithm=row["algorithm"],
                iv=base64.b64decode(row["iv"]),
                tag=base64.b64decode(row["tag"]),
            )
        decrypted_report = await crypto_service.decrypt_bulk_data(
            encrypted_data, key_type=KeyType.FINANCIAL_DATA)
        assert decrypted_report == large_report, "the report did not round-trip"
        print(json.dumps({"size": size, "algorithm": encrypted_report.algorithm,
                          "compressed": encrypted_report.compressed,
                          "segment_size": encrypted_report.segment_size,
                          "stored": len(encrypted_report.encrypted_data)}))

    await crypto_service.close()


asyncio.run(main())
"""

COMPRESSION = {
    "off": {},
    "compression_enabled": {"ENCRYPTION_COMPRESSION_ENABLED": "true"},
    "compressed_key_types": {"ENCRYPTION_COMPRESSED_KEY_TYPES": "audit_logs,financial_data"},
}


def user_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """A user's shell: a fresh master key and a file key store, nothing else of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCRYPTION_")}
    for name in ("PYTHONPATH", "PYTHONSTARTUP", "PYTEST_CURRENT_TEST", "PYTEST_ADDOPTS"):
        env.pop(name, None)
    env["ENCRYPTION_MASTER_KEY"] = base64.b64encode(os.urandom(32)).decode()
    env["ENCRYPTION_KEY_STORAGE_PATH"] = str(tmp_path / "keys.json")
    env.update(variables)
    return env


@pytest.mark.scale
@pytest.mark.parametrize("compression", list(COMPRESSION))
@pytest.mark.parametrize("mode", [m.value for m in PerformanceMode])
def test_seed_bulk_example_round_trips(tmp_path: Path, mode: str, compression: str) -> None:
    script = tmp_path / "seed_bulk_example.py"
    script.write_text(SEED_BULK_EXAMPLE)
    env = user_env(tmp_path, ENCRYPTION_PERFORMANCE_MODE=mode, **COMPRESSION[compression])
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    settings = lines[0]["settings"]
    assert settings["mode"] == mode
    reports = lines[1:]
    assert [r["size"] for r in reports] == [1024 * 1024, 10 * 1024 * 1024]
    for report in reports:  # both are over every mode's inline threshold: streams
        assert report["algorithm"] == "AES_256_GCM_STREAM"
        assert report["segment_size"] == settings["segment_size"]
        assert report["compressed"] is (compression != "off")
        if report["compressed"]:
            assert report["stored"] < report["size"] * 0.8


def test_get_performance_settings_is_a_plain_dict() -> None:
    """The seed's signature: ``Dict[str, Any]``; the typed form stays ``performance``."""
    manager = CryptoConfigManager(EncryptionConfig(performance_mode=PerformanceMode.SECURITY))
    settings = manager.get_performance_settings()
    assert type(settings) is dict and type(settings["mode"]) is str
    assert json.loads(json.dumps(settings)) == settings
    assert isinstance(manager.performance, PerformanceSettings)
    assert settings == {**dataclasses.asdict(manager.performance), "mode": "security"}
    assert settings["inline_threshold"] == 16 * 1024 and settings["segment_size"] == 256 * 1024
    settings["segment_size"] = 1  # a copy: changing it changes nothing
    assert manager.performance.segment_size == 256 * 1024
