"""Scenario 3, full path: wrk → front → agent → embedded metadata server, warm and cold cache,
next to the front-only Neutron-config haproxy in the same run."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict

from bench import fronts, inventory, stack, systems, wrk
from bench.context import Context
from bench.procs import BenchError, free_port
from bench.report import Column, ScenarioResult, Table, at_least, at_most, median, ratio

NAME = "fullpath"
TITLE = "3. Full path: wrk -> front -> agent -> embedded metadata server"
PATHS = ("/openstack/latest/meta_data.json", "/latest/meta-data/instance-id")
CONNS = 32


def run(ctx: Context) -> ScenarioResult:
    opts = ctx.options
    result = ScenarioResult(NAME, TITLE)
    # wrk connects from 127.0.0.1: the store holds a port with that address on the network.
    host = stack.start_host(ctx, ["127.0.0.1"])
    warm = stack.start_agent(ctx, host, "agent-warm", None)
    cold = stack.start_agent(ctx, host, "agent-cold", 0.0)
    nginx, backend = systems.start_nginx(ctx.workdir)
    ctx.track(nginx)

    systems_under_test: list[tuple[fronts.Front, stack.Agent | None, str]] = []
    for engine, agent, label in (
        ("builtin", warm, "builtin -> agent (warm cache)"),
        ("builtin", cold, "builtin -> agent (cold: cache_ttl 0)"),
        ("haproxy", warm, "haproxy engine -> agent (warm cache)"),
    ):
        front = fronts.start_engine(
            ctx, engine, agent.socket, network_id=inventory.NETWORK_ID, tag=f"{engine}-{agent.name}"
        )
        front.name, front.label = f"{engine}/{agent.name}", label
        if front.child is not None:
            front.also = [agent.child.pid, host.server.pid]
        systems_under_test.append((front, agent, "full"))
    up = fronts.Front("up", "metaproxy up (front worker -> in-process agent and server)")
    try:
        up.port = free_port()
        up.child = stack.start_up(ctx, ["127.0.0.1"], up.port)
    except BenchError as exc:
        up.error = str(exc).splitlines()[-1][:200]
    systems_under_test.append((up, None, "full"))
    neutron = fronts.start_reference(ctx, "neutron", backend)
    neutron.label = "haproxy, Neutron config -> nginx (front only)"
    systems_under_test.append((neutron, None, "front"))

    script = wrk.write_script(ctx.workdir)
    for front, _, _ in systems_under_test:
        fronts.probe(front, PATHS[0])
        if front.up:  # warm up, and fill the warm agent's cache
            wrk.run(front.url(PATHS[0]), connections=8, seconds=1, script=script)
    live = [s for s in systems_under_test if s[0].up]

    samples: dict[tuple[str, str], list[fronts.Sample]] = defaultdict(list)
    queries: dict[tuple[str, str], list[float]] = defaultdict(list)
    for rnd in range(opts.rounds):
        shift = rnd % len(live)
        for front, agent, kind in live[shift:] + live[:shift]:
            for path in PATHS if kind == "full" else PATHS[1:]:
                ctx.log(f"round {rnd + 1}/{opts.rounds} {front.name} {path}")
                before = agent.store_queries() if agent else 0
                sample = fronts.measure(front, path, CONNS, opts.duration, script, rnd)
                samples[(front.name, path)].append(sample)
                if agent is not None and sample.requests:
                    queries[(front.name, path)].append(
                        (agent.store_queries() - before) / sample.requests
                    )

    def med(name: str, path: str, attr: str) -> float | None:
        return median([getattr(s, attr) for s in samples.get((name, path), [])])

    neutron_rps = med(neutron.name, PATHS[1], "rps")
    table = Table(
        f"{CONNS} keep-alive connections: medians of {opts.rounds} round(s) x {opts.duration:g} s",
        [
            Column("system"),
            Column("path"),
            Column("req/s", ",.0f"),
            Column("p50 ms", ".3f"),
            Column("p99 ms", ".3f"),
            Column("CPU us/req", ".0f"),
            Column("store queries/req", ".3f"),
            Column("x Neutron-haproxy front only", ".2f"),
            Column("errors", "d"),
        ],
    )
    for front, _, kind in systems_under_test:
        for path in PATHS if kind == "full" else PATHS[1:]:
            if not front.up:
                table.add(front.label, path, None, None, None, None, None, None, None)
                continue
            rps = med(front.name, path, "rps")
            table.add(
                front.label,
                path,
                rps,
                med(front.name, path, "p50_ms"),
                med(front.name, path, "p99_ms"),
                med(front.name, path, "cpu_us_per_req"),
                median(queries.get((front.name, path), [])),
                ratio(rps, neutron_rps),
                sum(s.errors for s in samples[(front.name, path)]),
            )
    table.notes += [
        "wrk -t1 from 127.0.0.1 (the store maps that address to one instance port); agents "
        "and the metadata server on Unix sockets; CPU us/req sums front + agent + server",
        "store queries/req: calls of the store's PortDirectory methods counted inside the "
        "agent process during the run, divided by requests",
        f"metaproxy processes run with --log-level {opts.log_level}",
        "metaproxy up: its own state and store; the front in the host namespace on "
        "127.0.0.1, served by the unprivileged front worker; CPU us/req sums the manager, the "
        "zygote and the worker; its agent is not instrumented (no store query count)",
        f"agents run with --pipeline {stack.pipeline()} (GETs may share a connection to the "
        "metadata server), as `metaproxy up` configures an agent for its embedded server",
    ]
    table.notes += [
        f"{f.label}: unavailable ({f.error})" for f, _, _ in systems_under_test if not f.up
    ]
    result.tables.append(table)

    warm_name = f"builtin/{warm.name}"
    worst = min(
        (r for r in (med(warm_name, p, "rps") for p in PATHS) if r is not None), default=None
    )
    warm_q = [q for p in PATHS for q in queries.get((warm_name, p), [])]
    result.checks += [
        at_least(
            "full path: builtin warm req/s / Neutron-haproxy front-only req/s (worse path)",
            ratio(worst, neutron_rps),
            0.3,
        ),
        at_most(
            "full path: warm-cache agent store queries per request",
            max(warm_q) if warm_q else None,
            0.001,
        ),
    ]
    result.raw = {
        "samples": {f"{k[0]}@{k[1]}": [asdict(s) for s in v] for k, v in samples.items()},
        "store_queries_per_request": {f"{k[0]}@{k[1]}": v for k, v in queries.items()},
        "unavailable": {f.name: f.error for f, _, _ in systems_under_test if not f.up},
    }
    return result
