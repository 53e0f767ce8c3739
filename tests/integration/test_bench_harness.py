"""A cheap smoke test of the benchmark harness (bench/): parsers, table printer, and one tiny
real run of nginx + the Neutron-config haproxy reference under wrk and the boot-storm generator.

The benchmarks themselves are not timed tests; this only proves the harness measures something.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import loadgen, proc, procs, report, systems, wrk
from bench.context import REPO


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], (200, b"ok", False), id="whole"
        ),
        pytest.param(
            [
                b"HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 3\r\n",
                b"\r\nab",
                b"c",
            ],
            (404, b"abc", True),
            id="split-and-close",
        ),
        pytest.param(
            [
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            ],
            (200, b"abcde", False),
            id="chunked",
        ),
        pytest.param([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"], None, id="incomplete"),
    ],
)
def test_loadgen_parses_responses(chunks: list[bytes], expected: object) -> None:
    parser = loadgen.ResponseParser()
    for chunk in chunks:
        parser.feed(chunk)
    assert parser.next() == expected


def test_wrk_summary_is_parsed() -> None:
    line = (
        'BENCHJSON {"requests":1000,"duration_us":2000000,"bytes":5,"connect":0,"read":1,'
        '"write":0,"status":2,"timeout":0,"p50":250,"p90":400,"p99":1500,"max":9000,"mean":300.0}'
    )
    result = wrk.parse("Running 2s test\n" + line + "\n")
    assert (result.rps, result.errors, result.p50_ms, result.p99_ms) == (500.0, 3, 0.25, 1.5)


def test_tables_render_missing_values_and_verdicts() -> None:
    table = report.Table("t", [report.Column("front"), report.Column("req/s", ",.0f")])
    table.add("a", 12345.6)
    table.add("b", None)
    checks = [report.at_least("x", 1.2, 1.0), report.at_most("y", 2.0, 1.0)]
    text = report.render([report.ScenarioResult("s", "S", [table], checks)], markdown=False)
    assert "12,346" in text and "n/a" in text and "MET" in text and "MISSED" in text
    assert "| a | 12,346 |" in report.markdown_table(table)


def test_proc_readers_see_this_process() -> None:
    mem = proc.memory(os.getpid())
    assert mem.rss_kib > 0 and 0 < mem.pss_kib <= mem.rss_kib
    assert proc.cpu_seconds([os.getpid()]) > 0


@pytest.mark.haproxy
@pytest.mark.skipif(
    not all(shutil.which(b) for b in (systems.NGINX, systems.HAPROXY, wrk.WRK)),
    reason="needs nginx, haproxy and wrk (scripts/setup.sh installs them)",
)
def test_reference_front_under_wrk_and_storm(short_tmp: Path) -> None:
    nginx, backend = systems.start_nginx(short_tmp)
    children = [nginx]
    try:
        port = procs.free_port()
        haproxy = systems.start_haproxy_reference("neutron", short_tmp, port, backend)
        children.append(haproxy)
        before = proc.tree_cpu_seconds(haproxy.pid)
        result = wrk.run(
            f"http://127.0.0.1:{port}/latest/meta-data/instance-id",
            connections=2,
            seconds=1,
            script=wrk.write_script(short_tmp),
        )
        assert result.requests > 50 and result.errors == 0
        assert 0 < result.p50_ms <= result.p99_ms
        assert proc.tree_cpu_seconds(haproxy.pid) > before

        spec = {
            "host": "127.0.0.1",
            "port": port,
            "host_header": "169.254.169.254",
            "timeout": 10,
            "deadline": 60,
            "sources": [f"127.1.0.{i}" for i in range(1, 21)],
            "sequence": [["/openstack", "Cloud-Init/22.4.2", 200]] * 5,
        }
        (short_tmp / "spec.json").write_text(json.dumps(spec))
        done = subprocess.run(
            [sys.executable, "-m", "bench.loadgen", str(short_tmp / "spec.json")],
            capture_output=True,
            text=True,
            timeout=90,
            check=True,
            cwd=REPO,
        )
        storm = json.loads(done.stdout)
        assert (storm["requests"], storm["errors"]) == (100, 0)
    finally:
        for child in children:
            child.stop()
    assert all(not c.alive() for c in children)
