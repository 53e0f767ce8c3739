"""Run the metaproxy CLI as a real subprocess, from the source tree under test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import metaproxy

SRC = str(Path(metaproxy.__file__).resolve().parent.parent)


def env(**extra: str) -> dict[str, str]:
    """The current environment with the package under test importable."""
    result = dict(os.environ)
    result["PYTHONPATH"] = SRC + (
        os.pathsep + result["PYTHONPATH"] if "PYTHONPATH" in result else ""
    )
    result.update(extra)
    return result


def argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "metaproxy", *args]


def run(*args: str, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run `metaproxy ARGS` to completion and capture its output."""
    kwargs.setdefault("env", env())
    return subprocess.run(
        argv(*args), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


def popen(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    """Start `metaproxy ARGS` in the background; the caller must stop it."""
    kwargs.setdefault("env", env())
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(argv(*args), text=True, **kwargs)
