"""Every line left out of coverage says why (docs/testing.md).

A ``# pragma: no cover`` or ``# pragma: no branch`` in aiocrypt/ or integrations/
must be followed by `` - <reason>`` of a few words: an exclusion without its
reason is how dead or untested code hides from the coverage report.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRAGMA = re.compile(r"#\s*pragma:\s*no\s+(cover|branch)\b(?P<rest>.*)$")
REASON = re.compile(r"^ - \S+(\s+\S+){2,}")  # " - " and at least three words


def pragmas() -> list[tuple[str, int, str]]:
    found = []
    for top in ("aiocrypt", "integrations"):
        for path in sorted((ROOT / top).rglob("*.py")):
            for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
                match = PRAGMA.search(line)
                if match:
                    found.append((str(path.relative_to(ROOT)), number, match["rest"]))
    return found


def test_every_coverage_exclusion_gives_its_reason() -> None:
    found = pragmas()
    assert len(found) >= 20  # the scan sees the marks (there are more than twenty)
    missing = [f"{path}:{number}" for path, number, rest in found if not REASON.match(rest)]
    assert missing == [], "say why after the pragma: '# pragma: no cover - <reason>'"


def test_the_reason_pattern_refuses_a_bare_pragma() -> None:
    assert not REASON.match("")
    assert not REASON.match(" - defensive")
    assert REASON.match(" - Python before 3.12 only")
