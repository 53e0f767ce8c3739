"""Configuration values shared by every role, and the only code that reads config files.

Each role owns its own frozen dataclass (a *slice*); this module holds the pieces they share:
the `Secret` type, the front's `FrontSpec`, name validation, and TOML/environment loading.
"""

from __future__ import annotations

import grp
import ipaddress
import pwd
import re
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from metaproxy.errors import ConfigError

if TYPE_CHECKING:
    from metaproxy.service.settings import Config

IdentityKind = Literal["network", "router"]

# IDs end up in haproxy configs, file names and HTTP headers: a strict grammar stops injection
# (a newline in a network ID would otherwise add directives to a rendered haproxy config).
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NETNS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_IFACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,14}$")

ENV_PREFIX = "METAPROXY_"


class Secret:
    """A value that never shows itself in a repr, str, log line or error message."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret; call only at the point of use."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def validate_id(value: str, *, key: str) -> str:
    """Return `value` if it is a safe network/router/instance ID, else raise ConfigError."""
    if not _ID_RE.match(value):
        raise ConfigError(
            f"{key}: {value!r} is not a valid ID (letters, digits, '.', '_', '-'; at most 64)",
            key=key,
        )
    return value


def validate_uuid(value: str, *, key: str) -> str:
    """Return the canonical lower-case form of a UUID, else raise ConfigError."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        raise ConfigError(f"{key}: {value!r} is not a UUID", key=key) from None


def validate_netns(value: str, *, key: str = "netns") -> str:
    """Return `value` if it is a safe namespace name (as `ip netns` accepts), else raise."""
    if not _NETNS_RE.match(value) or value in {".", ".."}:
        raise ConfigError(f"{key}: {value!r} is not a valid namespace name", key=key)
    return value


def validate_interface(value: str, *, key: str = "interface") -> str:
    """Return `value` if it is a valid Linux interface name, else raise."""
    if not _IFACE_RE.match(value):
        raise ConfigError(f"{key}: {value!r} is not a valid interface name", key=key)
    return value


def resolve_user(value: str | int | None, *, key: str = "user") -> int | None:
    """Turn a user name or number into a uid; an unknown name is a ConfigError."""
    if value is None or value == "":
        return None
    text = str(value)
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ConfigError(f"{key}: unknown user {text!r}", key=key) from None


