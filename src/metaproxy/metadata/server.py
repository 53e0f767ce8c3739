"""The embedded metadata server: Nova's signature check, routing, and a lean HTTP/1.1 shell.

`MetadataApp.handle` is the whole policy (no sockets; table-tested). `MetadataServer` serves it
over TCP or a Unix socket with httptools, in the caller's asyncio loop:

    server = MetadataServer(config, store)
    await server.start()          # bound and serving; server.address says where
    ...
    await server.stop()           # closes the listener and every connection

or `await serve(config, store)` to run until cancelled. Order of checks, as Nova does it:
`GET /` (the EC2 version list) needs no identity; then X-Instance-ID / X-Tenant-ID /
X-Instance-ID-Signature (missing or repeated → 400, bad signature → 403, unknown instance or
another project's → 404); then the session token (401); then the path (404) and method (405).
GETs never write to the store: instance views are cached until the store's data_version moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

import httptools

from metaproxy.config import Secret
from metaproxy.errors import ClientProtocolError, ConfigError
from metaproxy.http import sequence
from metaproxy.metadata import ec2, openstack, reply, tokens
from metaproxy.metadata.config import MetadataConfig, TokenMode
from metaproxy.metadata.model import MAX_PASSWORD
from metaproxy.metadata.reply import Reply
from metaproxy.metadata.store import InstanceView, Store
from metaproxy.security.signing import sign_instance_id

log = logging.getLogger(__name__)

MAX_TARGET = 4096
MAX_HEADERS = 64
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY = 64 * 1024
IDLE_TIMEOUT = 60.0
CACHE_SIZE = 4096
ANSWERS_PER_INSTANCE = 256
# How often the store is asked whether anything changed (one SQLite call); an admin's change is
# served at most this late. The server's own writes (passwords) are seen at once.
REFRESH = 0.05

_IDENTITY = (b"x-instance-id", b"x-tenant-id", b"x-instance-id-signature")
_WANTED = frozenset({*_IDENTITY, tokens.TOKEN_HEADER.encode(), tokens.TTL_HEADER.encode()})
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT"})
_TOKEN_PARTS = tuple(tokens.TOKEN_PATH.strip("/").split("/"))


class _Refused(Exception):
    """Stop handling a request with this reply (and log why, for the operator)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.reply = reply.error(status)


def split_path(target: bytes) -> tuple[str, ...]:
    """Origin-form target → path segments; anything odd is a 404, never a different lookup.

    Empty segments collapse (`//`), as in Nova. `.`/`..` segments, percent-encoded or not, and
    non-ASCII or control bytes are refused rather than resolved: no path reaches outside the
    tree of the instance the agent vouched for.
    """
    path = target.split(b"?", 1)[0]
    if not path.startswith(b"/"):
        raise _Refused(400, "request target is not origin-form")
    if b"%" in path:
        path = unquote_to_bytes(path)
    if any(b < 0x21 or b > 0x7E for b in path):
        raise _Refused(404, "non-ASCII or control byte in path")
    parts = tuple(p for p in path.decode("ascii").split("/") if p)
    if any(p in (".", "..") for p in parts):
        raise _Refused(404, "dot segment in path")
    return parts


_PATHS: dict[bytes, tuple[str, ...]] = {}
_PATHS_SIZE = 4096


def _split_cached(target: bytes) -> tuple[str, ...]:
    """split_path(target), remembered (it is pure); refusals are not remembered."""
    parts = _PATHS.get(target)
    if parts is None:
        parts = split_path(target)
        if len(_PATHS) >= _PATHS_SIZE:
            _PATHS.clear()
        _PATHS[target] = parts
    return parts


class _Rendered:
    """A cached GET answer: the Reply, and the whole keep-alive HTTP answer as bytes.

    A seeded answer (meta_data.json) gets a fresh random_seed per request: `wire` then holds
    everything up to the seed, and the seed and the closing `"}` are appended per request (the
    seed's length is fixed, so Content-Length is known once).
    """

    __slots__ = ("reply", "wire")

    def __init__(self, answer: Reply) -> None:
        self.reply = answer
        if answer.seeded:
            body = answer.body[:-1] + openstack.SEED_OPEN
            length = len(body) + openstack.SEED_LENGTH + len(openstack.SEED_CLOSE)
            self.wire = reply.head(answer, length) + body
        else:
            self.wire = reply.head(answer, len(answer.body)) + answer.body

    def bytes(self) -> bytes:
        if self.reply.seeded:
            return self.wire + openstack.seed() + openstack.SEED_CLOSE
        return self.wire

    def as_reply(self) -> Reply:
        return openstack.seeded(self.reply) if self.reply.seeded else self.reply


