"""Property-based fuzzing of the builtin front's parser and policy layer (http/wire + http/policy).

The property, for any bytes a guest sends: either a refusal with a 4xx status, or exactly one
upstream request that parses cleanly (strict reader of backend.py), uses all of its bytes, keeps
the client's method and target, and carries the true identity and `X-Forwarded-For: <peer>` only.
"""

from __future__ import annotations

import collections
import os

from hypothesis import HealthCheck, given, settings

from attack import tally
from attack.backend import parse_one
from attack.corpus import CORPUS
from attack.judge import Truth, check_upstream
from attack.strategies import mutated, requests
from metaproxy.http import policy, wire

EXAMPLES = int(os.environ.get("METAPROXY_ATTACK_EXAMPLES", "1500"))
TRUTH = Truth("X-Neutron-Network-ID", "attack-net-0001", "169.254.10.2")
IDENTITY = [(b"X-Neutron-Network-ID", b"attack-net-0001")]
REFUSAL_STATUSES = {400, 403, 405, 408, 411, 413, 414, 417, 429, 431, 501, 505}


def through_front(raw: bytes) -> tuple[str, list[str]]:
    """What the builtin front would do with `raw`: (outcome, problems)."""
    end = raw.find(wire.HEAD_END)
    if end < 0:
        return "incomplete", []
    parsed = wire.parse_head(raw[: end + 4])
    if isinstance(parsed, policy.Refusal):
        return _refused(parsed)
    method, target, version, headers = parsed
    decided = policy.decide(
        method,
        target,
        version,
        headers,
        identity=IDENTITY,
        peer=TRUTH.peer.encode(),
        max_body=64 * 1024,
    )
    if isinstance(decided, policy.Refusal):
        return _refused(decided)
    body = raw[end + 4 : end + 4 + decided.content_length]
    if len(body) < decided.content_length:
        return "incomplete", []
    upstream = wire.serialize_request(decided, body)
    up, used = parse_one(upstream)
    problems = check_upstream(up, TRUTH)
    if used != len(upstream):
        problems.append(f"{len(upstream) - used} bytes after the upstream request")
    if (up.method.encode(), up.target.encode("latin-1")) != (method, target):
        problems.append(f"rewrote {method!r} {target!r} to {up.method} {up.target}")
    if up.body != body:
        problems.append("body changed on the way")
    return "forwarded", problems


def _refused(refusal: object) -> tuple[str, list[str]]:
    status = getattr(refusal, "status", None)
    if status not in REFUSAL_STATUSES:
        return "refused", [f"refusal status {status}"]
    return f"refused {status}", []


def _run(strategy: object, label: str) -> collections.Counter[str]:
    outcomes: collections.Counter[str] = collections.Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(strategy)
    def prop(raw: bytes) -> None:
        outcome, problems = through_front(raw)
        outcomes[outcome] += 1
        assert not problems, (raw[:300], problems)

    try:
        prop()
    except AssertionError as exc:
        tally.record(
            "fuzz: wire+policy",
            label,
            tried=sum(outcomes.values()),
            through=1,
            example=str(exc)[:300],
        )
        raise
    tally.record("fuzz: wire+policy", label, tried=sum(outcomes.values()))
    return outcomes


def test_corpus_through_policy() -> None:
    """The named corpus through the pure layer too (fast, and independent of sockets)."""
    bad = {c.name: p for c in CORPUS if (p := through_front(c.raw)[1])}
    tally.record("fuzz: wire+policy", "builtin parser", tried=len(CORPUS), through=len(bad))
    assert not bad


def test_fuzz_assembled_requests() -> None:
    outcomes = _run(requests(), "builtin parser")
    assert outcomes["forwarded"] > 0, outcomes


def test_fuzz_mutated_requests() -> None:
    outcomes = _run(mutated(), "builtin parser")
    assert sum(outcomes.values()) >= EXAMPLES // 2, outcomes
