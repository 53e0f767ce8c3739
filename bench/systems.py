"""The fixed systems every run compares against: an nginx backend and two reference haproxies."""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.procs import BenchError, Child, tcp_ready, unix_ready, wait_until

NGINX = "/usr/sbin/nginx"
HAPROXY = "/usr/sbin/haproxy"

# A metadata-sized answer (cloud-init's leaf requests get a few dozen to a few hundred bytes).
BACKEND_BODY = (
    '{"uuid": "0b6a9a3e-5c3f-4f55-9c1b-6f0e2a3d9c11", "name": "bench", "launch_index": 0}'
)

NETWORK_ID = "bench-net-0001"


def need(binary: str) -> str:
    if shutil.which(binary) is None:
        raise BenchError(f"{binary} is not installed (scripts/setup.sh installs it)")
    return binary


def nginx_conf(workdir: Path, socket_path: Path) -> str:
    """One foreground nginx process answering every request with BACKEND_BODY, keep-alive.

    It echoes a request's X-Metaproxy-Seq, as metaproxy's agent does: a builtin front then
    pipelines GETs to it (metaproxy.http.client). nginx adds no field when the request has
    none, so the haproxy references see the same answers as before.
    """
    return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    fastcgi_temp_path {workdir}/nginx-fastcgi;
    uwsgi_temp_path {workdir}/nginx-uwsgi;
    scgi_temp_path {workdir}/nginx-scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {{
        listen unix:{socket_path};
        default_type application/json;
        location / {{
            add_header X-Metaproxy-Seq $http_x_metaproxy_seq always;
            return 200 '{BACKEND_BODY}';
        }}
    }}
}}
"""


def start_nginx(workdir: Path) -> tuple[Child, Path]:
    """Start the static backend on a Unix socket in `workdir`; return it and the socket path."""
    need(NGINX)
    socket_path = workdir / "b.sock"
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(workdir, socket_path))
    child = Child("nginx", [NGINX, "-c", str(conf), "-p", str(workdir)], workdir)
    wait_until("nginx backend", unix_ready(socket_path), 15, child)
    return child, socket_path


_TIMEOUTS = """\
    timeout http-request    30s
    timeout connect         30s
    timeout client          32s
    timeout server          32s
    timeout http-keep-alive 30s
"""


def haproxy_reference_conf(kind: str, port: int, backend: Path) -> str:
    """Neutron's haproxy config ("neutron"), or the same with keep-alive to the backend.

    "neutron" is the config Neutron's metadata proxy renders, minus syslog and user/group
    (privilege drop costs nothing per request; logging is left out of both references):
    `option http-server-close` means a new Unix-socket connection to the backend per request.
    "keepalive" keeps backend connections open and shares them (`http-reuse always`): the
    practical ceiling for a haproxy front on this machine.
    """
    if kind == "neutron":
        options = "    option http-server-close\n    option forwardfor\n"
    elif kind == "keepalive":
        options = "    option http-keep-alive\n    option forwardfor\n    http-reuse always\n"
    else:
        raise ValueError(kind)
    return f"""\
global
    maxconn     1024

defaults
    mode http
{options}    retries                 3
{_TIMEOUTS}
listen listener
    bind 127.0.0.1:{port}
    server metadata {backend}
    http-request del-header X-Neutron-Router-ID
    http-request set-header X-Neutron-Network-ID {NETWORK_ID}
"""


def start_haproxy_reference(kind: str, workdir: Path, port: int, backend: Path) -> Child:
    need(HAPROXY)
    conf = workdir / f"haproxy-{kind}.cfg"
    conf.write_text(haproxy_reference_conf(kind, port, backend))
    child = Child(f"haproxy-{kind}", [HAPROXY, "-db", "-f", str(conf)], workdir)
    wait_until(f"haproxy ({kind})", tcp_ready("127.0.0.1", port), 15, child)
    return child
