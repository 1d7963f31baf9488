"""Run every benchmark and write docs/performance.md and its charts (docs/img/*.png).

    ./dev bench                       # everything, the figures the docs quote (< 10 min)
    ./dev bench --quick               # a short smoke run, written to a temp dir
    ./dev bench --only fields,batch   # some sections; the others keep their last figures

Sections: fields, batch, streams (bulk, streams, files, loop lag, openssl speed;
``bulk`` is an alias), reencrypt and legacy (need PostgreSQL), sessions (needs Redis).
The raw figures go to bench/results.json (for the docs run; to
``<out-dir>/results.json`` otherwise), so that ``--only`` can re-render the
sections it did not run with their last figures and dates. Every verdict in
the report is computed from the figures; nothing in it is typed in by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402
import report  # noqa: E402

SECTIONS = ("fields", "batch", "streams", "reencrypt", "legacy", "sessions")
ALIASES = {
    "bulk": "streams",
    "stream": "streams",
    "file": "streams",
    "lag": "streams",
    "field": "fields",
    "session": "sessions",
    "reencryption": "reencrypt",
    "migration": "legacy",
}


def parse_only(value: str | None) -> set[str]:
    if not value:
        return set(SECTIONS)
    chosen = set()
    for name in value.split(","):
        name = ALIASES.get(name.strip(), name.strip())
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
        chosen.add(name)
    return chosen


def run_reencrypt(quick: bool) -> dict[str, Any]:
    import bench_reencrypt

    dsn = os.environ.get("ENCRYPTION_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    config = (
        {"rows": 20_000, "naive_rows": 1_000, "rounds": 1}
        if quick
        else {"rows": 200_000, "naive_rows": 3_000, "rounds": 3}
    )
    return asyncio.run(bench_reencrypt.run(dsn=dsn, batch_size=2000, **config))


def run_sessions(quick: bool) -> dict[str, Any]:
    import bench_sessions

    argv = (
        ["--bursts", "2", "--requests", "400", "--connections", "8"]
        if quick
        else ["--bursts", "8", "--requests", "1600", "--seconds", "3"]
    )
    args = bench_sessions.arguments(argv)
    rps = asyncio.run(bench_sessions.bench(args))
    return {
        "bursts": args.bursts,
        "requests": args.requests,
        "connections": args.connections,
        "rps": {f"{scenario}/{variant}": values for (scenario, variant), values in rps.items()},
    }


def run_section(name: str, quick: bool) -> dict[str, Any]:
    if name in ("fields", "batch"):
        import bench_fields

        return bench_fields.run(quick=quick, only={name})[name]  # type: ignore[no-any-return]
    if name == "streams":
        import bench_bulk

        return bench_bulk.run(quick=quick)
    if name == "reencrypt":
        return run_reencrypt(quick)
    if name == "legacy":
        import bench_legacy_migration

        dsn = os.environ.get("ENCRYPTION_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
        return asyncio.run(bench_legacy_migration.run(dsn=dsn, rows=5_000 if quick else 100_000))
    if name == "sessions":
        return run_sessions(quick)
    raise AssertionError(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short smoke run with small sizes (written to a temp dir unless --out-dir is given)",
    )
    parser.add_argument("--only", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="where performance.md and img/ go (default: docs, or a temp dir with --quick)",
    )
    parser.add_argument("--no-charts", action="store_true")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: rewrite performance.md and the charts from the saved figures",
    )
    args = parser.parse_args()
    only = set() if args.render_only else parse_only(args.only)
    out_dir: Path = args.out_dir or (
        Path(tempfile.gettempdir()) / "aiocrypt-bench-quick" if args.quick else ROOT / "docs"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = (
        HERE / "results.json"
        if out_dir.resolve() == (ROOT / "docs").resolve()
        else out_dir / "results.json"
    )
    previous: dict[str, Any] = {}
    if results_path.exists():
        previous = json.loads(results_path.read_text())
    if args.render_only and not previous:
        raise SystemExit(f"no saved figures in {results_path}")
    machine = previous["machine"] if args.render_only else _common.machine_info()
    results: dict[str, Any] = {
        "machine": machine,
        "quick": previous["quick"] if args.render_only else args.quick,
        "sections": dict(previous.get("sections", {})),
    }
    started = time.monotonic()
    failed: list[str] = []
    for name in SECTIONS:
        if name not in only:
            continue
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        try:
            figures = run_section(name, args.quick)
        except Exception as exc:  # a section that cannot run is reported, the rest go on
            traceback.print_exc()
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            kept = results["sections"].get(name)
            if kept and not kept["figures"].get("error"):
                # keep the last good figures (with their date); say this run failed
                results["sections"][name] = {**kept, "failed": error}
            else:
                results["sections"][name] = {
                    "date": machine["date"],
                    "quick": args.quick,
                    "seconds": round(time.monotonic() - t0, 1),
                    "figures": {"error": error},
                }
            failed.append(name)
            continue
        results["sections"][name] = {
            "date": machine["date"],
            "quick": args.quick,
            "seconds": round(time.monotonic() - t0, 1),
            "figures": figures,
        }
        print(f"== {name}: {time.monotonic() - t0:.0f} s", flush=True)
    results["seconds"] = round(time.monotonic() - started, 1)
    if not args.render_only:
        results_path.write_text(json.dumps(results, indent=1) + "\n")
    charts = {} if args.no_charts else report.charts(results, out_dir / "img")
    text = report.render(results, charts)
    (out_dir / "performance.md").write_text(text)
    saved = "from" if args.render_only else "and"
    print(
        f"wrote {out_dir / 'performance.md'} ({len(charts)} charts) {saved} {results_path} "
        f"in {results['seconds']:.0f} s"
    )
    verdicts = report.targets(results)
    for target in verdicts:
        print(f"  {target['verdict']:7} {target['target']}: {target['figure']}")
    if failed:
        print(f"sections that failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
