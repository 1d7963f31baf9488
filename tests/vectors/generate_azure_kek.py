"""Regenerate the signed (0x02) entries of tests/vectors/azure_kek.json.

Run ONLY for a deliberate new envelope version (``python -m
tests.vectors.generate_azure_kek`` from the repository root). The fixed RSA key
in the file is a published test key: never use it for anything else.

The 0x01 entries (HMAC keyed by the DEK, refused unless
``allow_unsigned_legacy``) were written by ``AzureKeyVaultKekProvider.wrap``
as it was at commit 2fc60bd (its last version to write them) against
tests/kms_servers/azure.py holding this key; the current code no longer writes
that envelope, so they are kept verbatim. The 0x02 entries are written by
today's ``wrap``; PS256 and RSA-OAEP are randomised, so a rerun gives other
bytes that must unwrap the same.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from aiocrypt.kek.azure import AzureKeyVaultKekProvider
from tests.kms_servers import start_azure_keyvault_server

PATH = Path(__file__).parent / "azure_kek.json"
SIGNED_CASES = [
    (
        {"aiocrypt_key_id": "pii-v1-0a1b2c3d", "aiocrypt_key_type": "pii"},
        bytes(range(64, 96)),
        True,
    ),
    ({"aiocrypt_purpose": "file-store-mac"}, bytes(range(96, 128)), False),
]


async def signed_entries(data: dict[str, Any]) -> list[dict[str, Any]]:
    key = serialization.load_pem_private_key(data["private_key_pem"].encode(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    entries = []
    with start_azure_keyvault_server() as server:
        server.import_rsa_key(data["key_name"], key, data["key_version"])
        for context, dek, versioned in SIGNED_CASES:
            suffix = f"/{data['key_version']}" if versioned else ""
            provider = AzureKeyVaultKekProvider(
                f"{server.url}/keys/{data['key_name']}{suffix}",
                credential=server.async_credential(),
                client_kwargs=server.client_kwargs,
            )
            try:
                wrapped = await provider.wrap(dek, context)
                assert await provider.unwrap(wrapped, context) == dek
            finally:
                await provider.close()
            entries.append(
                {
                    "envelope": 2,
                    "configured_version": versioned,
                    "context": context,
                    "dek": dek.hex(),
                    "wrapped": wrapped.hex(),
                }
            )
    return entries


def main() -> None:
    data = json.loads(PATH.read_text())
    legacy = [v for v in data["vectors"] if v["envelope"] == 1]
    data["vectors"] = legacy + asyncio.run(signed_entries(data))
    PATH.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
