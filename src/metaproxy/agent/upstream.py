"""The signed request to the metadata server, and Neutron's mapping of what comes back.

One keep-alive pool (agent/client.py) per agent, over TCP, TLS or a Unix socket.
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from metaproxy.agent.client import Answer, HttpPool
from metaproxy.agent.config import UpstreamConfig
from metaproxy.config import Secret
from metaproxy.errors import ClientProtocolError, ConfigError, UpstreamError
from metaproxy.metadata.records import PortMatch
from metaproxy.security.signing import sign_instance_id

log = logging.getLogger(__name__)

# The client headers worth relaying; everything else a guest sent stays behind (allow-list).
FORWARDED_HEADERS = (
    "Accept",
    "Content-Type",
    "X-aws-ec2-metadata-token",
    "X-aws-ec2-metadata-token-ttl-seconds",
)
# What the metadata server may tell the instance besides the body.
RETURNED_HEADERS = ("Content-Type", "X-aws-ec2-metadata-token-ttl-seconds")

# Neutron's pass-through set, plus 401: an IMDSv2 server answers 401 for a missing or expired
# token, and the guest (cloud-init, botocore) must see it to fetch a new one. Neutron raises on
# 401 and sends a 500, which sends such clients into their error path instead of a token refresh.
PASSED_THROUGH = frozenset({200, 400, 401, 403, 404, 409, 500, 502, 503, 504})
# Bodies the metadata server wrote for the guest; 5xx and 403 get a short generic one instead.
BODY_PASSED = frozenset({200, 400, 401, 404, 409})

_REASONS = {
    400: b"Bad Request\n",
    403: b"Forbidden\n",
    404: b"Not Found\n",
    500: b"Internal Server Error\n",
    502: b"Bad Gateway\n",
    503: b"Service Unavailable\n",
    504: b"Gateway Timeout\n",
}


def generic_body(status: int) -> bytes:
    return _REASONS.get(status, b"Error\n")


@dataclass(slots=True)  # not frozen: one per request, and a frozen __init__ costs 3x
class Reply:
    """What the agent sends back to the front."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def map_status(status: int) -> int:
    """Neutron's rule: the pass-through set as is, any other status is a bad gateway."""
    return status if status in PASSED_THROUGH else 502


_WANTED = {name.lower(): name for name in FORWARDED_HEADERS}


def upstream_headers(
    client: Iterable[tuple[str, str]], match: PortMatch, forwarded_for: str, secret: Secret
) -> dict[str, str]:
    """The exact headers sent upstream: allow-listed client headers, then Nova's four."""
    headers: dict[str, str] = {}
    for name, value in client:
        canonical = _WANTED.get(name.lower())
        if canonical is not None and canonical not in headers:
            headers[canonical] = value
    headers["X-Forwarded-For"] = forwarded_for
    headers["X-Instance-ID"] = match.instance_id
    headers["X-Tenant-ID"] = match.project_id
    headers["X-Instance-ID-Signature"] = sign_instance_id(secret, match.instance_id)
    return headers


def ssl_context(cfg: UpstreamConfig) -> ssl.SSLContext | None:
    """TLS for an https upstream: CA bundle or the explicit insecure switch; client cert."""
    if cfg.scheme != "https":
        return None
    try:
        if cfg.insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context = ssl.create_default_context(cafile=str(cfg.ca_cert) if cfg.ca_cert else None)
        if cfg.client_cert and cfg.client_key:
            context.load_cert_chain(str(cfg.client_cert), str(cfg.client_key))
    except (OSError, ssl.SSLError) as exc:
        # Name the files, not their contents: a key file's text must not reach a message.
        raise ConfigError(
            f"agent TLS setup failed (ca_cert={cfg.ca_cert}, client_cert={cfg.client_cert}, "
            f"client_key={cfg.client_key}): {type(exc).__name__}: {getattr(exc, 'strerror', '')}",
            key="agent.ca_cert",
        ) from None
    return context


ReplyDone = Callable[[Reply], None]
Observe = Callable[[PortMatch, float], None]
_SIGNED_CACHE = 16384


