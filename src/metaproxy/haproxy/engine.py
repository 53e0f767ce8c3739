"""The haproxy engine (in progress): the ns-proxy entry points exist so the CLI type-checks."""

from __future__ import annotations

import argparse

from metaproxy.config import FrontSpec
from metaproxy.errors import ProcessError


def run_ns_proxy(spec: FrontSpec, args: argparse.Namespace) -> int:
    raise ProcessError(f"the haproxy engine is not implemented yet ({spec.name})")


def destroy_ns_proxy(spec: FrontSpec, args: argparse.Namespace) -> int:
    raise ProcessError(f"the haproxy engine is not implemented yet ({spec.name})")
