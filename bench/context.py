"""What every scenario receives: the run's options, a private work directory, cleanup."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import BenchError, Child


@dataclass
class Options:
    quick: bool = False
    rounds: int = 5
    duration: float = 6.0
    log_level: str = "WARNING"
    verbose: bool = False
    profile: Path | None = None  # where to keep py-spy's raw profile of the builtin front


@dataclass
class Context:
    """One scenario's resources; `close()` stops every child and removes the directory."""

    options: Options
    workdir: Path
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @classmethod
    def create(cls, options: Options, name: str) -> Context:
        # Short paths: Unix socket names must fit in 108 bytes.
        workdir = Path(tempfile.mkdtemp(prefix=f"mp-b{name[:3]}-", dir="/tmp"))
        ctx = cls(options, workdir)
        ctx.stack.callback(shutil.rmtree, workdir, True)
        return ctx

    def track(self, child: Child) -> Child:
        """Stop `child` when the scenario ends, whatever happens."""
        self.stack.callback(child.stop)
        return child

    def close(self) -> None:
        self.stack.close()

    def log(self, message: str) -> None:
        if self.options.verbose:
            print(f"[bench] {message}", file=sys.stderr, flush=True)


REPO = Path(__file__).resolve().parent.parent


def module_argv(module: str) -> list[str]:
    """Run one of the bench's own modules as a program (start it with cwd=REPO)."""
    return [sys.executable, "-m", module]


def metaproxy_argv() -> list[str]:
    """The metaproxy command of the interpreter running the bench (the repository's venv)."""
    script = Path(sys.executable).parent / "metaproxy"
    if not script.exists():
        raise BenchError(f"{script} not found: run the bench with the venv's python (bench/run)")
    return [str(script)]
