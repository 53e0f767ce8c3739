"""metaproxy: instance metadata for isolated tenant networks, safely."""

from __future__ import annotations

__version__ = "0.1.0"
