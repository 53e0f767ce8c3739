"""The one rule every hostile case is held to, and the checks behind it.

For each case: either a clean refusal (a 4xx/5xx, or a silent close, and nothing complete
reached the upstream), or upstream requests that are each well formed, carry exactly the true
identity and `X-Forwarded-For: <peer>`, and number no more than the requests the client really
sent. Anything else "got through".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attack.backend import Upstream
from attack.client import Exchange
from attack.corpus import FORGED_MARKERS, Case
from metaproxy.haproxy.render import FORWARDED_HEADERS

ALLOWED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT"})
IDENTITY_PREFIXES = ("x-neutron-", "x-ovn-", "x-instance-id", "x-metadata-provider")
IDENTITY_NAMES = frozenset({"x-tenant-id", "x-forwarded-for", "forwarded", "x-real-ip"})
MAX_BODY = 64 * 1024
RELAYED_NAMES = frozenset(FORWARDED_HEADERS)


@dataclass(frozen=True)
class Truth:
    """What the front alone knows: its identity header and value, and the client's address."""

    header: str
    value: str
    peer: str


@dataclass
class Verdict:
    outcome: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def forged_markers(raw_head: bytes) -> list[bytes]:
    """The forged markers in a head outside what is relayed as the guest sent it.

    The target and the allow-listed fields (Host, Accept, ...) are the guest's own and relayed
    by design, so a marker there (a mutated request can move `EVIL` into an Accept value) is
    not a leak; the identity fields are held to their exact values by `check_upstream`.
    """
    kept = []
    for line in raw_head.split(b"\r\n")[1:]:
        name = line.split(b":", 1)[0].strip().lower().decode("latin-1")
        if name not in RELAYED_NAMES:
            kept.append(line)
    rest = b"\r\n".join(kept).lower()
    return [m for m in FORGED_MARKERS if m in rest]


def is_identity_name(name: str) -> bool:
    """Whether a header name belongs to the identity family (any case, `_` for `-`)."""
    key = name.lower().replace("_", "-")
    return key in IDENTITY_NAMES or key.startswith(IDENTITY_PREFIXES)


def check_upstream(up: Upstream, truth: Truth) -> list[str]:
    """Every way one upstream request differs from a well-formed one with the true identity."""
    problems = list(up.problems)
    if up.method not in ALLOWED_METHODS:
        problems.append(f"method {up.method!r} forwarded")
    target = up.target.encode("latin-1")
    if not target.startswith(b"/") or any(not 0x21 <= b <= 0x7E for b in target):
        problems.append(f"target {up.target[:80]!r} is not a clean origin-form")
    if b"#" in target:
        problems.append("fragment forwarded in the target")
    if up.version not in ("HTTP/1.1", "HTTP/1.0"):
        problems.append(f"version {up.version!r}")
    for marker in forged_markers(up.raw_head):
        problems.append(f"forged value {marker.decode()!r} in the upstream head")
    for name, _ in up.headers:
        if is_identity_name(name) and name.lower() not in (truth.header.lower(), "x-forwarded-for"):
            problems.append(f"identity header {name!r} forwarded")
        if "_" in name:
            problems.append(f"underscore header {name!r} forwarded")
    if up.values(truth.header) != [truth.value]:
        problems.append(f"{truth.header} is {up.values(truth.header)!r}, not [{truth.value!r}]")
    if up.values("X-Forwarded-For") != [truth.peer]:
        problems.append(f"X-Forwarded-For is {up.values('X-Forwarded-For')!r}, not the peer")
    if len(up.values("Host")) > 1:
        problems.append("several Host fields forwarded")
    if len(up.body) > MAX_BODY:
        problems.append(f"body of {len(up.body)} bytes forwarded")
    return problems


def judge(
    case: Case, ex: Exchange, ups: list[Upstream], leftovers: list[bytes], truth: Truth
) -> Verdict:
    """Hold one case's exchange and what reached the upstream to the rule above."""
    complete = [u for u in ups if u.complete]
    problems: list[str] = []
    for i, up in enumerate(ups):
        if not up.complete and forged_markers(up.raw_head):
            problems.append(f"upstream #{i}: forged value in an unfinished upstream request")
        problems += [f"upstream #{i}: {p}" for p in check_upstream(up, truth) if up.complete]
    if len(complete) > case.forwards:
        problems.append(f"{len(complete)} upstream requests for {case.forwards} sent")
    if not case.incomplete and leftovers:
        problems.append(f"upstream framing broken, left over: {leftovers[0][:60]!r}")
    statuses = ex.statuses
    refused = [s for s in statuses if s >= 400]
    if complete:
        outcome = "forwarded" + (f"+{refused[0]}" if refused else "")
    elif refused:
        outcome = f"refused {refused[0]}"
    elif ex.closed:
        outcome = "closed"
    else:
        outcome = "timeout" if ex.timed_out else "no answer"
    if not complete:
        if any(200 <= s < 300 for s in statuses):
            problems.append(f"front answered {statuses} without asking the upstream")
        if not refused and not ex.closed and not case.incomplete:
            problems.append(f"no refusal and no close ({outcome})")
    if ex.garbage and not refused:
        problems.append(f"front answered garbage {ex.garbage[:60]!r}")
    if case.expect == "refuse" and complete:
        problems.append("must be refused, was forwarded")
    if case.expect == "forward" and not complete:
        problems.append(f"must be forwarded, was {outcome}")
    if case.status is not None and (not statuses or statuses[0] != case.status):
        problems.append(f"expected status {case.status}, got {statuses or outcome}")
    return Verdict(outcome, problems)