class Upstream:
    """A pooled client for the metadata server; `start` before use, `close` when done.

    `observe(match, seconds)`, when given, is told how long each answer took.
    """

    def __init__(
        self, cfg: UpstreamConfig, secret: Secret, *, observe: Observe | None = None
    ) -> None:
        self._cfg = cfg
        self._secret = secret
        self._ssl = ssl_context(cfg)
        self._observe = observe
        if cfg.scheme == "unix":
            self._host = b"localhost"
        else:
            host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
            self._host = f"{host}:{cfg.port}".encode("idna")
        self._host_line = b"Host: " + self._host + b"\r\n"
        self._pool: HttpPool | None = None
        # (instance, project, client address) → the four identity header lines, signed. The
        # signature is HMAC(secret, instance ID): constant per instance, so computed once.
        self._signed: dict[tuple[str, str, str], bytes] = {}
        # The client fields as relayed (a pure function of them; refusals are not kept).
        self._relayed: dict[tuple[tuple[bytes, bytes], ...], bytes] = {}

    async def start(self) -> None:
        cfg = self._cfg
        if cfg.scheme == "unix":
            self._pool = HttpPool.unix(
                str(cfg.unix_path),
                limit=cfg.pool_size,
                connect_timeout=cfg.connect_timeout,
                depth=cfg.pipeline,
            )
        else:
            self._pool = HttpPool.tcp(
                cfg.host,
                cfg.port,
                ssl_context=self._ssl,
                limit=cfg.pool_size,
                connect_timeout=cfg.connect_timeout,
                depth=cfg.pipeline,
            )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def submit(
        self,
        method: str,
        target: str,
        relayed: tuple[tuple[bytes, bytes], ...],
        body: bytes,
        match: PortMatch,
        forwarded_for: str,
        done: ReplyDone,
    ) -> None:
        """Send the signed request; `done` gets what the front should see.

        `relayed`: the client's fields as (lower-case name, value); only FORWARDED_HEADERS
        go upstream, each once. Once the request is sent, a failure is an answer (its
        status); a field that cannot be relayed raises ClientProtocolError before that.
        """
        pool = self._pool
        if pool is None:
            raise RuntimeError("Upstream.start() was not called")
        data = self._encode(method, target, relayed, body, match, forwarded_for)
        pool.submit(
            data,
            head=method == "HEAD",
            method=method,
            timeout=self._cfg.timeout,
            done=_Answered(self, match, done).answered,
        )

    def _encode(
        self,
        method: str,
        target: str,
        relayed: tuple[tuple[bytes, bytes], ...],
        body: bytes,
        match: PortMatch,
        forwarded_for: str,
    ) -> bytes:
        """serialize_request(upstream_headers(...)), byte for byte, with the signed part cached."""
        key = (match.instance_id, match.project_id, forwarded_for)
        signed = self._signed.get(key)
        if signed is None:
            if len(self._signed) >= _SIGNED_CACHE:
                self._signed.clear()
            signed = self._signed[key] = _header_lines(
                {
                    "X-Forwarded-For": forwarded_for,
                    "X-Instance-ID": match.instance_id,
                    "X-Tenant-ID": match.project_id,
                    "X-Instance-ID-Signature": sign_instance_id(self._secret, match.instance_id),
                }
            )
        parts = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1"), self._host_line]
        if relayed:
            lines = self._relayed.get(relayed)
            if lines is None:
                if len(self._relayed) >= _SIGNED_CACHE:
                    self._relayed.clear()
                lines = self._relayed[relayed] = _client_lines(relayed)
            parts.append(lines)
        parts.append(signed)
        if body or method in ("POST", "PUT", "PATCH"):
            parts.append(b"Content-Length: %d\r\n" % len(body))
        parts.append(b"\r\n")
        if body:
            parts.append(body)
        return b"".join(parts)

    def _reply(self, answer: Answer) -> Reply:
        status = answer.status
        if map_status(status) != status:
            log.warning(
                "metadata server %s answered unexpected status %d: sending 502",
                self._cfg.url,
                status,
            )
            return Reply(502, generic_body(502))
        if status == 403:
            log.warning(
                "metadata server %s answered 403 Forbidden: the shared secrets most likely do "
                "not match",
                self._cfg.url,
            )
        elif status >= 500:
            log.warning("metadata server %s answered %d", self._cfg.url, status)
        if status not in BODY_PASSED:
            return Reply(status, generic_body(status))
        content_type = ttl = None
        for key, value in answer.headers:
            lower = key.lower()
            if lower == _CONTENT_TYPE:
                if content_type is None:
                    content_type = value
            elif lower == _TTL and ttl is None:
                ttl = value
        kept = _KEPT.get((content_type, ttl))
        if kept is None:
            kept = _kept(content_type, ttl)
        return Reply(status, answer.body, kept)


