"""The host service's own config slices and the composed `Config` that `metaproxy up` runs on.

Sections owned here: [service], [front] (defaults for every front), [[network]] / [[router]]
(fronts declared in the file), [metadata_rate_limiting] (Neutron's per-source rate limits, for
both engines). The roles' sections ([agent], [metadata], [store], [haproxy]) are
kept as their tables and handed to each role's own `from_mapping` where it builds its slice,
so this module never duplicates another role's validation.

One default state path, `/var/lib/metaproxy` (the FHS place for a daemon's state), the same as
`metaproxy ns-proxy` and the store commands use: `metaproxy network add` and `metaproxy status`
then find the running service's store and control socket without flags. A non-root run passes
`--state-path` (or `METAPROXY_SERVICE__STATE_PATH`); `up --demo` uses a temporary one.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, cast

from metaproxy.config import (
    FrontSpec,
    Identity,
    IdentityKind,
    Secret,
    Timeouts,
    default_bind_address,
    default_port,
    env_overrides,
    parse_address,
    read_toml,
    resolve_group,
    resolve_user,
    validate_id,
    validate_interface,
    validate_netns,
)
from metaproxy.errors import ConfigError
from metaproxy.front.ratelimit import MAX_CONN_PER_SOURCE, RateLimitConfig, SourceLimits
from metaproxy.http import sequence

Engine = Literal["builtin", "haproxy"]
ENGINES: tuple[Engine, ...] = ("builtin", "haproxy")
LOG_TARGETS = ("stderr", "syslog")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ROLE_SECTIONS = ("agent", "metadata", "store", "haproxy")
DEFAULT_STATE_PATH = Path("/var/lib/metaproxy")
_UNIX_PATH_MAX = 108  # sun_path, including the terminating NUL


@dataclass(frozen=True, slots=True)
class MetricsEndpoint:
    """Where the Prometheus text is served: a host TCP address or a Unix socket path."""

    host: str | None = None
    port: int | None = None
    path: Path | None = None

    @classmethod
    def parse(cls, text: str, *, key: str = "service.metrics") -> MetricsEndpoint | None:
        """ "" / "off" → None; "unix:/abs/path"; "HOST:PORT" or "[V6]:PORT"."""
        text = text.strip()
        if text in ("", "off", "false", "no"):
            return None
        path, host, port = parse_address(text, key=key)
        return cls(host=host, port=port, path=path)

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """[service]: where state lives, which engine serves the fronts, logs, control and metrics."""

    state_path: Path
    engine: Engine = "builtin"
    log_level: str = "INFO"
    log_target: str = "stderr"
    control_socket: Path | None = None
    metrics: MetricsEndpoint | None = None
    metadata_url: str | None = None  # None: the embedded metadata server; else Nova's URL
    shared_secret: Secret = field(default_factory=lambda: Secret(""))
    shared_secret_file: Path | None = None
    stop_timeout: float = 5.0
    drain_timeout: float = 3.0
    poll_interval: float = 1.0

    def __post_init__(self) -> None:
        if not self.state_path.is_absolute():
            raise ConfigError("service.state_path must be absolute", key="service.state_path")
        if self.engine not in ENGINES:
            raise ConfigError(
                f"service.engine: {self.engine!r} is not one of {', '.join(ENGINES)}",
                key="service.engine",
            )
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(
                f"service.log_level: {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}",
                key="service.log_level",
            )
        if self.log_target not in LOG_TARGETS:
            raise ConfigError(
                f"service.log_target: {self.log_target!r} is not stderr or syslog",
                key="service.log_target",
            )
        for name in ("stop_timeout", "drain_timeout", "poll_interval"):
            if not 0 < getattr(self, name) <= 600:
                raise ConfigError(f"service.{name} must be in (0, 600] s", key=f"service.{name}")
        for name, path in (
            ("control_socket" if self.control_socket else "state_path", self.control_path),
            ("state_path", self.agent_socket),
            ("state_path", self.metadata_socket),
        ):
            if len(os.fsencode(path)) >= _UNIX_PATH_MAX:
                raise ConfigError(
                    f"service.{name}: the socket {path} is longer than a Unix socket path may be "
                    f"({_UNIX_PATH_MAX - 1} bytes); choose a shorter state path",
                    key=f"service.{name}",
                )
        if self.metadata_url is not None and not self.metadata_url.startswith(
            ("http://", "https://")
        ):
            raise ConfigError(
                "service.metadata_url must be an http:// or https:// URL",
                key="service.metadata_url",
            )

    @property
    def control_path(self) -> Path:
        return self.control_socket or self.state_path / "control.sock"

    @property
    def secret_path(self) -> Path:
        return self.shared_secret_file or self.state_path / "shared_secret"

    @property
    def agent_socket(self) -> Path:
        """The agent's Unix socket, where every front sends its requests."""
        return self.state_path / "metadata_proxy"

    @property
    def metadata_socket(self) -> Path:
        """The embedded metadata server's Unix socket (host only, never in a tenant netns)."""
        return self.state_path / "metadata.sock"

    @property
    def store_path(self) -> Path:
        return self.state_path / "metaproxy.db"


