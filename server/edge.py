"""The server's edge: nginx on the public address, the SuperLink behind it on loopback.

Flower 1.41 serves the Fleet API (sites), the Control API (register keys, start runs) and the runtime
API from one port, and open-source Flower does not authenticate the Control API. So the SuperLink
listens on 127.0.0.1 only, and the address the sites dial is nginx's, which forwards `/v1/fleet/*`
and nothing else: a peer on the network can reach the sites' API, never the coordinator's.

    SERVER_DIR/edge/nginx.conf   written at every start from the options given
    SERVER_DIR/logs/edge.log     nginx's errors and warnings (refused or rate-limited requests)
    SERVER_DIR/logs/edge-access.log   one line per request: address, route, status (no message contents)
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import shutil
from collections.abc import Sequence
from pathlib import Path

from common.credentials import ServerCertificates
from common.errors import FedsegError
from common.processes import FlowerProcess

# Flower moves arrays in 5 MiB objects; one request body carries one object plus its framing.
MAX_BODY = "16m"
BODY_IN_MEMORY = "1m"  # larger bodies go to the edge's temp folder: memory stays small whoever sends them
WORKER_CONNECTIONS = 4096
# An idle SuperNode makes a request every 3 s; a round's transfers are a few dozen requests. Per site address:
REQUESTS_PER_SECOND = 20
BURST = 200
CONNECTIONS_PER_ADDRESS = 16
INSTALL_HINT = "install it with: sudo apt-get install nginx-light (Debian/Ubuntu; any nginx >= 1.18 works)"


class EdgeError(FedsegError, RuntimeError):
    """The edge cannot be set up as asked (no nginx, a bad --allow network)."""


def find_nginx() -> str:
    """nginx from PATH or Debian's /usr/sbin (not on a normal user's PATH)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise EdgeError(f"fedseg server puts nginx in front of the SuperLink, and nginx is not installed; {INSTALL_HINT}")
    return found


def allowed_networks(cidrs: Sequence[str]) -> list[str]:
    """The --allow networks, checked: a typo must not silently open (or close) the server, so host
    bits (192.168.1.10/24) and interface scopes (fe80::%eth0) are refused, not dropped."""
    networks = []
    for cidr in cidrs:
        try:
            if "%" in cidr:
                raise ValueError(f"{cidr!r} has an interface scope")
            networks.append(str(ipaddress.ip_network(cidr.strip(), strict=True)))
        except ValueError as err:
            raise EdgeError(f"--allow takes networks such as 192.0.2.0/24 or 2001:db8::/32: {err}") from err
    return networks


def _listen(host: str, port: int) -> str:
    host = host.strip("[]") or "0.0.0.0"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _worker_user() -> str:
    """As root, nginx's workers drop to an unprivileged user; say which (Debian has no group `nobody`)."""
    if os.geteuid() != 0:
        return ""
    nobody = pwd.getpwnam("nobody")
    return f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};\n"


def _quoted(path: Path) -> str:
    """A path as an nginx string: a server folder may have spaces or quotes in its name. nginx has
    no escape for `$` (a variable) in these directives, so such a path is refused."""
    if "$" in str(path):
        raise EdgeError(f"nginx cannot use a path with '$' in it: {path}; move the server folder")
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def edge_config(root: Path, host: str, port: int, superlink_port: int, insecure: bool, allow: Sequence[str], spool: Path) -> str:
    """nginx.conf for the edge: TLS with the federation's server certificate, Fleet API only.

    Header and body timeouts are short and connection slots many, so a peer holding connections
    half-open exhausts its own per-address allowance, not the sites'. (A flood from many addresses is
    for the firewall in front: see README.)"""
    root = root.resolve()
    certs = ServerCertificates(root / "certs")
    access = "".join(f"        allow {net};\n" for net in allow) + ("        deny all;\n" if allow else "")
    tls = "" if insecure else (
        f"    ssl_certificate {_quoted(certs.server_cert.resolve())};\n"
        f"    ssl_certificate_key {_quoted(certs.server_key.resolve())};\n"
        "    ssl_protocols TLSv1.2 TLSv1.3;\n"
        "    ssl_session_cache shared:fedseg_tls:1m;\n")
    upstream = "http" if insecure else "https"
    # The SuperLink's certificate always names localhost (`fedseg certs`); check it, even on loopback.
    verify_upstream = "" if insecure else (
        f"        proxy_ssl_trusted_certificate {_quoted(certs.ca_cert.resolve())};\n"
        "        proxy_ssl_verify on;\n"
        "        proxy_ssl_name localhost;\n")
    return f"""# Written by `fedseg server` at every start; edit the command's options, not this file.
{_worker_user()}worker_processes 1;
worker_rlimit_nofile {2 * WORKER_CONNECTIONS};
pid {_quoted(root / 'edge' / 'nginx.pid')};
error_log stderr warn;
daemon off;
events {{ worker_connections {WORKER_CONNECTIONS}; }}
http {{
    access_log {_quoted(root / 'logs' / 'edge-access.log')};
    server_tokens off;
    absolute_redirect off;
    client_body_temp_path {_quoted(spool)};
    proxy_temp_path {_quoted(spool)};
    fastcgi_temp_path {_quoted(spool)};  # nginx creates these at start even unused: not in /var/lib/nginx
    uwsgi_temp_path {_quoted(spool)};
    scgi_temp_path {_quoted(spool)};
    limit_req_zone $binary_remote_addr zone=fedseg_fleet:1m rate={REQUESTS_PER_SECOND}r/s;
    limit_conn_zone $binary_remote_addr zone=fedseg_conn:1m;
    upstream superlink {{ server 127.0.0.1:{superlink_port}; keepalive 8; }}
    server {{
    listen {_listen(host, port)}{'' if insecure else ' ssl'};
{tls}    client_header_timeout 10s;
    client_body_timeout 30s;
    keepalive_timeout 15s;
    send_timeout 30s;
    client_max_body_size {MAX_BODY};
    client_body_buffer_size {BODY_IN_MEMORY};
    location /v1/fleet/ {{
{access}        limit_req zone=fedseg_fleet burst={BURST} nodelay;
        limit_conn fedseg_conn {CONNECTIONS_PER_ADDRESS};
        limit_req_status 429;
        limit_conn_status 429;
        proxy_pass {upstream}://superlink;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        proxy_redirect off;
        proxy_read_timeout 60s;
{verify_upstream}    }}
    location / {{
        access_log off;  # probes answered here cost nothing but would grow the log without bound
        return 404 "fedseg edge: only the Fleet API (/v1/fleet/) is served on this address\\n";
    }}
    }}
}}
"""


def start_edge(root: Path, host: str, port: int, superlink_port: int, insecure: bool, allow: Sequence[str],
               spool: Path, env: dict[str, str], verbose: bool = False) -> FlowerProcess:
    """Write the configuration and start nginx in the foreground, as our child (stopped with us).
    `spool` holds request bodies over BODY_IN_MEMORY: a folder of its own (as root, nginx hands it to
    its workers' user, who may not be able to enter the server folder)."""
    nginx = find_nginx()
    edge = root / "edge"
    edge.mkdir(parents=True, exist_ok=True)
    conf = edge / "nginx.conf"
    conf.write_text(edge_config(root, host, port, superlink_port, insecure, allow, spool))
    return FlowerProcess([nginx, "-p", str(edge.resolve()), "-c", str(conf.resolve()), "-e", "stderr"],
                         env, root, root / "logs" / "edge.log", verbose)
