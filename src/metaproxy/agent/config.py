"""The agent's configuration: metaproxy's `[agent]` table or a Neutron metadata_agent.ini.

Both forms land in one frozen `AgentConfig`. Neutron's option names are accepted in either
form, so an operator can point `metaproxy agent --config` at an existing
`/etc/neutron/metadata_agent.ini`.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import unquote, urlsplit

from metaproxy.config import (
    MAX_BODY,
    Secret,
    env_overrides,
    read_secret,
    read_toml,
    resolve_group,
    resolve_user,
)
from metaproxy.errors import ConfigError

SocketMode = Literal["user", "group", "all", "deduce"]
Scheme = Literal["http", "https", "unix"]

# Neutron's MODE_MAP: least privilege first.
MODE_BITS: dict[str, int] = {"user": 0o644, "group": 0o664, "all": 0o666}

DEFAULT_SOCKET = Path("/var/lib/metaproxy/metadata_proxy")
DEFAULT_BACKLOG = 4096
DEFAULT_CACHE_TTL = 30.0
DEFAULT_TIMEOUT = 60.0  # Neutron's fixed upstream timeout
DEFAULT_CONNECT_TIMEOUT = 10.0
MAX_HEAD = 16 * 1024  # request line and header fields, up to the blank line

# Neutron's spelling → ours. Accepted in the TOML table too, so one vocabulary works everywhere.
NEUTRON_ALIASES: dict[str, str] = {
    "metadata_proxy_shared_secret": "shared_secret",
    "metadata_proxy_shared_secret_file": "shared_secret_file",
    "nova_metadata_host": "metadata_host",
    "nova_metadata_ip": "metadata_host",  # the pre-Pike spelling
    "nova_metadata_port": "metadata_port",
    "nova_metadata_protocol": "metadata_protocol",
    "nova_metadata_insecure": "insecure",
    "auth_ca_cert": "ca_cert",
    "nova_client_cert": "client_cert",
    "nova_client_priv_key": "client_key",
    "metadata_proxy_socket": "socket",
    "metadata_proxy_socket_mode": "socket_mode",
    "metadata_proxy_user": "proxy_user",
    "metadata_proxy_group": "proxy_group",
    "metadata_workers": "workers",
    "metadata_backlog": "backlog",
}

KEYS = frozenset(
    {
        "socket",
        "socket_mode",
        "proxy_user",
        "proxy_group",
        "backlog",
        "workers",
        "shared_secret",
        "shared_secret_file",
        "metadata_url",
        "metadata_host",
        "metadata_port",
        "metadata_protocol",
        "ca_cert",
        "insecure",
        "client_cert",
        "client_key",
        "timeout",
        "connect_timeout",
        "pool_size",
        "pipeline",
        "cache_ttl",
        "max_body",
        "max_head",
    }
)

_INI_FORM = re.compile(r"^\s*\[DEFAULT\]\s*$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Where the metadata server is and how to talk to it."""

    scheme: Scheme = "http"
    host: str = "127.0.0.1"
    port: int = 8775
    unix_path: Path | None = None
    ca_cert: Path | None = None
    insecure: bool = False
    client_cert: Path | None = None
    client_key: Path | None = None
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    pool_size: int = 100
    # GETs in flight at once on one connection (HTTP/1.1 pipelining); 1 = never pipeline. For a
    # server known to answer pipelined requests in order, such as the embedded one.
    pipeline: int = 1

    def __post_init__(self) -> None:
        if self.scheme not in ("http", "https", "unix"):
            raise ConfigError(
                f"agent.metadata_protocol: {self.scheme!r} is not http or https",
                key="agent.metadata_protocol",
            )
        if self.scheme == "unix":
            if self.unix_path is None or not self.unix_path.is_absolute():
                raise ConfigError(
                    "agent.metadata_url: a unix: upstream needs an absolute socket path",
                    key="agent.metadata_url",
                )
        elif not 1 <= self.port <= 65535:
            raise ConfigError(
                f"agent.metadata_port: {self.port} is not a TCP port", key="agent.metadata_port"
            )
        if bool(self.client_cert) != bool(self.client_key):
            raise ConfigError(
                "agent.client_cert and agent.client_key go together (Neutron: nova_client_cert "
                "and nova_client_priv_key)",
                key="agent.client_key" if self.client_cert else "agent.client_cert",
            )
        for name in ("timeout", "connect_timeout"):
            if not 0 < getattr(self, name) <= 3600:
                raise ConfigError(f"agent.{name} must be in (0, 3600] s", key=f"agent.{name}")
        if not 1 <= self.pool_size <= 100_000:
            raise ConfigError("agent.pool_size must be in [1, 100000]", key="agent.pool_size")
        if not 1 <= self.pipeline <= 256:
            raise ConfigError("agent.pipeline must be in [1, 256]", key="agent.pipeline")

    @property
    def url(self) -> str:
        """The base URL, for logs (never holds a secret)."""
        if self.scheme == "unix":
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything `metaproxy agent` needs; construction fails on any bad or missing value."""

    shared_secret: Secret
    socket_path: Path = DEFAULT_SOCKET
    socket_mode: SocketMode = "deduce"
    proxy_user: str | None = None
    proxy_group: str | None = None
    backlog: int = DEFAULT_BACKLOG
    workers: int = 1
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    cache_ttl: float = DEFAULT_CACHE_TTL
    max_body: int = MAX_BODY
    max_head: int = MAX_HEAD

    def __post_init__(self) -> None:
        if not self.shared_secret:
            raise ConfigError(
                "agent.shared_secret is empty: the agent refuses to start without the secret it "
                "shares with the metadata server (set shared_secret or shared_secret_file; "
                "Neutron: metadata_proxy_shared_secret)",
                key="agent.shared_secret",
            )
        if not self.socket_path.is_absolute():
            raise ConfigError("agent.socket must be an absolute path", key="agent.socket")
        if len(os.fsencode(self.socket_path)) >= 108:
            raise ConfigError(
                "agent.socket: a Unix socket path must be shorter than 108 bytes",
                key="agent.socket",
            )
        if self.socket_mode not in ("user", "group", "all", "deduce"):
            raise ConfigError(
                f"agent.socket_mode: {self.socket_mode!r} is not one of user, group, all, deduce",
                key="agent.socket_mode",
            )
        if not 1 <= self.backlog <= 65535:
            raise ConfigError("agent.backlog must be in [1, 65535]", key="agent.backlog")
        if not 1 <= self.workers <= 64:
            raise ConfigError("agent.workers must be in [1, 64]", key="agent.workers")
        if not 0 <= self.cache_ttl <= 3600:
            raise ConfigError("agent.cache_ttl must be in [0, 3600] s", key="agent.cache_ttl")
        if not 0 <= self.max_body <= 16 * 1024 * 1024:
            raise ConfigError("agent.max_body must be in [0, 16 MiB]", key="agent.max_body")
        if not 1024 <= self.max_head <= 1024 * 1024:
            raise ConfigError("agent.max_head must be in [1 KiB, 1 MiB]", key="agent.max_head")
        # Fail on an unknown user or group now, not at the first request.
        resolve_user(self.proxy_user, key="agent.proxy_user")
        resolve_group(self.proxy_group, key="agent.proxy_group")

    def socket_mode_bits(self) -> int:
        """The permission bits for the socket; "deduce" follows Neutron's rule.

        deduce: the proxy runs as us or root → user (0644); else its group is ours → group
        (0664); else all (0666).
        """
        mode = self.socket_mode
        if mode == "deduce":
            uid = resolve_user(self.proxy_user, key="agent.proxy_user")
            gid = resolve_group(self.proxy_group, key="agent.proxy_group")
            if uid is None or uid in (0, os.geteuid()):
                mode = "user"
            elif gid is None or gid == os.getegid():
                mode = "group"
            else:
                mode = "all"
        return MODE_BITS[mode]

    @classmethod
    def from_mapping(
        cls, table: Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> AgentConfig:
        """Build from a TOML `[agent]` table, `METAPROXY_AGENT__<KEY>` overriding it."""
        values = _canonical(table, strict=True)
        values.update(_canonical(env_overrides(environ or {}, "agent"), strict=True))
        return _build(values)

    @classmethod
    def from_neutron_ini(
        cls,
        text: str,
        environ: Mapping[str, str] | None = None,
        *,
        source: str = "metadata_agent.ini",
    ) -> AgentConfig:
        """Build from a Neutron metadata_agent.ini's [DEFAULT]; METAPROXY_AGENT__* overrides."""
        # interpolation=None: a secret may contain '%'; oslo's own $var syntax is handled below.
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            parser.read_string(text, source=source)
        except configparser.Error as exc:
            raise ConfigError(f"{source} is not a valid INI file: {exc}", key="config") from exc
        defaults = dict(parser.defaults())
        state_path = defaults.get("state_path", "/var/lib/neutron")
        raw = {k: v.replace("$state_path", state_path) for k, v in defaults.items()}
        values = _canonical({k: v for k, v in raw.items() if k in NEUTRON_ALIASES}, strict=False)
        values.setdefault("socket", f"{state_path}/metadata_proxy")
        values.update(_canonical(env_overrides(environ or {}, "agent"), strict=True))
        return _build(values)


