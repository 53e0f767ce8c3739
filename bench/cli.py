"""The bench command line: pick scenarios, run them one after another, print tables or JSON."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from bench.context import Context, Options
from bench.procs import BenchError
from bench.report import Check, ScenarioResult, as_json, render

SCENARIOS = {
    "front": "bench.scenario_front",
    "memory": "bench.scenario_memory",
    "fullpath": "bench.scenario_fullpath",
    "storm": "bench.scenario_storm",
}


class Interrupted(Exception):
    """SIGTERM or SIGINT: unwind so that every child and namespace is cleaned up."""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="metaproxy benchmarks: front only, memory per network, full path, boot "
        "storm. Needs root (namespaces), wrk, nginx and haproxy. Prints tables.",
    )
    parser.add_argument(
        "--scenario",
        "-s",
        action="append",
        choices=sorted(SCENARIOS),
        help="run only this scenario (repeatable; default: all)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short runs (1 round, 2 s, smaller sizes)"
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 6, quick 2)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--markdown", action="store_true", help="print tables as Markdown")
    parser.add_argument("--save", type=Path, help="also write the JSON result to this file")
    parser.add_argument(
        "--report", type=Path, help="also write a Markdown report (command, machine, tables)"
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="--log-level of the metaproxy processes measured (default WARNING; INFO adds the "
        "per-request access log)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="front scenario: also profile the builtin front with py-spy (the bench extra) "
        "during one extra run, keep the raw profile in FILE and print its top lines",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    return parser


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout or done.stderr).strip()
    first = text.splitlines()[0] if text else "?"
    return first.split(" - ")[0].split(" Copyright")[0].strip()


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    repo = Path(__file__).resolve().parent.parent
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "haproxy": _version(["/usr/sbin/haproxy", "-v"]),
        "nginx": _version(["/usr/sbin/nginx", "-v"]),
        "wrk": _version(["/usr/bin/wrk", "-v"]),
        "commit": _version(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"]),
        "loadavg_start": os.getloadavg()[0],
    }


def markdown_report(meta: dict[str, Any], results: list[ScenarioResult]) -> str:
    """The whole run as a Markdown document: how it was produced, then every table."""
    lines = [
        "# metaproxy benchmark results",
        "",
        f"Command (as root, from the repository root): `{meta['command']}`",
        "",
        f"- date: {meta['date']}; commit {meta['commit']}",
        f"- machine: {meta['cpu']}, {meta['cores']} cores, Linux {meta['kernel']}, "
        f"Python {meta['python']}",
        f"- tools: {meta['haproxy']}; {meta['nginx']}; {meta['wrk']}",
        f"- load average (1 min) at start {meta['loadavg_start']:.2f}, "
        f"at end {meta.get('loadavg_end', 0.0):.2f} (the machine is shared; see the notes)",
        "",
        render(results, markdown=True),
    ]
    return "\n".join(lines)


def run_scenario(name: str, options: Options) -> ScenarioResult:
    module = importlib.import_module(SCENARIOS[name])
    ctx = Context.create(options, name)
    started = time.monotonic()
    try:
        result: ScenarioResult = module.run(ctx)
    except BenchError as exc:
        reason = str(exc).strip().splitlines()[-1][:160]
        result = ScenarioResult(name, module.TITLE, skipped=str(exc))
        result.checks.append(Check(f"{name}: every target", None, "-", None, f"skipped: {reason}"))
    finally:
        ctx.close()
    result.raw["seconds"] = round(time.monotonic() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, port binding)", file=sys.stderr)
        return 2
    options = Options(
        quick=args.quick,
        rounds=args.rounds or (1 if args.quick else 5),
        duration=args.duration or (2.0 if args.quick else 6.0),
        log_level=args.log_level,
        verbose=args.verbose,
        profile=args.profile.absolute() if args.profile else None,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    meta = machine()
    meta["command"] = " ".join(["bench/run", *(argv if argv is not None else sys.argv[1:])])
    results: list[ScenarioResult] = []
    try:
        for name in args.scenario or list(SCENARIOS):
            if options.verbose:
                print(f"[bench] scenario {name}", file=sys.stderr, flush=True)
            results.append(run_scenario(name, options))
            if not args.json:
                print(render(results[-1:], markdown=args.markdown, checks=False), flush=True)
    except Interrupted as exc:
        print(f"bench: interrupted ({exc}); cleaned up", file=sys.stderr)
        return 130
    meta["loadavg_end"] = os.getloadavg()[0]
    document = as_json(meta, results)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(document, indent=2) + "\n")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(markdown_report(meta, results))
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        summary = [
            ScenarioResult("summary", "Summary", checks=[c for r in results for c in r.checks])
        ]
        print(render(summary, markdown=args.markdown))
    return 0
