"""__all__ is exactly the public API (httpx's test_exported_members)."""

from __future__ import annotations

import importlib

import pytest

import aiocrypt


@pytest.mark.parametrize("module_name", ["aiocrypt", "aiocrypt.audit", "aiocrypt.kek",
                                         "aiocrypt.keystore", "aiocrypt.testing",
                                         "aiocrypt.metrics", "aiocrypt.reencrypt",
                                         "aiocrypt.adapters"])
def test_all_names_exist_and_public_names_are_exported(module_name: str) -> None:
    module = importlib.import_module(module_name)
    exported = set(module.__all__)
    for name in exported:
        assert hasattr(module, name), name
    if module.__file__ and module.__file__.endswith("__init__.py"):
        # a package re-exports from private modules: every public name it holds
        public = {name for name, obj in vars(module).items() if not name.startswith("_")
                  and getattr(obj, "__module__", "").startswith(module_name)}
    else:
        public = {name for name, obj in vars(module).items() if not name.startswith("_")
                  and getattr(obj, "__module__", None) == module_name}
    assert public <= exported, public - exported


def test_design_names_are_public() -> None:
    for name in ["KeyType", "KeyStatus", "EncryptionKey", "EncryptedData", "EncryptionConfig",
                 "KeyRotationPolicy", "PerformanceMode", "CryptoConfigManager", "KeyManager",
                 "EncryptionService", "get_crypto_config", "get_key_manager",
                 "get_encryption_service", "AiocryptError", "DecryptionError"]:
        assert name in aiocrypt.__all__


def test_core_imports_no_integration_or_cloud_sdk() -> None:
    import subprocess
    import sys

    code = ("import sys, aiocrypt, aiocrypt.testing, aiocrypt.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in {'sqlalchemy', 'quart', "
            "'flask', 'arq', 'aiobotocore', 'hvac', 'azure', 'google', 'redis', 'asyncpg'}]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