@dataclass(frozen=True, slots=True)
class FrontDefaults:
    """[front]: values every front gets unless its [[network]] / [[router]] entry says otherwise."""

    bind_address: str | None = None
    port: int | None = None
    user: int | None = None
    group: int | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_body: int = 64 * 1024
    maxconn: int = 1024
    max_conn_per_source: int = MAX_CONN_PER_SOURCE
    # builtin engine: serve the fronts from an unprivileged worker process without secrets
    # (service/frontworkers.py); false keeps them in the service's own process.
    isolate: bool = True
    # builtin engine: GETs in flight at once on one agent connection that echoes sequence
    # numbers (metaproxy.http.client); 1 never pipelines.
    pipeline: int = sequence.PIPELINE
    # Namespace names for fronts that do not name one (e.g. networks from the store): Neutron's
    # DHCP/L3 agents use these; OVN's metadata agent uses "ovnmeta-{id}".
    network_netns: str = "qdhcp-{id}"
    router_netns: str = "qrouter-{id}"

    def netns_for(self, kind: IdentityKind, ident: str) -> str | None:
        """The namespace for a front that names none; "" as template: the host's own."""
        template = self.network_netns if kind == "network" else self.router_netns
        if not template:
            return None
        return validate_netns(template.replace("{id}", ident), key=f"front.{kind}_netns")


@dataclass(frozen=True, slots=True)
class FrontEntry:
    """One network or router to serve: from [[network]] / [[router]] or from the store."""

    identity: Identity
    netns: str | None
    bind_address: str | None = None
    port: int | None = None
    interface: str | None = None
    source: Literal["config", "store", "demo"] = "config"

    @property
    def name(self) -> str:
        return f"{self.identity.kind}-{self.identity.id}"

    def spec(self, service: ServiceConfig, defaults: FrontDefaults) -> FrontSpec:
        """The FrontSpec an engine serves: the entry's values over [front] over the kind's."""
        kind = self.identity.kind
        return FrontSpec(
            identity=self.identity,
            upstream_socket=service.agent_socket,
            bind_address=self.bind_address or defaults.bind_address or default_bind_address(kind),
            port=self.port or defaults.port or default_port(kind),
            state_path=service.state_path,
            netns=self.netns,
            interface=self.interface,
            pid_file=service.state_path / f"{self.name}.pid",
            user=defaults.user,
            group=defaults.group,
            timeouts=defaults.timeouts,
            max_body=defaults.max_body,
            maxconn=defaults.maxconn,
        )


