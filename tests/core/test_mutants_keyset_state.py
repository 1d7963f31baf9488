"""``aiocrypt._keyset_state``: the host's high-water marks never go down, and a damaged
file is refused, never read as empty (mutation survivors, issue 21)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from aiocrypt import ConfigurationError
from aiocrypt._keyset_state import KeysetState, KeysetStateFile

FORMAT = "aiocrypt.keyset-state"


def test_merge_keeps_the_highest_of_each_mark() -> None:
    state = KeysetState({"a": 5, "b": 1}, {"k1": 10, "k2": 3})
    state.merge(KeysetState({"a": 4, "b": 2, "c": 7}, {"k1": 9, "k2": 3, "k3": 1}))
    assert state.revisions == {"a": 5, "b": 2, "c": 7}
    assert state.usage == {"k1": 10, "k2": 3, "k3": 1}
    empty = KeysetState()
    empty.merge(KeysetState({"a": 0}, {"k": 0}))
    assert (empty.revisions, empty.usage) == ({"a": 0}, {"k": 0})


def test_a_missing_file_is_an_empty_state_and_raise_to_writes_it(tmp_path: Path) -> None:
    path = tmp_path / "keyset.json"
    f = KeysetStateFile(path)
    assert repr(f) == f"<KeysetStateFile {str(path)!r}>"
    assert f.read() == KeysetState()
    state = f.raise_to({"store": 3}, {"k1": 40})
    assert (state.revisions, state.usage) == ({"store": 3}, {"k1": 40})
    assert json.loads(path.read_bytes()) == {
        "format": FORMAT,
        "revisions": {"store": 3},
        "usage": {"k1": 40},
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lock = tmp_path / ".keyset.json.lock"
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600


def test_raise_to_never_lowers_and_writes_only_on_a_change(tmp_path: Path) -> None:
    path = tmp_path / "keyset.json"
    f = KeysetStateFile(path)
    f.raise_to({"store": 3}, {"k1": 40})
    inode = path.stat().st_ino
    state = f.raise_to({"store": 2}, {"k1": 39})
    assert (state.revisions, state.usage) == ({"store": 3}, {"k1": 40})
    assert path.stat().st_ino == inode  # nothing rose: not rewritten
    state = f.raise_to({"store": 4}, {})
    assert state.revisions == {"store": 4} and path.stat().st_ino != inode
    state = f.raise_to({}, {"k2": 1})
    assert f.read() == state == KeysetState({"store": 4}, {"k1": 40, "k2": 1})


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[]",
        b'"x"',
        json.dumps({"format": "other"}).encode(),
        json.dumps({"revisions": {}, "usage": {}}).encode(),
        json.dumps({"format": FORMAT, "usage": {}}).encode(),
        json.dumps({"format": FORMAT, "revisions": {}}).encode(),
        json.dumps({"format": FORMAT, "revisions": 5, "usage": {}}).encode(),
        json.dumps({"format": FORMAT, "revisions": {"a": "x"}, "usage": {}}).encode(),
        json.dumps({"format": FORMAT, "revisions": {}, "usage": {"k": None}}).encode(),
        b"[" * 100000,
    ],
)
def test_an_unreadable_file_is_refused_not_trusted_as_empty(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "keyset.json"
    path.write_bytes(content)
    for call in (KeysetStateFile(path).read, lambda: KeysetStateFile(path).raise_to({"s": 1}, {})):
        with pytest.raises(ConfigurationError, match="is unreadable: it is refused"):
            call()
    assert path.read_bytes() == content


def test_a_file_over_16_mib_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keyset.json"
    doc = {"format": FORMAT, "revisions": {}, "usage": {}}
    text = json.dumps(doc).encode()
    limit = 16 * 1024 * 1024
    path.write_bytes(text + b" " * (limit - len(text)))  # exactly the limit: read
    assert KeysetStateFile(path).read() == KeysetState()
    path.write_bytes(text + b" " * (limit + 1 - len(text)))
    with pytest.raises(ConfigurationError, match="unreadable"):
        KeysetStateFile(path).read()


def test_the_directory_must_exist(tmp_path: Path) -> None:
    f = KeysetStateFile(tmp_path / "missing" / "keyset.json")
    with pytest.raises(ConfigurationError, match=r"keyset state directory .* does not exist"):
        f.read()
    assert not os.path.exists(tmp_path / "missing")


def test_negative_marks_merge_as_zero_into_an_empty_state() -> None:
    state = KeysetState()
    state.merge(KeysetState({"a": -5}, {"k": -3}))
    assert (state.revisions, state.usage) == ({"a": 0}, {"k": 0})


def test_the_state_has_no_instance_dict() -> None:
    assert not hasattr(KeysetState(), "__dict__")


def test_the_file_is_written_with_sorted_keys(tmp_path: Path) -> None:
    path = tmp_path / "keyset.json"
    KeysetStateFile(path).raise_to({"b": 1, "a": 2}, {"z": 1, "y": 2})
    assert path.read_text() == json.dumps(
        {"format": FORMAT, "revisions": {"a": 2, "b": 1}, "usage": {"y": 2, "z": 1}}, sort_keys=True
    )


def test_reads_and_raises_hold_the_lock(tmp_path: Path) -> None:
    import fcntl

    path = tmp_path / "keyset.json"
    f = KeysetStateFile(path)
    held: list[bool] = []

    def probe() -> None:  # a second open file description of the lock file
        fd = os.open(tmp_path / ".keyset.json.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(True)
        else:
            held.append(False)
        finally:
            os.close(fd)

    inner = f._read_unlocked

    def read_and_probe() -> KeysetState:
        probe()
        return inner()

    f._read_unlocked = read_and_probe  # type: ignore[method-assign]
    f.read()
    f.raise_to({"s": 1}, {})
    assert held == [True, True]
    probe()
    assert held[-1] is False  # released afterwards