class _Entry:
    """One instance's view and the GET answers already rendered for it."""

    __slots__ = ("answers", "ec2_tree", "view")

    def __init__(self, view: InstanceView) -> None:
        self.view = view
        self.answers: dict[tuple[str, ...], _Rendered] = {}
        self.ec2_tree: ec2.Tree | None = None  # built at the first EC2 request


class MetadataApp:
    """Everything but the sockets: identity check, tokens, both trees."""

    def __init__(
        self,
        store: Store,
        secret: Secret,
        sessions: TokenMode = "optional",
        *,
        issuer: tokens.TokenIssuer | None = None,
        clock: Callable[[], float] = time.time,
        refresh: float = REFRESH,
    ) -> None:
        if not secret:
            raise ConfigError("the metadata server needs a shared secret", key="shared_secret")
        self._store = store
        self._secret = secret
        self._sessions = sessions
        self._issuer = issuer or tokens.TokenIssuer.from_secret(secret.reveal().encode())
        self._clock = clock
        self._cache: dict[str, _Entry | None] = {}
        self._cache_version: tuple[int, int] | None = None
        self._refresh = refresh
        self._checked = 0.0
        self._signatures: dict[str, bytes] = {}

    def handle(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b""
    ) -> Reply:
        """One request → one reply; HEAD is answered as GET (the shell drops the body)."""
        answer = self._answer(method, target, headers, body)
        return answer.as_reply() if isinstance(answer, _Rendered) else answer

    def handle_bytes(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b""
    ) -> bytes:
        """handle(), as the whole keep-alive HTTP/1.1 answer (a cached rendering is reused)."""
        answer = self._answer(method, target, headers, body)
        if isinstance(answer, _Rendered):
            return answer.bytes()
        return reply.head(answer, len(answer.body)) + answer.body

    def _answer(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Reply | _Rendered:
        try:
            return self._handle("GET" if method == "HEAD" else method, target, headers, body)
        except _Refused as exc:
            level = logging.WARNING if exc.reply.status in (400, 401, 403) else logging.INFO
            if log.isEnabledFor(level):
                log.log(level, "%s %r → %d: %s", method, target[:200], exc.reply.status, exc)
            return exc.reply

    def _handle(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Reply | _Rendered:
        if method not in _METHODS:
            return reply.not_allowed("GET, HEAD")
        parts = _split_cached(target)
        if not parts:
            # Nova answers the EC2 version list before looking at any identity.
            return ec2.VERSION_LIST if method == "GET" else reply.not_allowed("GET, HEAD")
        found = _collect(headers)
        entry = self._authenticate(found)
        if parts == _TOKEN_PARTS:
            return self._token(method, entry.view, found)
        self._check_token(entry.view, found)
        if method == "GET":
            rendered = entry.answers.get(parts)
            if rendered is not None:
                return rendered
            answer = self._render(entry, parts, method, body)
            # Only what exists is kept: the tree is finite, a guest's random paths are not.
            if answer.status == 200 and len(entry.answers) < ANSWERS_PER_INSTANCE:
                rendered = entry.answers[parts] = _Rendered(answer)
                return rendered
        else:
            answer = self._render(entry, parts, method, body)
            if answer is openstack.PASSWORD_STORE:
                return self._store_password(entry.view, body)
        return openstack.seeded(answer) if answer.seeded else answer

    @staticmethod
    def _render(entry: _Entry, parts: tuple[str, ...], method: str, body: bytes) -> Reply:
        if parts[0] == "openstack":
            return openstack.respond(entry.view, parts[1:], method, body)
        if method != "GET":
            return reply.not_allowed("GET, HEAD")
        if entry.ec2_tree is None:
            entry.ec2_tree = ec2.version_tree(entry.view)
        return ec2.respond(entry.view, parts, entry.ec2_tree)

    # -- identity -----------------------------------------------------------------------------

    def _authenticate(self, found: dict[bytes, list[bytes]]) -> _Entry:
        values = []
        for name in _IDENTITY:
            got = found.get(name, [])
            if len(got) != 1 or not got[0]:
                what = "missing" if not got or not got[0] else "repeated"
                raise _Refused(400, f"{name.decode()} header {what}")
            values.append(got[0].decode("latin-1"))
        instance_id, tenant_id, signature = values
        if not self._verify(instance_id, signature):
            raise _Refused(403, f"bad signature for instance {instance_id[:64]!r}")
        entry = self._entry(instance_id)
        if entry is None:
            raise _Refused(404, f"unknown instance {instance_id[:64]!r}")
        if entry.view.instance.project_id != tenant_id:
            raise _Refused(
                404, f"instance {instance_id} belongs to another project than {tenant_id[:64]!r}"
            )
        return entry

    def _verify(self, instance_id: str, signature: str) -> bool:
        """verify_instance_id, with the expected signature (HMAC of the ID) computed once."""
        expected = self._signatures.get(instance_id)
        if expected is None:
            if len(self._signatures) >= CACHE_SIZE:
                self._signatures.clear()
            expected = self._signatures[instance_id] = sign_instance_id(
                self._secret, instance_id
            ).encode("ascii")
        # hmac.compare_digest: constant time, as verify_instance_id compares.
        return hmac.compare_digest(expected, signature.encode("utf-8", "replace"))

    def _entry(self, instance_id: str) -> _Entry | None:
        """The cached view and answers, dropped whenever the store changed (any process)."""
        now = time.monotonic()
        if now - self._checked >= self._refresh or self._cache_version is None:
            self._checked = now
            version = self._store.data_version()
            if version != self._cache_version:
                self._cache.clear()
                self._cache_version = version
        elif self._store.data_version_local() != self._cache_version[1]:
            self._cache.clear()  # our own write (a password): never serve the old one
            self._cache_version = self._store.data_version()
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        try:
            return self._cache[instance_id]
        except KeyError:
            view = self._store.instance_view(instance_id)
            entry = self._cache[instance_id] = None if view is None else _Entry(view)
            return entry

    # -- tokens -------------------------------------------------------------------------------

    def _token(self, method: str, view: InstanceView, found: dict[bytes, list[bytes]]) -> Reply:
        if self._sessions == "off":
            # As a metadata service without tokens answers (Nova): botocore and cloud-init then
            # carry on without one; a 403 would make cloud-init give up on the endpoint.
            return reply.NOT_FOUND
        if method != "PUT":
            return reply.not_allowed("PUT")
        try:
            ttl = tokens.parse_ttl(found.get(tokens.TTL_HEADER.encode(), []))
        except ClientProtocolError as exc:
            raise _Refused(exc.status_hint, str(exc)) from exc
        token = self._issuer.issue(view.instance.uuid, ttl, self._clock())
        return Reply(200, token.encode(), reply.TEXT, ((tokens.TTL_HEADER.encode(), b"%d" % ttl),))

    def _check_token(self, view: InstanceView, found: dict[bytes, list[bytes]]) -> None:
        if self._sessions == "off":
            return
        given = found.get(tokens.TOKEN_HEADER.encode(), [])
        if not given:
            if self._sessions == "required":
                raise _Refused(401, "no session token (tokens are required)")
            return
        if len(given) > 1:
            raise _Refused(400, "session token header repeated")
        if not self._issuer.valid(view.instance.uuid, given[0], self._clock()):
            raise _Refused(401, f"expired or foreign session token for {view.instance.uuid}")

    # -- the one write a guest can make ---------------------------------------------------------

    def _store_password(self, view: InstanceView, body: bytes) -> Reply:
        if len(body) > MAX_PASSWORD:
            raise _Refused(400, f"password of {len(body)} bytes is over {MAX_PASSWORD}")
        try:
            password = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused(400, "password is not UTF-8") from None
        if not self._store.set_password(view.instance.uuid, password):
            return reply.error(409)
        log.info("instance %s stored its password", view.instance.uuid)
        return reply.ok(b"")


def _collect(headers: list[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    """The headers this server reads, by lower-case name, with every occurrence kept."""
    found: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        key = name.lower()
        if key in _WANTED:
            found.setdefault(key, []).append(value.strip())
    return found


# -- the HTTP shell -------------------------------------------------------------------------------


class _Reject(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class _HttpProtocol(asyncio.Protocol):
    """One connection: httptools parses, MetadataApp answers, in order (pipelining is safe).

    The answers to every request one read holds go out in one write. A request's
    `X-Metaproxy-Seq` is echoed in its answer: the agent pipelines only to a server that does,
    and checks every answer's number (metaproxy.agent.client).
    """

    def __init__(self, app: MetadataApp, connections: set[_HttpProtocol]) -> None:
        self._app = app
        self._connections = connections
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._idle: asyncio.TimerHandle | None = None
        self._last = 0.0  # loop time of the last bytes received
        self._out: list[bytes] = []  # answers to the requests of the read being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._seq = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._connections.add(self)
        self._last = self._loop.time()
        self._idle = self._loop.call_later(IDLE_TIMEOUT, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        self._transport = None

    # A client that pipelines requests but never reads the answers must not grow our buffer:
    # stop reading while the transport's write buffer is over its high-water mark.
    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _check_idle(self) -> None:
        """Close after IDLE_TIMEOUT without a byte (one timer per connection, not per read)."""
        self._idle = None
        if self._transport is None:
            return
        quiet = self._loop.time() - self._last
        if quiet >= IDLE_TIMEOUT:
            self.close()
        else:
            self._idle = self._loop.call_later(IDLE_TIMEOUT - quiet, self._check_idle)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        self._last = self._loop.time()
        try:
            self._parser.feed_data(data)
        except (_Reject, httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # httptools wraps an exception raised in a callback: the cause carries our status.
            reject = exc if isinstance(exc, _Reject) else exc.__cause__ or exc.__context__
            status = reject.status if isinstance(reject, _Reject) else 400
            self._out.append(reply.head(reply.error(status), 0, close=True))
            self._out.append(reply.error(status).body)
            self._flush(close=True)
            return
        if self._out:
            self._flush(close=False)

    def _flush(self, *, close: bool) -> None:
        out, self._out = self._out, []
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(out[0] if len(out) == 1 else b"".join(out))
        if close:
            transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url, self._headers, self._header_bytes = b"", [], 0
        self._body, self._body_bytes = [], 0
        self._seq = b""

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_TARGET:
            raise _Reject(431)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._header_bytes += len(name) + len(value)
        if len(self._headers) > MAX_HEADERS or self._header_bytes > MAX_HEADER_BYTES:
            raise _Reject(431)
        if sequence.is_field(name):
            if self._seq or not sequence.valid(value):
                raise _Reject(400)
            self._seq = value

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY:
            raise _Reject(413)
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode("ascii", "replace")
        keep_alive = self._parser.should_keep_alive()
        body = b"".join(self._body) if self._body else b""
        seq = self._seq
        try:
            if keep_alive and method != "HEAD":
                whole = self._app.handle_bytes(method, self._url, self._headers, body)
                self._out.append(sequence.numbered(whole, seq) if seq else whole)
                return
            answer = self._app.handle(method, self._url, self._headers, body)
        except Exception:
            log.exception("metadata request %s %r failed", method, self._url[:200])
            answer = reply.error(500)
        head = reply.head(answer, len(answer.body), close=not keep_alive)
        self._out.append(sequence.numbered(head, seq) if seq else head)
        if method != "HEAD":
            self._out.append(answer.body)
        if not keep_alive:
            self._flush(close=True)


class MetadataServer:
    """The app on a socket, in the running loop; start() then stop() (also an async context)."""

    def __init__(self, config: MetadataConfig, store: Store, *, app: MetadataApp | None = None):
        self.config = config
        self.app = app or MetadataApp(store, config.shared_secret, config.tokens)
        self._server: asyncio.Server | None = None
        self._connections: set[_HttpProtocol] = set()

    @property
    def address(self) -> str:
        """Where it listens: `host:port` (the real port when 0 was asked) or `unix:/path`."""
        listen = self.config.listen
        if listen.unix is not None or self._server is None:
            return str(listen)
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def url(self) -> str:
        """The base URL for TCP clients (http://host:port)."""
        return f"http://{self.address}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listen = self.config.listen

        def factory() -> _HttpProtocol:
            return _HttpProtocol(self.app, self._connections)

        try:
            if listen.unix is not None:
                _remove_stale_socket(listen.unix)
                self._server = await loop.create_unix_server(factory, str(listen.unix))
                os.chmod(listen.unix, 0o660)
            else:
                self._server = await loop.create_server(
                    factory, listen.host, listen.port or 0, reuse_address=True
                )
        except OSError as exc:
            raise ConfigError(
                f"metadata.listen: cannot listen on {listen}: {exc.strerror}", key="metadata.listen"
            ) from exc
        log.info("metadata server listening on %s (tokens %s)", self.address, self.config.tokens)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self._connections):
            connection.close()
        if self._connections:
            # close() waits to flush; a peer that stopped reading would hold us forever.
            await asyncio.sleep(0.1)
            for connection in list(self._connections):
                connection.abort()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5)
        self._server = None
        if self.config.listen.unix is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.listen.unix)
        log.info("metadata server stopped")

    async def __aenter__(self) -> MetadataServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


def _remove_stale_socket(path: os.PathLike[str]) -> None:
    """A dead socket left by a previous run is ours to replace; a live one or any file is not."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(
            f"metadata.listen: {path} exists and is not a socket", key="metadata.listen"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(os.fspath(path))
    except OSError:
        os.unlink(path)  # nobody answers: stale
    else:
        raise ConfigError(
            f"metadata.listen: {path} is in use by another server", key="metadata.listen"
        )
    finally:
        probe.close()


async def serve(config: MetadataConfig, store: Store) -> None:
    """Serve until cancelled, then stop cleanly."""
    server = MetadataServer(config, store)
    await server.start()
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()