@dataclass(frozen=True, slots=True)
class Config:
    """Everything `metaproxy up` needs, composed once; each role receives only its slice."""

    service: ServiceConfig
    front: FrontDefaults
    fronts: tuple[FrontEntry, ...]
    sections: Mapping[str, Mapping[str, Any]]  # the roles' own tables: agent, metadata, ...
    source: Path | None = None
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)

    @property
    def limits(self) -> SourceLimits:
        """The per-source limits every front enforces, whichever the engine."""
        return SourceLimits(self.front.max_conn_per_source, self.rate_limit)

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.sections.get(name, {}))


# -- reading values -------------------------------------------------------------------------


def _take(table: dict[str, Any], section: str, key: str, kind: type, default: Any = None) -> Any:
    """Pop `key` from `table`, coerced to `kind` (strings from the environment too)."""
    if key not in table:
        return default
    value = table.pop(key)
    full = f"{section}.{key}"
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is int and isinstance(value, bool):
            raise ValueError(value)
        if kind is Path:
            return Path(str(value)).absolute()
        if kind is str and not isinstance(value, str | int):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{full}: {value!r} is not a valid {kind.__name__}", key=full) from None


def _reject_unknown(table: Mapping[str, Any], section: str) -> None:
    if table:
        key = sorted(table)[0]
        raise ConfigError(f"{section}.{key}: unknown key", key=f"{section}.{key}")


