"""Summarise a py-spy `record -f raw` profile: the functions with the most samples.

`python -m bench.flame PROFILE.txt [N]` prints the top N functions by own samples and by
inclusive samples (a function counted once per stack it appears in).
"""

from __future__ import annotations

import sys
from collections import Counter


def summarise(text: str) -> tuple[int, Counter[str], Counter[str]]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " " + _where(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    return total, own, inclusive


def _where(frame: str) -> str:
    """`(path/to/module.py:LINE)` → `module.py`."""
    inside = frame.partition(" (")[2].rstrip(")")
    return "(" + inside.rsplit("/", 1)[-1].split(":")[0] + ")"


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as fh:
        total, own, inclusive = summarise(fh.read())
    top = int(argv[2]) if len(argv) > 2 else 25
    for title, counter in (("own", own), ("inclusive", inclusive)):
        print(f"-- top {top} by {title} samples (of {total})")
        for name, n in counter.most_common(top):
            print(f"{100 * n / max(total, 1):5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
