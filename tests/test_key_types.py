"""Key types are declared: a typo is refused with the nearest names and creates nothing."""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from aiocrypt import (
    AiocryptError,
    ConfigurationError,
    EncryptionConfig,
    EncryptionService,
    KeyManager,
    KeyType,
    UnknownKeyTypeError,
)
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import FileKeyStore
from aiocrypt.testing import FakeKekProvider, MemoryKeyStore, make_service


def _file_service(tmp_path: Path, config: EncryptionConfig | None = None) -> EncryptionService:
    """A service over a real file key store (what ``aiocrypt`` and applications use)."""
    master_key = base64.b64encode(os.urandom(32)).decode()
    kek = LocalKekProvider(base64.b64decode(master_key))
    config = (config or EncryptionConfig()).replace(
        master_key=master_key, storage_path=str(tmp_path / "keys.json")
    )
    store = FileKeyStore(config.storage_path, kek)
    return EncryptionService(KeyManager(store, kek, config, watch=False))


async def _stored_key_types(service: EncryptionService) -> set[str]:
    """Key types of every record in the store itself (not the manager's view)."""
    return {k.key_type.value for k in (await service.key_manager.store.read()).keys}


async def test_a_misspelt_key_type_is_refused_with_a_suggestion_and_creates_nothing(
    tmp_path: Path,
) -> None:
    async with _file_service(tmp_path) as service:
        manager = service.key_manager
        attempts: list[Callable[[], Awaitable[object]]] = [
            lambda: service.encrypt_field("x", "financal_dat", context="t.c"),
            lambda: service.encrypt_many(["x"], "financal_data"),
            lambda: service.encrypt_bulk_data(b"x", "financal_data"),
            lambda: manager.generate_key("financal_data"),
            lambda: manager.rotate_key("financal_data", force=True),
            lambda: manager.rotate_key("financal_data"),
            lambda: manager.ensure_active(["financal_data"]),
            lambda: manager.get_active_key("financal_data"),
        ]
        for attempt in attempts:
            with pytest.raises(UnknownKeyTypeError) as info:
                await attempt()
            assert "did you mean financial_data?" in str(info.value)
            assert info.value.suggestions[0] == "financial_data"
            assert "ENCRYPTION_KEY_TYPES" in str(info.value)
        assert isinstance(info.value, AiocryptError) and isinstance(info.value, ValueError)
        await service.encrypt_field("ok", "pii", context="t.c")  # the store works meanwhile
        assert await _stored_key_types(service) == {"pii"}
        assert await manager.list_keys("financal_data") == []
    assert "financal" not in (tmp_path / "keys.json").read_text()


async def test_a_capitalised_name_suggests_the_lower_case_one(service: EncryptionService) -> None:
    attempt: Callable[[], KeyType]
    for attempt in (
        lambda: KeyType("FINANCIAL_DATA"),
        lambda: service.config.declared_key_type("FINANCIAL_DATA"),
    ):
        with pytest.raises(UnknownKeyTypeError, match=r"did you mean financial_data\?") as info:
            attempt()
        assert "invalid key type name 'FINANCIAL_DATA'" in str(info.value)
    with pytest.raises(UnknownKeyTypeError, match=r"did you mean pii\?"):
        await service.encrypt_field("x", "Pii")
    with pytest.raises(UnknownKeyTypeError, match=r"did you mean financial_data\?"):
        await service.key_manager.generate_key("Financial_Data")
    # a declared custom type is suggested as well
    config = EncryptionConfig(key_types=["tax_ids"])
    with pytest.raises(UnknownKeyTypeError, match=r"did you mean tax_ids\?"):
        config.declared_key_type("TAX_IDS")
    with pytest.raises(UnknownKeyTypeError, match=r"did you mean tax_ids\?"):
        config.declared_key_type("tax_id")


def test_a_name_that_may_be_a_value_is_not_repeated() -> None:
    for value in ("4111 1111 1111 1111", "078-05-1120", "x" * 40):
        with pytest.raises(UnknownKeyTypeError) as info:
            KeyType(value)
        assert value not in str(info.value)
        assert f"{len(value)} characters, not repeated" in str(info.value)
        with pytest.raises(UnknownKeyTypeError) as info:
            EncryptionConfig().declared_key_type(value)
        assert value not in str(info.value)
    with pytest.raises(UnknownKeyTypeError, match=r"^unknown key type 'zzz'") as info:
        EncryptionConfig().declared_key_type("zzz")
    assert info.value.suggestions == ()
    assert "Known key types: api_keys, audit_logs, blind_index, cache" in str(info.value)