def _table(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table", key=name)
    return dict(value)


def _service(table: dict[str, Any]) -> ServiceConfig:
    state = _take(table, "service", "state_path", Path) or DEFAULT_STATE_PATH
    metrics = MetricsEndpoint.parse(str(table.pop("metrics", "")))
    secret_file = _take(table, "service", "shared_secret_file", Path)
    inline = _take(table, "service", "shared_secret", str) or ""
    cfg = ServiceConfig(
        state_path=state,
        engine=cast(Engine, _take(table, "service", "engine", str, "builtin")),
        log_level=str(_take(table, "service", "log_level", str, "INFO")).upper(),
        log_target=_take(table, "service", "log_target", str, "stderr"),
        control_socket=_take(table, "service", "control_socket", Path),
        metrics=metrics,
        metadata_url=_take(table, "service", "metadata_url", str) or None,
        shared_secret=Secret(inline),
        shared_secret_file=secret_file,
        stop_timeout=_take(table, "service", "stop_timeout", float, 5.0),
        drain_timeout=_take(table, "service", "drain_timeout", float, 3.0),
        poll_interval=_take(table, "service", "poll_interval", float, 1.0),
    )
    _reject_unknown(table, "service")
    # The secret: inline, else the named file (must exist), else the default file when a
    # previous start generated it; with none, `up` generates one (embedded server only).
    if not inline and (secret_file is not None or cfg.secret_path.exists()):
        cfg = replace(cfg, shared_secret=_read_secret_file(cfg.secret_path))
    if cfg.metadata_url and not cfg.shared_secret:
        raise ConfigError(
            "service.shared_secret (or shared_secret_file) is required with a metadata_url: "
            "it must be the secret Nova's metadata API was given",
            key="service.shared_secret",
        )
    return cfg


def _read_secret_file(path: Path) -> Secret:
    try:
        return Secret(path.read_text(encoding="utf-8").strip())
    except OSError as exc:
        raise ConfigError(
            f"service.shared_secret_file: cannot read {path}: {exc.strerror}",
            key="service.shared_secret_file",
        ) from exc


def _front_defaults(table: dict[str, Any]) -> FrontDefaults:
    timeouts = {}
    for tf in fields(Timeouts):
        value = _take(table, "front", f"timeout_{tf.name}", float)
        if value is not None:
            timeouts[tf.name] = value
    bind = _take(table, "front", "bind_address", str)
    if bind is not None:
        _check_address(bind, "front.bind_address")
    templates = {}
    for kind in ("network", "router"):
        key = f"{kind}_netns"
        template = _take(table, "front", key, str)
        if template is None:
            continue
        rest = template.replace("{id}", "")
        if template and (rest == template or "{" in rest or "}" in rest):
            raise ConfigError(
                f"front.{key}: {template!r} must contain {{id}} and no other placeholder "
                '(or be "" for the host\'s own namespace)',
                key=f"front.{key}",
            )
        templates[key] = template
    defaults = FrontDefaults(
        **templates,
        bind_address=bind,
        port=_port(_take(table, "front", "port", int), "front.port"),
        user=resolve_user(table.pop("user", None), key="front.user"),
        group=resolve_group(table.pop("group", None), key="front.group"),
        timeouts=Timeouts(**timeouts),
        max_body=_take(table, "front", "max_body", int, 64 * 1024),
        maxconn=_take(table, "front", "maxconn", int, 1024),
        max_conn_per_source=_take(table, "front", "max_conn_per_source", int, MAX_CONN_PER_SOURCE),
        isolate=_take(table, "front", "isolate", bool, True),
        pipeline=_take(table, "front", "pipeline", int, sequence.PIPELINE),
    )
    try:
        SourceLimits(defaults.max_conn_per_source)
    except ConfigError as exc:
        raise ConfigError(f"front.{exc}", key="front.max_conn_per_source") from None
    sequence.check_pipeline(defaults.pipeline, "front.pipeline")
    _reject_unknown(table, "front")
    return defaults


def _check_address(value: str, key: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"{key}: {value!r} is not an IP address", key=key) from None


def _port(value: int | None, key: str) -> int | None:
    if value is not None and not 1 <= value <= 65535:
        raise ConfigError(f"{key}: {value} is not a TCP port", key=key)
    return value


def front_entry(
    kind: IdentityKind,
    raw: Mapping[str, Any],
    *,
    where: str,
    defaults: FrontDefaults,
    source: Literal["config", "store", "demo"] = "config",
) -> FrontEntry:
    """Validate one [[network]] / [[router]] table (or a store row shaped like one)."""
    table = dict(raw)
    ident = _take(table, where, "id", str)
    if not ident:
        raise ConfigError(f"{where}.id is required", key=f"{where}.id")
    validate_id(ident, key=f"{where}.id")
    netns: str | None
    if "netns" in table:
        netns = str(table.pop("netns")) or None  # "" = serve in the host's own namespace
        if netns is not None:
            validate_netns(netns, key=f"{where}.netns")
    else:
        netns = defaults.netns_for(kind, ident)
    bind = _take(table, where, "bind_address", str)
    if bind is not None:
        _check_address(bind, f"{where}.bind_address")
    interface = _take(table, where, "interface", str)
    if interface is not None:
        validate_interface(interface, key=f"{where}.interface")
    entry = FrontEntry(
        identity=Identity(kind, ident),
        netns=netns,
        bind_address=bind,
        port=_port(_take(table, where, "port", int), f"{where}.port"),
        interface=interface,
        source=source,
    )
    _reject_unknown(table, where)
    return entry


def _entries(doc: Mapping[str, Any], defaults: FrontDefaults) -> tuple[FrontEntry, ...]:
    entries: list[FrontEntry] = []
    seen: set[str] = set()
    kinds: tuple[IdentityKind, ...] = ("network", "router")
    for kind in kinds:
        items = doc.get(kind, [])
        if not isinstance(items, list):
            raise ConfigError(f"[[{kind}]] must be an array of tables", key=kind)
        for index, raw in enumerate(items):
            where = f"{kind}[{index}]"
            if not isinstance(raw, dict):
                raise ConfigError(f"{where} must be a table", key=where)
            entry = front_entry(kind, raw, where=where, defaults=defaults)
            if entry.name in seen:
                raise ConfigError(f"{where}.id: {entry.name} is declared twice", key=f"{where}.id")
            seen.add(entry.name)
            entries.append(entry)
    return tuple(entries)


# Neutron's section name and option names, for the per-source request rate limits.
RATE_SECTION = "metadata_rate_limiting"
KNOWN_SECTIONS = frozenset({"service", "front", "network", "router", RATE_SECTION, *ROLE_SECTIONS})


def compose(doc: Mapping[str, Any], environ: Mapping[str, str], source: Path | None) -> Config:
    """Build the Config from a parsed TOML document plus METAPROXY_<SECTION>__<KEY> overrides."""
    unknown = sorted(set(doc) - KNOWN_SECTIONS)
    if unknown:
        raise ConfigError(f"[{unknown[0]}]: unknown section", key=unknown[0])
    tables = {
        name: {**_table(doc, name), **env_overrides(environ, name)}
        for name in ("service", "front", RATE_SECTION, *ROLE_SECTIONS)
    }
    front = _front_defaults(tables["front"])
    return Config(
        service=_service(tables["service"]),
        front=front,
        fronts=_entries(doc, front),
        sections={name: tables[name] for name in ROLE_SECTIONS},
        source=source,
        rate_limit=RateLimitConfig.from_mapping(tables[RATE_SECTION], section=RATE_SECTION),
    )


def load(path: Path | None, environ: Mapping[str, str]) -> Config:
    """Read `path` (or nothing: the embedded defaults) and the environment into a Config."""
    doc = read_toml(path) if path is not None else {}
    return compose(doc, environ, path.absolute() if path is not None else None)


def describe(cfg: Config) -> dict[str, Any]:
    """The effective config as plain data, secrets masked: what `check-config` prints."""
    svc = cfg.service
    service: dict[str, Any] = {
        "state_path": str(svc.state_path),
        "engine": svc.engine,
        "log_level": svc.log_level,
        "log_target": svc.log_target,
        "control_socket": str(svc.control_path),
        "metrics": str(svc.metrics) if svc.metrics else "off",
        "metadata": svc.metadata_url or f"embedded (unix:{svc.metadata_socket})",
        "agent_socket": str(svc.agent_socket),
        "shared_secret": "***" if svc.shared_secret else "(generated on first start)",
        "shared_secret_file": str(svc.secret_path),
        "stop_timeout": svc.stop_timeout,
        "drain_timeout": svc.drain_timeout,
        "poll_interval": svc.poll_interval,
    }
    front = {
        "bind_address": cfg.front.bind_address or "(per kind)",
        "port": cfg.front.port or "(per kind)",
        "user": cfg.front.user,
        "group": cfg.front.group,
        "max_body": cfg.front.max_body,
        "maxconn": cfg.front.maxconn,
        "max_conn_per_source": cfg.front.max_conn_per_source,
        "isolate": cfg.front.isolate,
        "pipeline": cfg.front.pipeline,
        "network_netns": cfg.front.network_netns,
        "router_netns": cfg.front.router_netns,
        **{f"timeout_{f.name}": getattr(cfg.front.timeouts, f.name) for f in fields(Timeouts)},
    }
    fronts = [
        {
            "name": e.name,
            "netns": e.netns or "(host)",
            "bind_address": (spec := e.spec(svc, cfg.front)).bind_address,
            "port": spec.port,
            **({"interface": e.interface} if e.interface else {}),
        }
        for e in cfg.fronts
    ]
    sections = {name: _mask(dict(table)) for name, table in cfg.sections.items()}
    return {
        "source": str(cfg.source or "(embedded defaults)"),
        "service": service,
        "front": front,
        "fronts": fronts,
        RATE_SECTION: {
            f.name: list(v) if isinstance(v := getattr(cfg.rate_limit, f.name), tuple) else v
            for f in fields(RateLimitConfig)
        },
        **sections,
    }


def _mask(table: dict[str, Any]) -> dict[str, Any]:
    """Mask any value whose key looks secret (the roles' tables are passed through as-is)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        lowered = key.lower()
        secretish = any(w in lowered for w in ("secret", "password", "token", "key"))
        out[key] = "***" if secretish and not lowered.endswith(("_file", "_path")) else value
    return out
