"""`metaproxy status`: the running service's fronts, agent and server, from its control socket."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from metaproxy.commands.checkconfig import add_config_flag
from metaproxy.commands.up import add_state_flag
from metaproxy.service import control, settings

NAME = "status"
HELP = "show the running service's fronts, agent and metadata server (--json for scripts)"

COLUMNS = (
    ("name", "FRONT"),
    ("netns", "NAMESPACE"),
    ("engine", "ENGINE"),
    ("pid", "PID"),
    ("state", "STATE"),
    ("requests", "REQUESTS"),
    ("errors", "ERRORS"),
    ("last_error", "LAST ERROR"),
)


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_flag(parser)
    add_state_flag(parser)
    parser.add_argument("--json", action="store_true", help="print the raw status as JSON")


def table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width columns; the last column (last error) runs free."""
    cells = [[title for _, title in COLUMNS]]
    for row in rows:
        cells.append(["-" if row.get(k) in (None, "") else str(row[k]) for k, _ in COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS) - 1)]
    lines = []
    for r in cells:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return "\n".join(line.rstrip() for line in lines)


def render(status: dict[str, Any]) -> str:
    svc = status.get("service", {})
    agent = status.get("agent", {})
    server = status.get("server", {})
    fronts = status.get("fronts", [])
    lines = [
        f"metaproxy {svc.get('version', '?')}  pid {svc.get('pid')}  up {svc.get('uptime')} s  "
        f"engine {svc.get('engine')}  state {svc.get('state_path')}  metrics {svc.get('metrics')}",
        "",
        table(fronts) if fronts else "no fronts (add one: metaproxy network add ...)",
        "",
        f"agent   {agent.get('state')}  {agent.get('socket', '')}  -> {agent.get('upstream', '')}"
        f"  lookups {agent.get('lookups')}  cache hits {agent.get('cache_hits')}"
        f"  responses {agent.get('responses', {})}",
        f"server  {server.get('state')}  {server.get('listen') or server.get('url') or ''}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    environ = dict(os.environ)
    if args.state_path is not None:
        environ["METAPROXY_SERVICE__STATE_PATH"] = str(args.state_path.absolute())
    cfg = settings.load(args.config, environ)
    reply = control.request(cfg.service.control_path, "status")
    reply.pop("ok", None)
    print(json.dumps(reply, indent=2) if args.json else render(reply))
    failing = [f for f in reply.get("fronts", []) if f.get("state") != "running"]
    return 1 if failing else 0
