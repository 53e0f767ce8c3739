"""Scenario 1, front only: wrk → front → nginx on a Unix socket, six fronts interleaved."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict

from bench import fronts, profiler, systems, wrk
from bench.context import Context
from bench.report import Column, ScenarioResult, Table, at_least, at_most, median, ratio

NAME = "front"
TITLE = "1. Front only: wrk -> front -> nginx (Unix socket)"
PATH = "/latest/meta-data/instance-id"
CONNECTIONS = (1, 32)


def run(ctx: Context) -> ScenarioResult:
    opts = ctx.options
    result = ScenarioResult(NAME, TITLE)
    nginx, backend = systems.start_nginx(ctx.workdir)
    ctx.track(nginx)
    all_fronts = [
        fronts.start_engine(ctx, "builtin", backend, network_id=systems.NETWORK_ID),
        # What a builtin front does behind Neutron's agent, which does not echo sequence numbers.
        fronts.start_engine(ctx, "builtin", backend, network_id=systems.NETWORK_ID, pipeline=1),
        fronts.start_engine(ctx, "builtin", backend, network_id=systems.NETWORK_ID, workers=2),
        fronts.start_engine(ctx, "haproxy", backend, network_id=systems.NETWORK_ID),
        fronts.start_reference(ctx, "neutron", backend),
        fronts.start_reference(ctx, "keepalive", backend),
    ]
    for f in all_fronts:
        fronts.probe(f, PATH)
    live = [f for f in all_fronts if f.up]
    script = wrk.write_script(ctx.workdir)
    for f in live:  # warm up: imports, pools, first connections
        wrk.run(f.url(PATH), connections=8, seconds=1, script=script)

    samples: dict[tuple[str, int], list[fronts.Sample]] = defaultdict(list)
    for rnd in range(opts.rounds):
        shift = rnd % len(live)
        for f in live[shift:] + live[:shift]:
            for conns in CONNECTIONS:
                ctx.log(f"round {rnd + 1}/{opts.rounds} {f.name} c={conns}")
                samples[(f.name, conns)].append(
                    fronts.measure(f, PATH, conns, opts.duration, script, rnd)
                )

    def med(name: str, conns: int, attr: str) -> float | None:
        values = [getattr(s, attr) for s in samples.get((name, conns), [])]
        return median([v for v in values if v is not None])

    table = Table(
        f"requests/s, latency and CPU: medians of {opts.rounds} round(s) x {opts.duration:g} s",
        [
            Column("front"),
            Column("conns", "d"),
            Column("req/s", ",.0f"),
            Column("p50 ms", ".3f"),
            Column("p99 ms", ".3f"),
            Column("CPU us/req", ".1f"),
            Column("x Neutron-haproxy", ".2f"),
            Column("x keep-alive haproxy", ".2f"),
            Column("errors", "d"),
        ],
    )
    for f in all_fronts:
        for conns in CONNECTIONS:
            if not f.up:
                table.add(f.label, conns, None, None, None, None, None, None, None)
                continue
            rps = med(f.name, conns, "rps")
            table.add(
                f.label,
                conns,
                rps,
                med(f.name, conns, "p50_ms"),
                med(f.name, conns, "p99_ms"),
                med(f.name, conns, "cpu_us_per_req"),
                ratio(rps, med("haproxy-neutron", conns, "rps")),
                ratio(rps, med("haproxy-keepalive", conns, "rps")),
                sum(s.errors for s in samples[(f.name, conns)]),
            )
    table.notes += [
        "wrk 4.1 (-t1, keep-alive, --latency percentiles from its Lua done() hook), "
        f"path {PATH}; fronts on 127.0.0.1, nginx (1 process) on a Unix socket",
        "wrk, the front and nginx share the machine's cores; nothing pinned; systems "
        "interleaved, order rotated each round",
        "CPU us/req: utime+stime of the front's processes (haproxy under metaproxy included) "
        "during the run / requests",
        f"metaproxy fronts run with --log-level {opts.log_level}; reference haproxies log nothing",
        "nginx echoes X-Metaproxy-Seq as metaproxy's agent does, so the builtin front pipelines "
        "GETs to it (default --pipeline 8); the --pipeline 1 row is the builtin front behind an "
        "agent that does not echo (Neutron's): one request per agent connection at a time",
    ]
    table.notes += [f"{f.label}: unavailable ({f.error})" for f in all_fronts if not f.up]
    for f in live:
        if any(s.errors for c in CONNECTIONS for s in samples[(f.name, c)]):
            table.notes += [f"{f.label} logged: {p}" for p in f.problems()]
    result.tables.append(table)

    builtin = all_fronts[0]
    if opts.profile is not None and builtin.up:
        if profiler.available():
            opts.profile.parent.mkdir(parents=True, exist_ok=True)
            result.tables += profiler.profile(builtin, PATH, opts.duration, script, opts.profile)
        else:
            table.notes.append(
                f"--profile: {profiler.PY_SPY} is missing (pip install -e '.[bench]')"
            )

    b_rps, n_rps = med("builtin", 32, "rps"), med("haproxy-neutron", 32, "rps")
    k_rps = med("haproxy-keepalive", 32, "rps")
    b_p99, n_p99 = med("builtin", 32, "p99_ms"), med("haproxy-neutron", 32, "p99_ms")
    result.checks += [
        at_least("front 32 conns: builtin / Neutron-haproxy req/s", ratio(b_rps, n_rps), 1.0),
        at_most("front 32 conns: builtin p99 / Neutron-haproxy p99", ratio(b_p99, n_p99), 1.0),
        at_least("front 32 conns: builtin / keep-alive haproxy req/s", ratio(b_rps, k_rps), 0.7),
    ]
    result.raw = {
        "samples": {f"{k[0]}@{k[1]}": [asdict(s) for s in v] for k, v in samples.items()},
        "unavailable": {f.name: f.error for f in all_fronts if not f.up},
        "neutron_rps_32": n_rps,
    }
    return result