def resolve_group(value: str | int | None, *, key: str = "group") -> int | None:
    """Turn a group name or number into a gid; an unknown name is a ConfigError."""
    if value is None or value == "":
        return None
    text = str(value)
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ConfigError(f"{key}: unknown group {text!r}", key=key) from None


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a front speaks for: exactly one network or one router."""

    kind: IdentityKind
    id: str

    def __post_init__(self) -> None:
        validate_id(self.id, key=f"{self.kind}_id")

    @property
    def header(self) -> str:
        """The header the agent reads: X-Neutron-Network-ID or X-Neutron-Router-ID."""
        return "X-Neutron-Network-ID" if self.kind == "network" else "X-Neutron-Router-ID"

    def as_headers(self) -> list[tuple[bytes, bytes]]:
        return [(self.header.encode(), self.id.encode())]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """haproxy's five timeouts, in seconds, with Neutron's values as defaults."""

    http_request: float = 30.0
    connect: float = 30.0
    client: float = 32.0
    server: float = 32.0
    http_keep_alive: float = 30.0

    def __post_init__(self) -> None:
        for name in ("http_request", "connect", "client", "server", "http_keep_alive"):
            value = getattr(self, name)
            if not 0 < value <= 3600:
                raise ConfigError(f"timeout_{name} must be in (0, 3600] s", key=f"timeout_{name}")


DEFAULT_METADATA_ADDRESS = "169.254.169.254"
DEFAULT_METADATA_ADDRESS_V6 = "fe80::a9fe:a9fe"
DEFAULT_NETWORK_PORT = 80
DEFAULT_ROUTER_PORT = 9697
MAX_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class FrontSpec:
    """Everything one front (any engine) needs to serve one network or router."""

    identity: Identity
    upstream_socket: Path
    bind_address: str
    port: int
    state_path: Path
    netns: str | None = None
    interface: str | None = None
    pid_file: Path | None = None
    user: int | None = None
    group: int | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_body: int = MAX_BODY
    maxconn: int = 1024

    def __post_init__(self) -> None:
        try:
            address = ipaddress.ip_address(self.bind_address)
        except ValueError:
            raise ConfigError(
                f"bind_address: {self.bind_address!r} is not an IP address", key="bind_address"
            ) from None
        if address.version == 6 and address.is_link_local and not self.interface:
            raise ConfigError(
                "bind_address: an IPv6 link-local address needs an interface", key="interface"
            )
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"metadata_port: {self.port} is not a TCP port", key="metadata_port")
        for name in ("upstream_socket", "state_path"):
            if not getattr(self, name).is_absolute():
                raise ConfigError(f"{name} must be an absolute path", key=name)
        if self.pid_file is not None and not self.pid_file.is_absolute():
            raise ConfigError("pid_file must be an absolute path", key="pid_file")
        if self.netns is not None:
            validate_netns(self.netns)
        if self.interface is not None:
            validate_interface(self.interface)
        if not 0 < self.max_body <= 16 * 1024 * 1024:
            raise ConfigError("max_body must be between 1 byte and 16 MiB", key="max_body")
        if not 1 <= self.maxconn <= 1_000_000:
            raise ConfigError("maxconn must be between 1 and 1000000", key="maxconn")

    @property
    def name(self) -> str:
        """A short stable name for files and logs: `network-<id>` or `router-<id>`."""
        return f"{self.identity.kind}-{self.identity.id}"


def default_bind_address(kind: IdentityKind) -> str:
    """Neutron's defaults: the metadata address for a network, every address for a router."""
    return DEFAULT_METADATA_ADDRESS if kind == "network" else "0.0.0.0"  # noqa: S104


def default_port(kind: IdentityKind) -> int:
    return DEFAULT_NETWORK_PORT if kind == "network" else DEFAULT_ROUTER_PORT


def parse_address(
    text: str, *, key: str, allow_port_zero: bool = False
) -> tuple[Path | None, str | None, int | None]:
    """Parse `unix:/abs/path`, `HOST:PORT` or `[V6]:PORT` into (unix path, host, port).

    Port 0 (the kernel picks one) is allowed only where the caller asks for it.
    """
    if text.startswith("unix:"):
        path = Path(text[5:])
        if not path.is_absolute():
            raise ConfigError(f"{key}: a Unix socket path must be absolute", key=key)
        return path, None, None
    host, sep, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
        port = int(port_text)
    except ValueError:
        raise ConfigError(
            f"{key}: {text!r} is not HOST:PORT, [V6]:PORT or unix:/PATH", key=key
        ) from None
    if not sep or not (0 if allow_port_zero else 1) <= port <= 65535:
        raise ConfigError(f"{key}: {port_text!r} is not a TCP port", key=key)
    return None, host, port


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, turning every failure into a ConfigError naming the file."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", key="config") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}", key="config") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}", key="config") from exc


def env_overrides(environ: Mapping[str, str], section: str) -> dict[str, str]:
    """`METAPROXY_<SECTION>__<KEY>=value` entries for one section, keys lower-cased."""
    prefix = f"{ENV_PREFIX}{section.upper()}__"
    return {k[len(prefix) :].lower(): v for k, v in environ.items() if k.startswith(prefix)}


def read_secret(value: str | None, file: str | None, *, key: str) -> Secret:
    """A secret given inline or in a file (first line, stripped); the file wins when both."""
    if file:
        try:
            text = Path(file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{key}_file: cannot read {file}: {exc.strerror}", key=key) from exc
        return Secret(text)
    return Secret(value or "")


def load(path: Path | None, environ: Mapping[str, str]) -> Config:
    """The composed, frozen config of `metaproxy up` (a `service.settings.Config`).

    The composition lives with the host service, which alone knows every section; the import is
    deferred so this bottom layer never imports the layers above it at module load.
    """
    from metaproxy.service import settings

    return settings.load(path, environ)
