"""Which environment variables the zygote scrubs before forking front workers."""

from __future__ import annotations

import pytest

from metaproxy.service.zygote import secretish


@pytest.mark.parametrize(
    ("name", "scrubbed"),
    [
        (b"METAPROXY_SERVICE__SHARED_SECRET", True),
        (b"metaproxy_agent__shared_secret", True),
        (b"METAPROXY_AGENT__CLIENT_KEY", True),
        (b"METAPROXY_X__PASSWORD", True),
        (b"METAPROXY_X__TOKEN", True),
        (b"METAPROXY_SERVICE__SHARED_SECRET_FILE", False),  # a path, which the worker may see
        (b"METAPROXY_AGENT__CLIENT_KEY_PATH", False),
        (b"METAPROXY_SERVICE__STATE_PATH", False),
        (b"OS_PASSWORD", True),  # an operator's OpenStack credentials
        (b"AWS_SECRET_ACCESS_KEY", True),
        (b"OS_AUTH_TOKEN", True),
        (b"PATH", False),
        (b"TZ", False),
        (b"LANG", False),
    ],
)
def test_secretish(name: bytes, scrubbed: bool) -> None:
    assert secretish(name) is scrubbed