def load(path: Path, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read `path` — a Neutron INI (it has a [DEFAULT] section) or metaproxy's TOML."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", key="config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}", key="config") from exc
    if is_neutron_ini(text):
        return AgentConfig.from_neutron_ini(text, environ, source=str(path))
    document = read_toml(path)
    table = document.get("agent", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [agent] must be a table", key="agent")
    return AgentConfig.from_mapping(table, environ)


def is_neutron_ini(text: str) -> bool:
    """Neutron's files are oslo.config INI with a [DEFAULT] section; metaproxy's TOML never is."""
    return _INI_FORM.search(text) is not None


def _canonical(table: Mapping[str, Any], *, strict: bool) -> dict[str, Any]:
    """Rename Neutron spellings to ours; with `strict`, an unknown key is a ConfigError."""
    result: dict[str, Any] = {}
    for key, value in table.items():
        name = NEUTRON_ALIASES.get(key, key)
        if name not in KEYS:
            if strict:
                raise ConfigError(f"agent.{key}: unknown key", key=f"agent.{key}")
            continue
        result[name] = value
    return result


def _build(values: dict[str, Any]) -> AgentConfig:
    secret = read_secret(
        _opt_str(values, "shared_secret"),
        _opt_str(values, "shared_secret_file"),
        key="agent.shared_secret",
    )
    mode = _opt_str(values, "socket_mode") or "deduce"
    return AgentConfig(
        shared_secret=secret,
        socket_path=_path(values, "socket") or DEFAULT_SOCKET,
        socket_mode=cast(SocketMode, mode),
        proxy_user=_opt_str(values, "proxy_user"),
        proxy_group=_opt_str(values, "proxy_group"),
        backlog=_int(values, "backlog", DEFAULT_BACKLOG),
        workers=max(_int(values, "workers", 1), 1),
        upstream=_upstream(values),
        cache_ttl=_float(values, "cache_ttl", DEFAULT_CACHE_TTL),
        max_body=_int(values, "max_body", MAX_BODY),
        max_head=_int(values, "max_head", MAX_HEAD),
    )


def _upstream(values: dict[str, Any]) -> UpstreamConfig:
    url = _opt_str(values, "metadata_url")
    common: dict[str, Any] = {
        "ca_cert": _path(values, "ca_cert"),
        "insecure": _bool(values, "insecure", False),
        "client_cert": _path(values, "client_cert"),
        "client_key": _path(values, "client_key"),
        "timeout": _float(values, "timeout", DEFAULT_TIMEOUT),
        "connect_timeout": _float(values, "connect_timeout", DEFAULT_CONNECT_TIMEOUT),
        "pool_size": _int(values, "pool_size", 100),
        "pipeline": _int(values, "pipeline", 1),
    }
    if url:
        if any(k in values for k in ("metadata_host", "metadata_port", "metadata_protocol")):
            raise ConfigError(
                "agent.metadata_url excludes metadata_host/metadata_port/metadata_protocol",
                key="agent.metadata_url",
            )
        return UpstreamConfig(**parse_metadata_url(url), **common)
    protocol = (_opt_str(values, "metadata_protocol") or "http").lower()
    if protocol not in ("http", "https"):
        raise ConfigError(
            f"agent.metadata_protocol: {protocol!r} is not http or https",
            key="agent.metadata_protocol",
        )
    host = _opt_str(values, "metadata_host") or "127.0.0.1"
    _check_host(host, key="agent.metadata_host")
    return UpstreamConfig(
        scheme=cast(Scheme, protocol),
        host=host.strip("[]"),
        port=_int(values, "metadata_port", 8775),
        **common,
    )


def parse_metadata_url(url: str) -> dict[str, Any]:
    """`http(s)://host[:port]`, `unix:/path` or `http+unix://%2Fpath` → UpstreamConfig fields."""
    key = "agent.metadata_url"
    if url.startswith("unix:"):
        return {"scheme": "unix", "unix_path": Path(url[len("unix:") :])}
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{key}: {url!r} is not a URL: {exc}", key=key) from None
    if parts.scheme == "http+unix":
        return {"scheme": "unix", "unix_path": Path(unquote(parts.netloc))}
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{key}: {url!r} must be http://host[:port], https://..., unix:/path or "
            "http+unix://%2Fpath",
            key=key,
        )
    if parts.path not in ("", "/") or parts.query or parts.username or parts.password:
        raise ConfigError(f"{key}: {url!r} must not carry a path, query or credentials", key=key)
    _check_host(parts.hostname, key=key)
    return {
        "scheme": parts.scheme,
        "host": parts.hostname,
        "port": port or (443 if parts.scheme == "https" else 80),
    }


_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


def _check_host(host: str, *, key: str) -> None:
    bare = host.strip("[]")
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        if not _HOSTNAME.match(bare):
            raise ConfigError(f"{key}: {host!r} is not a host name or address", key=key) from None


def _opt_str(values: Mapping[str, Any], name: str) -> str | None:
    value = values.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str | int):
        raise ConfigError(f"agent.{name} must be a string", key=f"agent.{name}")
    return str(value).strip()


def _path(values: Mapping[str, Any], name: str) -> Path | None:
    text = _opt_str(values, name)
    if text is None:
        return None
    path = Path(text)
    if not path.is_absolute():
        raise ConfigError(f"agent.{name} must be an absolute path", key=f"agent.{name}")
    return path


def _int(values: Mapping[str, Any], name: str, default: int) -> int:
    value = values.get(name, default)
    if isinstance(value, bool):
        raise ConfigError(f"agent.{name} must be an integer", key=f"agent.{name}")
    try:
        return int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"agent.{name}: {value!r} is not an integer", key=f"agent.{name}"
        ) from None


def _float(values: Mapping[str, Any], name: str, default: float) -> float:
    value = values.get(name, default)
    if isinstance(value, bool):
        raise ConfigError(f"agent.{name} must be a number", key=f"agent.{name}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"agent.{name}: {value!r} is not a number", key=f"agent.{name}") from None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(values: Mapping[str, Any], name: str, default: bool) -> bool:
    value = values.get(name, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"agent.{name}: {value!r} is not true or false", key=f"agent.{name}")
