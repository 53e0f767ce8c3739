"""Render one front's haproxy config: Neutron's shape, with the front contract enforced.

Pure: a FrontSpec and RenderSettings in, config text out (golden files in tests/data/).

What Neutron's config had: global user/group and maxconn 1024, defaults in http mode with
`option http-server-close` and the five timeouts, one listener, one server (the agent's Unix
socket). What this one adds, in rule order (haproxy runs `http-request` rules top to bottom):

0. No h2c by prior knowledge, and at most `max_conn_per_source` concurrent connections per
   client address (an idle-connection flood from one guest must not take the others' slots).
1. only GET/HEAD/POST/PUT (405); HTTP/1.0 or 1.1, and Host in 1.1 (400); origin-form targets
   only (absolute-form, authority-form and `*` → 400); a head over 8 KiB or with over 64
   fields (431, as the builtin engine); Upgrade refused (400, no tunnel to the agent); header
   names with an underscore refused (400: `X_Neutron_Network_ID` must not slip past a
   dash-based deny rule, Neutron LP #1865036);
   Content-Length over the body limit (413); chunked bodies refused (400: the agent needs a
   known length, and a stream could outrun the limit).
2. IMDSv2's rule: `PUT /latest/api/token` carrying a client X-Forwarded-For → 403, checked
   before the client's X-Forwarded-For is thrown away. Applied to every PUT (PUT exists only
   for the token, and the metadata server may route other spellings of its path there).
2b. With Neutron's `rate_limit_enabled` (and the front's address family in `ip_versions`): each
   request that passed the rules above is counted per source in two stick tables (base and
   burst window, `http_req_rate`, the same sliding estimate the builtin engine computes), and
   one over either limit gets 429.
3. Every client-sent identity header is deleted (any case), then every header not on the
   short allow-list, then ours are set: one identity header and `X-Forwarded-For: <src>`.

`option http-server-close` is kept (one agent connection per request): the agent derives
identity per request, and never sharing an upstream connection between guests keeps a
confused agent from mixing them up; a Unix-socket connect costs microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from metaproxy.config import FrontSpec
from metaproxy.errors import ConfigError
from metaproxy.front.ratelimit import RateLimitConfig, SourceLimits

# The client headers the agent may see (the COMMON front→agent seam).
FORWARDED_HEADERS = (
    "host",
    "accept",
    "content-type",
    "content-length",
    "user-agent",
    "x-aws-ec2-metadata-token",
    "x-aws-ec2-metadata-token-ttl-seconds",
)
# Client-sent identity headers: deleted explicitly (the allow-list would drop them too; this
# states the intent and survives a future widening of the allow-list).
IDENTITY_HEADER_PATTERN = (
    r"(?i)^(x-neutron-.*|x-ovn-.*|x-instance-id.*|x-tenant-id|x-metadata-provider.*"
    r"|x-forwarded-for|forwarded|x-real-ip)$"
)
ALLOWED_METHODS = ("GET", "HEAD", "POST", "PUT")
MAX_HEAD = 8192
MAX_FIELDS = 64
# Stick-table rows: one per client address seen within the expiry (a network's instances).
TABLE_SIZE = "64k"


@dataclass(frozen=True, slots=True)
class RenderSettings:
    """How haproxy itself runs (where it logs, its read-only stats socket) and the per-source
    limits it enforces."""

    log: Literal["stderr", "none"] = "stderr"
    stats_socket: Path | None = None
    limits: SourceLimits = field(default_factory=SourceLimits)


def _duration(seconds: float) -> str:
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def _bind_line(spec: FrontSpec) -> str:
    host = f"[{spec.bind_address}]" if ":" in spec.bind_address else spec.bind_address
    parts = [f"bind {host}:{spec.port}"]
    if spec.interface:
        parts.append(f"interface {spec.interface}")
    if spec.netns:
        parts.append(f"namespace {spec.netns}")
    return " ".join(parts)


def _global(spec: FrontSpec, settings: RenderSettings) -> list[str]:
    # One thread: a metadata front is light, and haproxy's default (a thread per CPU) times
    # hundreds of networks on a big host is thousands of idle threads.
    lines = ["global", f"    maxconn {spec.maxconn}", "    nbthread 1"]
    if spec.user is not None:
        lines.append(f"    uid {spec.user}")
    if spec.group is not None:
        lines.append(f"    gid {spec.group}")
    if settings.log == "stderr":
        lines.append("    log stderr format short local0 info")
    if settings.stats_socket is not None:
        lines.append(f"    stats socket {settings.stats_socket} mode 600 level user")
    # No `pidfile`: haproxy would write it 0644 through any symlink at the path; metaproxy
    # writes haproxy's pid itself through security/files.py.
    return lines


def _defaults(spec: FrontSpec, settings: RenderSettings) -> list[str]:
    t = spec.timeouts
    lines = ["defaults", "    mode http"]
    if settings.log == "stderr":
        lines += ["    log global", "    option httplog", "    option dontlognull"]
    lines += [
        "    option http-server-close",
        f"    timeout http-request {_duration(t.http_request)}",
        f"    timeout connect {_duration(t.connect)}",
        f"    timeout client {_duration(t.client)}",
        f"    timeout server {_duration(t.server)}",
        f"    timeout http-keep-alive {_duration(t.http_keep_alive)}",
    ]
    return lines


def _rate_limited(spec: FrontSpec, rate: RateLimitConfig) -> bool:
    """Neutron's `ip_versions`: a front listens on one family, so this is decided here."""
    family = 6 if ":" in spec.bind_address else 4
    return rate.rate_limit_enabled and family in rate.ip_versions


