"""Config slices owned by the metadata role: `[store]` and `[metadata]`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

from metaproxy.config import Secret, env_overrides, parse_address, read_secret
from metaproxy.errors import ConfigError

DEFAULT_STATE_PATH = Path("/var/lib/metaproxy")  # the same default as ns-proxy's --state_path
STORE_FILENAME = "metaproxy.db"
DEFAULT_LISTEN = "127.0.0.1:8775"  # Nova's metadata API port

TokenMode = Literal["off", "optional", "required"]


def _unknown(table: Mapping[str, Any], allowed: set[str], section: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"[{section}] {key}: unknown key", key=f"{section}.{key}")


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Where the store lives. Only SQLite for now; `backend` leaves room for a server DB."""

    path: Path
    backend: Literal["sqlite"] = "sqlite"

    def __post_init__(self) -> None:
        if not self.path.is_absolute():
            raise ConfigError("store.path must be an absolute path", key="store.path")

    @classmethod
    def from_mapping(
        cls,
        table: Mapping[str, Any],
        environ: Mapping[str, str] | None = None,
        *,
        state_path: Path = DEFAULT_STATE_PATH,
    ) -> StoreConfig:
        merged = {**table, **env_overrides(environ or {}, "store")}
        _unknown(merged, {"path", "backend"}, "store")
        backend = merged.get("backend", "sqlite")
        if backend != "sqlite":
            raise ConfigError(
                f"store.backend: {backend!r} is not supported (sqlite)", key="store.backend"
            )
        path = merged.get("path") or state_path / STORE_FILENAME
        return cls(path=Path(path).absolute())


@dataclass(frozen=True, slots=True)
class Listen:
    """A TCP address (`host:port`, `[v6]:port`) or a Unix socket (`unix:/path`)."""

    host: str | None = None
    port: int | None = None
    unix: Path | None = None

    @classmethod
    def parse(cls, text: str, *, key: str = "metadata.listen") -> Listen:
        unix, host, port = parse_address(text, key=key, allow_port_zero=True)
        return cls(host=host, port=port, unix=unix)

    def __str__(self) -> str:
        if self.unix is not None:
            return f"unix:{self.unix}"
        return (
            f"[{self.host}]:{self.port}" if ":" in (self.host or "") else f"{self.host}:{self.port}"
        )


@dataclass(frozen=True, slots=True)
class MetadataConfig:
    """The embedded metadata server: where it listens, the shared secret, the token mode."""

    shared_secret: Secret
    listen: Listen = Listen("127.0.0.1", 8775)
    tokens: TokenMode = "optional"

    def __post_init__(self) -> None:
        if not self.shared_secret:
            raise ConfigError(
                "metadata.shared_secret is empty: set it (or shared_secret_file) to the agent's "
                "metadata_proxy_shared_secret",
                key="metadata.shared_secret",
            )
        if self.tokens not in get_args(TokenMode):
            raise ConfigError(
                f"metadata.tokens: {self.tokens!r} is not off, optional or required",
                key="metadata.tokens",
            )

    @classmethod
    def from_mapping(
        cls,
        table: Mapping[str, Any],
        environ: Mapping[str, str] | None = None,
        *,
        secret: Secret | None = None,
        listen: str = DEFAULT_LISTEN,
    ) -> MetadataConfig:
        """[metadata] plus METAPROXY_METADATA__*; `secret`/`listen` are the composer's defaults
        (e.g. `metaproxy up`'s [service] secret and its state-path socket)."""
        merged = {**table, **env_overrides(environ or {}, "metadata")}
        _unknown(merged, {"listen", "shared_secret", "shared_secret_file", "tokens"}, "metadata")
        given = read_secret(
            merged.get("shared_secret"), merged.get("shared_secret_file"), key="shared_secret"
        )
        return cls(
            shared_secret=given if given or secret is None else secret,
            listen=Listen.parse(str(merged.get("listen", listen))),
            tokens=cast(TokenMode, merged.get("tokens", "optional")),
        )
