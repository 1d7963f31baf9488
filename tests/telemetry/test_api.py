"""``aiocrypt._telemetry`` itself: outcomes, errors, nesting; and the no-op without
opentelemetry (not importable, or importable with no SDK configured)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest
from opentelemetry.trace import StatusCode

from aiocrypt import _telemetry
from aiocrypt._telemetry import annotate, count, span, traced

from .conftest import Telemetry


class SecretBearingError(Exception):
    pass


def test_outcome_ok_by_default_and_set_by_the_body(otel: Telemetry) -> None:
    with span("aiocrypt.test.plain", key_type="pii"):
        pass
    with span("aiocrypt.test.set", key_type="pii") as op:
        op.set(outcome="unchanged", rows=3)
    assert dict(otel.one("aiocrypt.test.plain").attributes or {}) == {
        "aiocrypt.key_type": "pii",
        "aiocrypt.outcome": "ok",
    }
    assert dict(otel.one("aiocrypt.test.set").attributes or {}) == {
        "aiocrypt.key_type": "pii",
        "aiocrypt.outcome": "unchanged",
        "aiocrypt.rows": 3,
    }
    assert otel.metric("aiocrypt.test.set.duration", key_type="pii", outcome="unchanged") == 1


def test_an_error_is_recorded_by_type_and_raised_unchanged(otel: Telemetry) -> None:
    error = SecretBearingError("the value was hunter2")
    with pytest.raises(SecretBearingError) as caught, span("aiocrypt.test.fails") as op:
        op.set(outcome="rotated")
        raise error
    assert caught.value is error and caught.value.__traceback__ is not None
    recorded = otel.one("aiocrypt.test.fails")
    assert recorded.status.status_code is StatusCode.ERROR
    assert recorded.status.description is None
    assert dict(recorded.attributes or {}) == {
        "aiocrypt.outcome": "error",
        "error.type": f"{__name__}.SecretBearingError",
    }
    assert [dict(e.attributes or {}) for e in recorded.events] == [
        {"exception.type": f"{__name__}.SecretBearingError"}
    ]
    assert "hunter2" not in otel.dumps()


async def test_a_cancelled_operation_is_not_an_error(otel: Telemetry) -> None:
    @traced("aiocrypt.test.cancelled")
    async def wait() -> None:
        await asyncio.sleep(30)

    task = asyncio.ensure_future(wait())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    recorded = otel.one("aiocrypt.test.cancelled")
    assert recorded.status.status_code is StatusCode.UNSET
    assert dict(recorded.attributes or {}) == {"aiocrypt.outcome": "cancelled"}


async def test_traced_annotates_the_innermost_operation(otel: Telemetry) -> None:
    @traced("aiocrypt.test.inner", key_type="pii")
    async def inner(rows: int) -> int:
        annotate(rows=rows)
        return rows * 2

    @traced("aiocrypt.test.outer")
    async def outer() -> int:
        annotate(table="users")
        doubled = await inner(4)
        annotate(batches=1)
        return doubled

    assert await outer() == 8
    annotate(ignored=True)  # outside any operation: nothing happens
    inner_span, outer_span = otel.one("aiocrypt.test.inner"), otel.one("aiocrypt.test.outer")
    assert inner_span.parent is not None
    assert inner_span.parent.span_id == outer_span.context.span_id
    assert dict(inner_span.attributes or {}) == {
        "aiocrypt.key_type": "pii",
        "aiocrypt.rows": 4,
        "aiocrypt.outcome": "ok",
    }
    assert dict(outer_span.attributes or {}) == {
        "aiocrypt.table": "users",
        "aiocrypt.batches": 1,
        "aiocrypt.outcome": "ok",
    }


def test_count_adds_to_a_counter(otel: Telemetry) -> None:
    count("aiocrypt.test.things", 3, key_type="pii")
    count("aiocrypt.test.things", key_type="pii")
    assert otel.metric("aiocrypt.test.things", key_type="pii") == 4


def test_span_durations_are_labelled_by_the_metric_attributes_only(otel: Telemetry) -> None:
    with span(
        "aiocrypt.test.labels",
        key_type="pii",
        key_id="pii-v1-00aa11bb",
        rows=9,
        reason="forced",
        table="users",
        provider="local",
        operation="wrap",
    ):
        pass
    labels = [
        attrs for name, attrs in otel.metric_labels() if name == "aiocrypt.test.labels.duration"
    ]
    assert labels == [
        {
            "aiocrypt.key_type": "pii",
            "aiocrypt.reason": "forced",
            "aiocrypt.table": "users",
            "aiocrypt.provider": "local",
            "aiocrypt.operation": "wrap",
            "aiocrypt.outcome": "ok",
        }
    ]


# -- without opentelemetry ------------------------------------------------------------

_FLOW = """
import asyncio
from aiocrypt import KeyType, _telemetry
from aiocrypt.testing import make_service

async def main():
    async with make_service() as svc:
        token = await svc.encrypt_field("ada", KeyType.PII, context="users.name")
        await svc.key_manager.rotate_key(KeyType.PII, force=True)
        await svc.key_manager.run_rotation_policy()
        assert await svc.decrypt_field(token, KeyType.PII, context="users.name") == "ada"

    @_telemetry.traced("aiocrypt.test.decorated")
    async def decorated():
        _telemetry.annotate(rows=1)
        return 5

    assert await decorated() == 5
    with _telemetry.span("aiocrypt.test.span", key_type="pii") as op:
        op.set(outcome="fine")
    try:
        with _telemetry.span("aiocrypt.test.error"):
            raise KeyError("x")
    except KeyError:
        pass
    else:
        raise AssertionError("the error was swallowed")
    _telemetry.count("aiocrypt.test.count", 2, key_type="pii")

asyncio.run(main())
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_everything_works_when_opentelemetry_cannot_be_imported() -> None:
    out = run(
        "import sys\nsys.modules['opentelemetry'] = None  # import fails\n"
        + _FLOW
        + """
assert _telemetry._backend() is None
print("no-op")
"""
    ).stdout
    assert out.split() == ["no-op"]


def test_a_broken_install_is_reported_once_and_not_used() -> None:
    done = run(
        """
import importlib.abc, sys

class Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise RuntimeError("a half-upgraded environment")

sys.meta_path.insert(0, Broken())
"""
        + _FLOW
        + """
assert _telemetry._backend() is None
print("broken")
"""
    )
    assert done.stdout.split() == ["broken"]
    assert done.stderr.count("OpenTelemetry is installed but failed to load (RuntimeError)") == 1


def test_everything_works_with_the_api_and_no_sdk() -> None:
    out = run(
        _FLOW
        + """
import sys
from opentelemetry import trace
assert _telemetry._backend() is not None
assert "opentelemetry.sdk" not in sys.modules
with _telemetry.span("aiocrypt.test.unrecorded"):
    assert not trace.get_current_span().is_recording()
print("api-only")
"""
    ).stdout
    assert out.split() == ["api-only"]


def test_importing_aiocrypt_does_not_import_opentelemetry() -> None:
    out = run("""
import sys
import aiocrypt, aiocrypt.cli, aiocrypt.kek, aiocrypt.reencrypt, aiocrypt.testing
print(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"))
""").stdout
    assert out.split() == ["[]"]
    assert _telemetry._backend() is not None  # this process has the SDK: it is used
