"""Logging setup and the redaction filter that keeps secrets out of every line."""

from __future__ import annotations

import logging
import re
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


def setup(level: str = "INFO", *, stream: object = None) -> None:
    """Configure the root logger once: stderr, one line per event, secrets redacted."""
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
