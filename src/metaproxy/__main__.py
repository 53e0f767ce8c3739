"""Allow `python -m metaproxy`."""

from __future__ import annotations

from metaproxy.cli import main

raise SystemExit(main())
