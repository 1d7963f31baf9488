"""__all__ is exactly the public API (httpx's test_exported_members)."""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import aiocrypt


@pytest.mark.parametrize(
    "module_name",
    [
        "aiocrypt",
        "aiocrypt.audit",
        "aiocrypt.kek",
        "aiocrypt.keystore",
        "aiocrypt.testing",
        "aiocrypt.metrics",
        "aiocrypt.reencrypt",
        "aiocrypt.adapters",
    ],
)
def test_all_names_exist_and_public_names_are_exported(module_name: str) -> None:
    module = importlib.import_module(module_name)
    exported = set(module.__all__)
    for name in exported:
        assert hasattr(module, name), name
    if module.__file__ and module.__file__.endswith("__init__.py"):
        # a package re-exports from private modules: every public name it holds
        public = {
            name
            for name, obj in vars(module).items()
            if not name.startswith("_") and getattr(obj, "__module__", "").startswith(module_name)
        }
    else:
        public = {
            name
            for name, obj in vars(module).items()
            if not name.startswith("_") and getattr(obj, "__module__", None) == module_name
        }
    assert public <= exported, public - exported


def test_design_names_are_public() -> None:
    for name in [
        "KeyType",
        "KeyStatus",
        "EncryptionKey",
        "EncryptedData",
        "EncryptionConfig",
        "KeyRotationPolicy",
        "PerformanceMode",
        "CryptoConfigManager",
        "KeyManager",
        "EncryptionService",
        "get_crypto_config",
        "get_key_manager",
        "get_encryption_service",
        "AiocryptError",
        "DecryptionError",
    ]:
        assert name in aiocrypt.__all__


def test_core_imports_no_integration_or_cloud_sdk() -> None:
    import subprocess
    import sys

    code = (
        "import sys, aiocrypt, aiocrypt.testing, aiocrypt.cli; "
        "bad = [m for m in sys.modules if m.split('.')[0] in {'sqlalchemy', 'quart', "
        "'flask', 'arq', 'aiobotocore', 'hvac', 'azure', 'google', 'redis', 'asyncpg'}]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


#: Modules applications and adapters import: their signatures may name only types
#: reachable from one of them.
PUBLIC_MODULES = [
    "aiocrypt",
    "aiocrypt.adapters",
    "aiocrypt.reencrypt",
    "aiocrypt.keystore",
    "aiocrypt.kek",
    "aiocrypt.audit",
    "aiocrypt.testing",
    "aiocrypt.metrics",
    "aiocrypt.integrations.sqlalchemy",
    "aiocrypt.integrations.alembic",
    "aiocrypt.integrations.arq",
    "aiocrypt.integrations.flask",
    "aiocrypt.integrations.quart",
    "aiocrypt.integrations.sessions",
    "aiocrypt.integrations.cache",
]
#: Private types public signatures still name, being made public by the work that
#: added them (subject keys); this set may only shrink.
NOT_YET_PUBLIC = {
    "aiocrypt._subjects.SubjectKeyRecord",
    "aiocrypt.keystore._subjects_file.FileSubjectKeyStore",
    "aiocrypt.keystore._subjects_memory.MemorySubjectKeyStore",
}


def _classes_in(hint: object) -> Iterator[type]:
    if isinstance(hint, type):
        yield hint
    origin = typing.get_origin(hint)
    if isinstance(origin, type):
        yield origin
    for arg in typing.get_args(hint):
        yield from _classes_in(arg)


def _private(cls: type) -> bool:
    parts = getattr(cls, "__module__", "").split(".")
    return parts[0] == "aiocrypt" and any(part.startswith("_") for part in parts[1:])


def test_public_signatures_name_only_public_types() -> None:
    """``BlindIndex.digest(value, data_key: DataKey)``: DataKey must be importable from
    a public module (aiocrypt.adapters), or an adapter could not name it."""
    pytest.importorskip("prometheus_client")
    import prometheus_client
    import redis

    modules = [importlib.import_module(name) for name in PUBLIC_MODULES]
    exported = {name: getattr(m, name) for m in modules for name in m.__all__}
    reachable = {id(obj) for obj in exported.values()}
    # names under TYPE_CHECKING in their modules: resolved against the public ones
    namespace = {
        **exported,
        "redis": redis,
        "CollectorRegistry": prometheus_client.CollectorRegistry,
        "Metric": prometheus_client.metrics_core.Metric,
    }
    functions: list[Callable[..., Any]] = []
    for obj in exported.values():
        if inspect.isfunction(obj):
            functions.append(obj)
        elif inspect.isclass(obj):
            for name, member in vars(obj).items():
                if name.startswith("_") and name != "__init__":
                    continue
                member = member.fget if isinstance(member, property) else member
                member = getattr(member, "__func__", member)
                if inspect.isfunction(member):
                    functions.append(member)
    private: dict[str, str] = {}
    for function in functions:
        for hint in typing.get_type_hints(function, localns=namespace).values():
            for cls in _classes_in(hint):
                if _private(cls) and id(cls) not in reachable:
                    private[f"{cls.__module__}.{cls.__qualname__}"] = function.__qualname__
    assert "digest" in {f.__name__ for f in functions}  # BlindIndex.digest was looked at
    assert set(private) <= NOT_YET_PUBLIC, {
        k: v for k, v in private.items() if k not in NOT_YET_PUBLIC
    }


def test_adapters_reach_what_the_integrations_needed_from_private_modules() -> None:
    from aiocrypt import adapters
    from aiocrypt._crypto import DataKey
    from aiocrypt._types import KeyTypeLike

    assert adapters.DataKey is DataKey and adapters.KeyTypeLike is KeyTypeLike
    assert adapters.text_prefix("pii-v1-0a0b0c0d") == "ac2.pii-v1-0a0b0c0d."
    from aiocrypt.cli import key_type_param  # for CLI commands plugged in by integrations

    assert callable(key_type_param)
