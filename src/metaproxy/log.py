"""Logging setup and the redaction filter that keeps secrets out of every line."""

from __future__ import annotations

import logging
import logging.handlers
import re
import socket
import sys

log = logging.getLogger(__name__)

# Header values that must never reach a log line, whatever module formats them.
_SENSITIVE = re.compile(
    r"(?i)(x-instance-id-signature|metadata_proxy_shared_secret|shared_secret|secret|"
    r"x-aws-ec2-metadata-token)(\s*[:=]\s*|['\"]\s*[:,]\s*['\"]?)([^\s,'\"]+)"
)

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def redact(text: str) -> str:
    """Mask the value that follows any sensitive key in free text."""
    return _SENSITIVE.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)


class RedactingFilter(logging.Filter):
    """Rewrite each record's final message with secrets masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


SYSLOG_SOCKET = "/dev/log"
_SYSLOG_FORMAT = "metaproxy[%(process)d]: %(levelname)s %(name)s: %(message)s"


def setup(
    level: str = "INFO",
    *,
    stream: object = None,
    target: str = "stderr",
    syslog_address: str = SYSLOG_SOCKET,
) -> None:
    """Configure the root logger: one line per event to stderr, or to the local syslog socket
    (facility daemon) with target "syslog"; secrets are redacted either way.

    When the syslog socket cannot be reached, logging goes to stderr and says why in its first
    line: a service must not start blind, nor refuse to start over its log.
    """
    problem = None
    handler: logging.Handler
    if target == "syslog":
        # SysLogHandler swallows a failed connect and then drops every line: probe first.
        problem = _unreachable(syslog_address)
        if problem is None:
            handler = logging.handlers.SysLogHandler(
                address=syslog_address, facility=logging.handlers.SysLogHandler.LOG_DAEMON
            )
            handler.setFormatter(logging.Formatter(_SYSLOG_FORMAT))
    if target != "syslog" or problem is not None:
        handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
        handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    if problem is not None:
        log.warning("%s", problem)


def _unreachable(address: str) -> str | None:
    """Why the syslog socket at `address` cannot take lines, or None when it can."""
    error: OSError | None = None
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(address)
            except OSError as exc:
                error = error or exc
            else:
                return None
    reason = error.strerror if error is not None and error.strerror else str(error)
    return f"syslog socket {address}: {reason}; logging to stderr"
