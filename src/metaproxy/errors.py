"""The exception tree, classified by who is to blame.

MetaproxyError
├── ConfigError             bad file, flag or value         → exit 2
├── ProcessError            spawn / exit / check failed     (argv, returncode, stderr tail)
│   └── UntrustedBinary     a binary or directory failed validation
├── NamespaceError          setns / namespace missing / fd passing
├── FileError               a private file or directory could not be made safely (path, errno)
├── CleanupError            a file or process we made could not be removed
├── StoreError              the store refused a change      → exit 1
├── ClientProtocolError     a guest sent bad HTTP           → 4xx (status_hint)
└── UpstreamError           connect / timeout / bad answer  → 502 / 503 / 504 (status_hint)

Only `metaproxy.cli.main` turns one of these into an exit status.
"""

from __future__ import annotations

from collections.abc import Sequence


class MetaproxyError(Exception):
    """Base of every error metaproxy raises on purpose."""

    exit_code = 1


class ConfigError(MetaproxyError):
    """A configuration file, flag or value is wrong; `key` names it when known."""

    exit_code = 2

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ProcessError(MetaproxyError):
    """Starting, checking or stopping a program failed."""

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        returncode: int | None = None,
        stderr: str = "",
    ) -> None:
        super().__init__(message)
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr


class UntrustedBinary(ProcessError):
    """A binary, or a directory above it, failed the launch contract's checks."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"refusing to run {path}: {reason}", argv=(path,))
        self.path = path
        self.reason = reason


class NamespaceError(MetaproxyError):
    """A network namespace is missing or could not be entered."""

    def __init__(self, message: str, *, netns: str | None = None) -> None:
        super().__init__(message)
        self.netns = netns


class FileError(MetaproxyError):
    """A file or directory we own could not be created or written safely."""

    def __init__(self, message: str, *, path: str, errno_name: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno_name = errno_name


class CleanupError(MetaproxyError):
    """Something we made could not be removed; the log has path and errno."""

    def __init__(self, message: str, *, paths: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.paths = tuple(paths)


class StoreError(MetaproxyError):
    """The store refused a change or could not be read; `field` names the culprit."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ClientProtocolError(MetaproxyError):
    """A guest sent a request we refuse; `status_hint` is what it gets back."""

    def __init__(self, message: str, *, status_hint: int = 400) -> None:
        super().__init__(message)
        self.status_hint = status_hint


class UpstreamError(MetaproxyError):
    """The agent or metadata server failed us; `status_hint` is 502, 503 or 504."""

    def __init__(self, message: str, *, status_hint: int = 502) -> None:
        super().__init__(message)
        self.status_hint = status_hint