def _rate_rules(spec: FrontSpec, rate: RateLimitConfig) -> list[str]:
    if not _rate_limited(spec, rate):
        return []
    # track-sc counts this request before the deny looks, so `gt N` lets N through per window.
    return [
        "    http-request track-sc1 src table rate_base",
        "    http-request track-sc2 src table rate_burst",
        f"    http-request deny deny_status 429 if "
        f"{{ sc1_http_req_rate(rate_base) gt {rate.base_query_rate_limit} }} || "
        f"{{ sc2_http_req_rate(rate_burst) gt {rate.burst_query_rate_limit} }}",
    ]


def _rate_tables(spec: FrontSpec, rate: RateLimitConfig) -> list[list[str]]:
    """A stick table per window; haproxy allows one table per section, hence two backends."""
    if not _rate_limited(spec, rate):
        return []
    tables = []
    for name, window in (
        ("rate_base", rate.base_window_duration),
        ("rate_burst", rate.burst_window_duration),
    ):
        period = _duration(window)
        tables.append(
            [
                f"backend {name}",
                f"    stick-table type ipv6 size {TABLE_SIZE} expire {_duration(2 * window)} "
                f"store http_req_rate({period})",
            ]
        )
    return tables


def _frontend(spec: FrontSpec, limits: SourceLimits) -> list[str]:
    allowed = "|".join(FORWARDED_HEADERS)
    deny = "    http-request deny deny_status"
    return [
        "frontend metadata",
        f"    {_bind_line(spec)}",
        f"    maxconn {spec.maxconn}",
        # h2c by prior knowledge would bypass every HTTP/1 rule below.
        "    option disable-h2-upgrade",
        # One guest must not hold every slot: idle sockets over the cap are closed at accept.
        f"    stick-table type ipv6 size {TABLE_SIZE} expire 60s store conn_cur",
        "    tcp-request connection track-sc0 src",
        f"    tcp-request connection reject if {{ sc0_conn_cur gt {limits.max_conn_per_source} }}",
        f"{deny} 405 unless {{ method {' '.join(ALLOWED_METHODS)} }}",
        # haproxy's H1 parser takes `GET / HTTP/2.0` as a request; the builtin engine refuses it,
        # and so must this one (found by the attack suite's fuzzing).
        f"{deny} 400 unless {{ req.ver 1.0 1.1 }}",
        # RFC 9112 §3.2: an HTTP/1.1 request without Host is a 400 (haproxy relays it).
        f"{deny} 400 if {{ req.ver 1.1 }} !{{ req.hdr(host) -m found }}",
        # Origin-form of visible ASCII only: no absolute/authority form, `*`, or control bytes.
        f"{deny} 400 unless {{ url -m reg ^/[!-~]*$ }}",
        # The builtin engine's head limits (http/policy.py): 8 KiB of head, 64 fields → 431.
        "    http-request set-var(txn.head_len) req.hdrs,length",
        f"    http-request return status 431 content-type text/plain "
        f'string "Request header fields too large" if '
        f"{{ url,length,add(txn.head_len) gt {MAX_HEAD} }} || {{ req.hdr_cnt gt {MAX_FIELDS} }}",
        f"{deny} 400 if {{ req.hdr(upgrade) -m found }}",
        f"{deny} 400 if {{ req.hdr_names -m sub _ }}",
        f"{deny} 413 if {{ req.hdr_val(content-length) gt {spec.max_body} }}",
        f"{deny} 400 if {{ req.hdr(transfer-encoding) -m found }}",
        # Every PUT: a metadata server may route /LATEST//api/%74oken/ to the token, too.
        f"{deny} 403 if {{ method PUT }} {{ req.hdr(x-forwarded-for) -m found }}",
        *_rate_rules(spec, limits.rate_limit),
        f"    http-request del-header {IDENTITY_HEADER_PATTERN} -m reg",
        f"    http-request del-header (?i)^(?!({allowed})$) -m reg",
        f"    http-request set-header {spec.identity.header} {spec.identity.id}",
        "    http-request set-header X-Forwarded-For %[src]",
        "    default_backend agent",
    ]


def _backend(spec: FrontSpec) -> list[str]:
    return ["backend agent", f"    server agent unix@{spec.upstream_socket}"]


def render_config(spec: FrontSpec, settings: RenderSettings | None = None) -> str:
    """The complete haproxy config for `spec` (IDs and paths are pre-validated by FrontSpec)."""
    settings = settings or RenderSettings()
    for path in (spec.upstream_socket, settings.stats_socket):
        if path is not None and any(c.isspace() or c in "#\\'\"" for c in str(path)):
            raise ConfigError(f"path {path!s} cannot appear in a haproxy config", key="path")
    header = f"# metaproxy haproxy front for {spec.identity.kind} {spec.identity.id} (generated)"
    sections = [
        [header],
        _global(spec, settings),
        _defaults(spec, settings),
        _frontend(spec, settings.limits),
        _backend(spec),
        *_rate_tables(spec, settings.limits.rate_limit),
    ]
    return "\n\n".join("\n".join(s) for s in sections) + "\n"
