"""The host side for the full-path scenarios: store, embedded metadata server, agents, fronts."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench import agentchild, inventory
from bench.context import REPO, Context, metaproxy_argv, module_argv
from bench.procs import BenchError, Child, tcp_ready, unix_ready, wait_until
from metaproxy.service.roles import EMBEDDED_PIPELINE


@dataclass
class Agent:
    name: str
    socket: Path
    child: Child
    counter: Path

    def store_queries(self) -> int:
        return agentchild.read(str(self.counter))


@dataclass
class Host:
    """A store holding `addresses`, one metadata server, and its shared secret."""

    store: Path
    secret_file: Path
    server_socket: Path
    server: Child


def import_store(ctx: Context, addresses: list[str], store: Path | None = None) -> Path:
    store = store or ctx.workdir / "store.db"
    doc = ctx.workdir / "inventory.json"
    doc.write_text(json.dumps(inventory.document(addresses)))
    done = subprocess.run(
        [*metaproxy_argv(), "--log-level", "WARNING", "import", str(doc), "--store", str(store)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"metaproxy import failed: {done.stderr.strip()[-500:]}")
    return store


def start_host(ctx: Context, addresses: list[str]) -> Host:
    store = import_store(ctx, addresses)
    secret = ctx.workdir / "secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(os.urandom(16).hex() + "\n")
    server_socket = ctx.workdir / "md.sock"
    config = ctx.workdir / "metadata.toml"
    config.write_text(
        f'[store]\npath = "{store}"\n\n'
        f'[metadata]\nlisten = "unix:{server_socket}"\nshared_secret_file = "{secret}"\n'
    )
    server = ctx.track(
        Child(
            "metadata-server",
            [
                *metaproxy_argv(),
                "--log-level",
                "WARNING",
                "metadata-server",
                "--config",
                str(config),
            ],
            ctx.workdir,
        )
    )
    wait_until("metadata server", unix_ready(server_socket), 30, server)
    return Host(store, secret, server_socket, server)


def pipeline() -> int:
    """The agents' --pipeline: as `metaproxy up` sets it for the embedded server (or
    MP_BENCH_PIPELINE, to compare)."""
    return int(os.environ.get("MP_BENCH_PIPELINE", EMBEDDED_PIPELINE))


def start_agent(ctx: Context, host: Host, name: str, cache_ttl: float | None) -> Agent:
    sock = ctx.workdir / f"{name}.sock"
    counter = ctx.workdir / f"{name}.count"
    argv = [
        *module_argv("bench.agentchild"),
        str(counter),
        "--log-level",
        ctx.options.log_level,
        "agent",
        "--store",
        str(host.store),
        "--metadata_proxy_socket",
        str(sock),
        "--shared_secret_file",
        str(host.secret_file),
        "--metadata_url",
        f"unix:{host.server_socket}",
        *(["--cache_ttl", f"{cache_ttl:g}"] if cache_ttl is not None else []),
        "--pipeline",
        str(pipeline()),
    ]
    child = ctx.track(Child(name, argv, ctx.workdir, cwd=REPO))
    wait_until(f"agent {name}", unix_ready(sock), 30, child)
    return Agent(name, sock, child, counter)


def start_up(ctx: Context, addresses: list[str], port: int, tag: str = "up") -> Child:
    """`metaproxy up` on a state of its own holding `addresses`: the embedded server and the
    agent in the manager, the network's builtin front (in the host namespace, 127.0.0.1:port)
    in its unprivileged front worker. Returns once the front answers TCP."""
    state = ctx.workdir / f"state-{tag}"
    state.mkdir(mode=0o700)
    import_store(ctx, addresses, state / "metaproxy.db")
    config = ctx.workdir / f"{tag}.toml"
    config.write_text(
        f'[service]\nstate_path = "{state}"\n\n'
        f'[[network]]\nid = "{inventory.NETWORK_ID}"\nnetns = ""\n'
        f'bind_address = "127.0.0.1"\nport = {port}\n'
    )
    argv = [*metaproxy_argv(), "--log-level", ctx.options.log_level, "up", "--config", str(config)]
    child = ctx.track(Child(tag, argv, ctx.workdir))
    wait_until("metaproxy up", tcp_ready("127.0.0.1", port), 60, child)
    return child