def test_the_predefined_and_declared_key_types() -> None:
    assert {kt.value for kt in KeyType.predefined()} == {
        "financial_data",
        "pii",
        "session",
        "api_keys",
        "audit_logs",
        "cache",
        "session_index",
        "blind_index",
    }
    assert EncryptionConfig().known_key_types == set(KeyType.predefined())
    config = EncryptionConfig(
        # the forms a config file or the environment gives, coerced
        key_types="tax_ids, case_notes ,",
        compressed_key_types=["exports"],
        rotation_policies={"vendor_tokens": {"rotation_interval_days": 30}},  # type: ignore[dict-item]
    )
    assert config.key_types == {KeyType("tax_ids"), KeyType("case_notes")}
    assert config.known_key_types == {
        *KeyType.predefined(),
        "tax_ids",
        "case_notes",
        "exports",
        "vendor_tokens",
    }
    assert config.declared_key_type("exports") is KeyType("exports")
    assert config.to_public_dict()["key_types"] == ["case_notes", "tax_ids"]
    with pytest.raises(ConfigurationError, match="key_types: invalid key type name 'Tax_Ids'"):
        EncryptionConfig(key_types=["Tax_Ids"])


async def test_a_key_type_declared_in_the_environment_works_end_to_end(tmp_path: Path) -> None:
    config = EncryptionConfig.from_env({"ENCRYPTION_KEY_TYPES": "tax_ids,case_notes"})
    assert config.key_types == {"tax_ids", "case_notes"}
    async with _file_service(tmp_path, config) as service:
        token = await service.encrypt_field("AB123", "tax_ids", context="t.c")
        assert token.startswith("ac2.tax_ids-v1-")
        assert await service.decrypt_field(token, KeyType("tax_ids"), context="t.c") == "AB123"
        second = await service.key_manager.rotate_key("tax_ids", force=True)
        assert second.version == 2
        assert await service.decrypt_field(token, "tax_ids", context="t.c") == "AB123"
        assert (await service.key_manager.generate_key("case_notes")).version == 1
        assert await _stored_key_types(service) == {"tax_ids", "case_notes"}


async def test_a_key_type_declared_in_the_config_file_works_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "encryption.json"
    path.write_text(
        json.dumps(
            {
                "key_types": ["case_notes"],
                "compressed_key_types": ["exports"],
                "rotation_policies": [{"key_type": "vendor_tokens", "rotation_interval_days": 30}],
            }
        )
    )
    config = EncryptionConfig.from_env({}, config_file=path)
    async with _file_service(tmp_path, config) as service:
        for key_type in ("case_notes", "exports", "vendor_tokens"):
            token = await service.encrypt_field({"n": 1}, key_type, context="t.c")
            assert await service.decrypt_field(token, key_type, context="t.c") == {"n": 1}
        with pytest.raises(UnknownKeyTypeError, match=re.escape(f'"key_types" in {path}')):
            await service.encrypt_field("x", "case_note")
        assert await _stored_key_types(service) == {"case_notes", "exports", "vendor_tokens"}


async def test_the_library_key_types_need_no_declaration() -> None:
    async with make_service() as service:
        key, value = await service.encrypt_cache_data("user:1", {"a": 1})
        assert await service.decrypt_cache_data(key, value) == ("user:1", {"a": 1})
        token = await service.encrypt_session_data({"u": 1}, context="sid")
        assert await service.decrypt_session_data(token, context="sid") == {"u": 1}
        keyring = await service.key_manager.ensure_active(
            [KeyType.SESSION_INDEX, KeyType.BLIND_INDEX, *KeyType.builtin()]
        )
        assert set(keyring.active_keys) == set(KeyType.predefined())


async def test_a_key_type_already_in_the_store_keeps_working_undeclared() -> None:
    """A store from before key types were declared: its keys still encrypt, decrypt and
    rotate by policy; only an explicit new version needs the declaration."""
    store, kek = MemoryKeyStore(), FakeKekProvider()
    declared = EncryptionConfig(key_types=["tax_ids"])
    async with EncryptionService(KeyManager(store, kek, declared, watch=False)) as before:
        token = await before.encrypt_field("AB123", "tax_ids", context="t.c")
    async with EncryptionService(KeyManager(store, kek, watch=False)) as after:
        assert await after.decrypt_field(token, "tax_ids", context="t.c") == "AB123"
        again = await after.encrypt_field("CD456", "tax_ids", context="t.c")
        assert await after.decrypt_field(again, "tax_ids", context="t.c") == "CD456"
        with pytest.raises(UnknownKeyTypeError, match="ENCRYPTION_KEY_TYPES"):
            await after.key_manager.generate_key("tax_ids")
        assert [k.version for k in await after.key_manager.list_keys("tax_ids")] == [1]
