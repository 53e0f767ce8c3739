"""The builtin engine in one process, grown in steps for the memory scenario.

`python -m bench.memchild SPEC.json` adds networks through the engine's programmatic API
(`add(FrontSpec)` in one asyncio loop) up to each level in turn, prints `level N` after each and
waits for a line on stdin (the parent measures /proc meanwhile), then closes the engine.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from metaproxy.config import FrontSpec, Identity


def specs(plan: dict[str, Any]) -> list[FrontSpec]:
    out = []
    for i, netns in enumerate(plan["namespaces"]):
        out.append(
            FrontSpec(
                identity=Identity("network", f"bench-mem-{i:05d}"),
                upstream_socket=Path(plan["upstream"]),
                bind_address="169.254.169.254",
                port=80,
                state_path=Path(plan["state"]),
                netns=netns,
            )
        )
    return out


async def grow(plan: dict[str, Any]) -> None:
    from metaproxy.front import builtin

    engine = builtin.BuiltinFront()  # the host service API: add/remove/close in one loop
    loop = asyncio.get_running_loop()
    todo = specs(plan)
    done = 0
    try:
        for level in plan["levels"]:
            while done < level:
                await engine.add(todo[done])
                done += 1
            print(f"level {done}", flush=True)
            await loop.run_in_executor(None, sys.stdin.readline)
    finally:
        await engine.close()


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as fh:
        plan = json.load(fh)
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        asyncio.run(grow(plan))
    else:
        uvloop.run(grow(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
