"""Subject keys in Redis (``RedisKeyStore.subject_store()``), under the key store's prefix.

* ``<prefix>subjects:id``      hash: subject key id -> record JSON (live or forgotten)
* ``<prefix>subjects:lookup``  hash: lookup hash -> live key id, or a tombstone's JSON
* ``<prefix>subjects:wrap:<wrapping key id>``  sorted set (score 0) of the live key ids
  that key wraps: ``ZRANGEBYLEX`` pages through them, ``ZCARD`` counts them

One hash field per subject key, so a million subjects cost a million fields and
every read is O(1). Each change is one Lua script over keys it declares: an
insert takes the lookup field only if it is free (``HSETNX``), a forget deletes
the lookup only if it still names the key, a rewrap replaces a record only if it
is still wrapped by the key it was read under.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

from .._subjects import SubjectKeyRecord
from ._subjects_base import SubjectKeyStore

if TYPE_CHECKING:
    from .redis import RedisKeyStore

__all__ = ["RedisSubjectKeyStore"]

# KEYS: id hash, lookup hash. ARGV: lookup
_FIND: Final = """
local v = redis.call('HGET', KEYS[2], ARGV[1])
if not v or string.sub(v, 1, 1) == '{' then return v end
return redis.call('HGET', KEYS[1], v)
"""
# KEYS: id hash, lookup hash, wrap zset. ARGV: lookup, key id, record
_INSERT: Final = """
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  redis.call('ZADD', KEYS[3], 0, ARGV[2])
  return ARGV[3]
end
local v = redis.call('HGET', KEYS[2], ARGV[1])
if string.sub(v, 1, 1) == '{' then return v end
return redis.call('HGET', KEYS[1], v)
"""
# KEYS: id hash, lookup hash, wrap zset. ARGV: lookup, key id ('' for none), marker, tombstone
_FORGET: Final = """
if ARGV[2] ~= '' then
  if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then
    redis.call('HDEL', KEYS[2], ARGV[1])
  end
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  redis.call('ZREM', KEYS[3], ARGV[2])
end
if ARGV[4] ~= '' then
  redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[4])
end
return 1
"""
# KEYS: id hash, old wrap zset, new wrap zset. ARGV: old wrapping id, id1, record1, ...
_REWRAP: Final = """
local done = 0
for i = 2, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if cur then
    local doc = cjson.decode(cur)
    if doc['state'] == 'live' and doc['wrapping_key_id'] == ARGV[1] then
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
      redis.call('ZREM', KEYS[2], ARGV[i])
      redis.call('ZADD', KEYS[3], 0, ARGV[i])
      done = done + 1
    end
  end
end
return done
"""


class RedisSubjectKeyStore(SubjectKeyStore):
    """Subject keys beside a ``RedisKeyStore``'s records, over its client."""

    name = "redis"

    def __init__(self, keystore: RedisKeyStore) -> None:
        self._keystore = keystore
        client = keystore._redis
        prefix = keystore.prefix
        self._k_id = f"{prefix}subjects:id"
        self._k_lookup = f"{prefix}subjects:lookup"
        self._k_wrap = f"{prefix}subjects:wrap:"
        self._redis = client
        self._find = client.register_script(_FIND)
        self._insert = client.register_script(_INSERT)
        self._forget = client.register_script(_FORGET)
        self._rewrap = client.register_script(_REWRAP)
        self._where = f"Redis subject-key store (prefix {prefix!r})"

    def __repr__(self) -> str:
        return f"<RedisSubjectKeyStore prefix={self._keystore.prefix!r}>"

    def _parse(self, raw: bytes | str | None) -> SubjectKeyRecord | None:
        return None if raw is None else SubjectKeyRecord.from_json(raw, self._where)

    async def find(self, lookup: str) -> SubjectKeyRecord | None:
        with self._keystore._translate("find a subject key"):
            raw = await self._find(keys=[self._k_id, self._k_lookup], args=[lookup])
        return self._parse(raw)

    async def get(self, key_id: str) -> SubjectKeyRecord | None:
        with self._keystore._translate("read a subject key"):
            raw = await self._redis.hget(self._k_id, key_id)
        return self._parse(raw)

    async def insert(self, record: SubjectKeyRecord) -> SubjectKeyRecord:
        with self._keystore._translate("insert a subject key"):
            raw = await self._insert(
                keys=[self._k_id, self._k_lookup, self._k_wrap + record.wrapping_key_id],
                args=[record.lookup, record.key_id, record.to_json()],
            )
        found = self._parse(raw)
        assert found is not None
        return found

    async def insert_many(self, records: Sequence[SubjectKeyRecord]) -> int:
        filed = 0
        with self._keystore._translate("insert subject keys"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for record in records:  # queued on the pipeline, sent by execute()
                    await self._insert(
                        keys=[self._k_id, self._k_lookup, self._k_wrap + record.wrapping_key_id],
                        args=[record.lookup, record.key_id, record.to_json()],
                        client=pipe,
                    )
                results = await pipe.execute()
        for record, raw in zip(records, results, strict=True):
            doc = json.loads(raw)
            filed += doc.get("key_id") == record.key_id
        return filed

    async def forget(
        self, lookup: str, record: SubjectKeyRecord | None, tombstone: SubjectKeyRecord | None
    ) -> None:
        wrapping = record.wrapping_key_id if record is not None else ""
        with self._keystore._translate("forget a subject key"):
            await self._forget(
                keys=[self._k_id, self._k_lookup, self._k_wrap + wrapping],
                args=[
                    lookup,
                    "" if record is None else record.key_id,
                    "" if record is None else record.forgotten().to_json(),
                    "" if tombstone is None else tombstone.to_json(),
                ],
            )

    async def rewrap(self, records: Sequence[SubjectKeyRecord], previous: str) -> int:
        if not records:
            return 0
        new = {r.wrapping_key_id for r in records}
        if len(new) != 1:
            raise ValueError("a rewrap batch goes to one wrapping key")
        args: list[Any] = [previous]
        for record in records:
            args += [record.key_id, record.to_json()]
        with self._keystore._translate("rewrap subject keys"):
            done = await self._rewrap(
                keys=[self._k_id, self._k_wrap + previous, self._k_wrap + new.pop()], args=args
            )
        return int(done)

    async def wrapped_by(
        self, wrapping_key_id: str, *, after: str = "", limit: int = 1000
    ) -> list[SubjectKeyRecord]:
        with self._keystore._translate("page through subject keys"):
            ids = await self._redis.zrangebylex(
                self._k_wrap + wrapping_key_id,
                f"({after}" if after else "-",
                "+",
                start=0,
                num=limit,
            )
            raws = await self._redis.hmget(self._k_id, ids) if ids else []
        return [r for r in map(self._parse, raws) if r is not None]

    async def census(self, wrapping_key_ids: Iterable[str]) -> dict[str, int]:
        ids = list(wrapping_key_ids)
        with self._keystore._translate("count subject keys"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for key_id in ids:
                    pipe.zcard(self._k_wrap + key_id)
                counts = await pipe.execute()
        return {key_id: int(n) for key_id, n in zip(ids, counts, strict=True)}