_CONTENT_TYPE, _TTL = (name.lower().encode() for name in RETURNED_HEADERS)
_KEPT: dict[tuple[bytes | None, bytes | None], tuple[tuple[str, str], ...]] = {}


def _kept(content_type: bytes | None, ttl: bytes | None) -> tuple[tuple[str, str], ...]:
    """The returned headers as the front gets them (remembered: a handful of kinds)."""
    kept = tuple(
        (name, value.decode("latin-1"))
        for name, value in zip(RETURNED_HEADERS, (content_type, ttl), strict=True)
        if value is not None
    )
    if len(_KEPT) >= 1024:
        _KEPT.clear()
    _KEPT[(content_type, ttl)] = kept
    return kept


_CANONICAL = {name.lower().encode(): name.encode() for name in FORWARDED_HEADERS}


class _Answered:
    """Turns the pool's answer (or failure) for one request into the front's Reply."""

    __slots__ = ("done", "match", "started", "upstream")

    def __init__(self, upstream: Upstream, match: PortMatch, done: ReplyDone) -> None:
        self.upstream = upstream
        self.match = match
        self.done = done
        self.started = time.perf_counter() if upstream._observe is not None else 0.0

    def answered(self, answer: Answer | None, error: UpstreamError | None) -> None:
        upstream = self.upstream
        if upstream._observe is not None:
            upstream._observe(self.match, time.perf_counter() - self.started)
        if answer is not None:
            self.done(upstream._reply(answer))
            return
        error = error or UpstreamError("no answer")
        log.warning(
            "metadata server %s failed for instance %s: %s",
            upstream._cfg.url,
            self.match.instance_id,
            error,
        )
        self.done(Reply(error.status_hint, generic_body(error.status_hint)))


def _client_lines(relayed: tuple[tuple[bytes, bytes], ...]) -> bytes:
    """The allow-listed client fields, first occurrence of each, as they will be relayed."""
    lines = []
    seen = set()
    for lower, value in relayed:
        canonical = _CANONICAL.get(lower)
        if canonical is None or canonical in seen:
            continue
        seen.add(canonical)
        if _BAD_VALUE.search(value):
            raise ClientProtocolError(f"control character in header {canonical.decode()}")
        lines.append(canonical + b": " + value + b"\r\n")
    return b"".join(lines)


_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def serialize_request(
    method: str, target: str, host: bytes, headers: dict[str, str], body: bytes
) -> bytes:
    """The request bytes; a control character in any value is refused (header injection).

    Values are relayed byte for byte: the protocol layer decoded them as latin-1.
    """
    lines = [f"{method} {target} HTTP/1.1".encode("latin-1"), b"Host: " + host]
    if headers:
        lines.append(_header_lines(headers)[:-2])
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _header_lines(headers: dict[str, str]) -> bytes:
    """`Name: value\\r\\n` for each header; a control character in a value is refused."""
    lines = []
    for name, value in headers.items():
        try:
            raw = value.encode("latin-1")
        except UnicodeEncodeError:
            raise ClientProtocolError(f"header {name} is not latin-1") from None
        if _BAD_VALUE.search(raw):
            raise ClientProtocolError(f"control character in header {name}")
        lines.append(name.encode("latin-1") + b": " + raw + b"\r\n")
    return b"".join(lines)
