"""Nginx from the operating system (Debian's `nginx`) with the shipped server configuration
(deploy/compose/nginx/templates), rendered as the nginx image renders it (envsubst of the NEURONOVA_* / NGINX_*
variables) and run on loopback in the foreground, stopped by PID. Where it is missing the tests skip with the reason,
except under CI (`.ci/run` installs it)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.harness import free_port, stop_group
from tests.prerequisites import unavailable

COMPOSE = Path(__file__).resolve().parents[1] / "deploy" / "compose"
TEMPLATE = COMPOSE / "nginx" / "templates" / "neuronova.conf.template"
RENDERED = re.compile(r"\$\{((?:NEURONOVA|NGINX)_[A-Z_]+)\}")
"""What the compose file's NGINX_ENVSUBST_FILTER lets the image's envsubst replace."""

MAIN_CONFIG = """user root;
worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/error.log info;
events {{ worker_connections 256; }}
http {{
    include /etc/nginx/mime.types;
    access_log {folder}/access.log;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    include {folder}/conf.d/*.conf;
}}
"""
"""The nginx image's own main configuration in essence (its conf.d holds the rendered template), with every path in
the test's folder."""


def require_nginx() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if path is None:
        unavailable("nginx", "nginx is not installed (Debian: apt-get install nginx); the stack tests run the shipped "
                             "configuration with it")
    return path


def render(template: str, values: dict[str, str]) -> str:
    """The template with its ${NEURONOVA_*} / ${NGINX_*} variables replaced (a missing one is an error)."""
    return RENDERED.sub(lambda match: values[match.group(1)], template)


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """The shipped script's self-signed certificate for 127.0.0.1, in `folder`."""
    subprocess.run([str(COMPOSE / "make-certificate.sh"), "localhost", str(folder)], check=True, capture_output=True)
    return folder / "tls.crt", folder / "tls.key"


@dataclass(frozen=True)
class Proxy:
    """A running Nginx: its HTTPS and HTTP base URLs and the CA file that verifies its certificate."""

    https: str
    http: str
    certificate: Path
    folder: Path


def configure(folder: Path, upstream: str, pacs_upstream: str) -> tuple[Path, dict[str, str]]:
    """Render the shipped template into `folder`; the main configuration's path and the ports."""
    certificate, key = make_certificate(folder / "certs")
    ports = {"NGINX_HTTPS_PORT": str(free_port()), "NGINX_HTTP_PORT": str(free_port())}
    values = {**ports, "NEURONOVA_UPSTREAM": upstream, "NEURONOVA_PACS_UPSTREAM": pacs_upstream,
              "NGINX_CERTIFICATE": str(certificate), "NGINX_CERTIFICATE_KEY": str(key)}
    (folder / "conf.d").mkdir(parents=True, exist_ok=True)
    listen = {name: f"127.0.0.1:{port}" for name, port in ports.items()}  # loopback only, whatever the template says
    (folder / "conf.d" / "neuronova.conf").write_text(render(TEMPLATE.read_text(), {**values, **listen}))
    main = folder / "nginx.conf"
    main.write_text(MAIN_CONFIG.format(folder=folder))
    return main, ports


def check(main: Path) -> subprocess.CompletedProcess:
    """`nginx -t` on the configuration (syntax, certificates, upstream names)."""
    return subprocess.run([require_nginx(), "-t", "-c", str(main), "-p", str(main.parent)], capture_output=True,
                          text=True, check=False)


def dump(main: Path) -> str:
    """`nginx -T`: the whole configuration as Nginx read it."""
    return subprocess.run([require_nginx(), "-T", "-c", str(main), "-p", str(main.parent)], capture_output=True,
                          text=True, check=True).stdout


def wait_listening(port: int, process: subprocess.Popen, log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"nginx not listening after {timeout_s}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def nginx(folder: Path, upstream: str, pacs_upstream: str) -> Iterator[Proxy]:
    """Nginx with the shipped configuration in front of `upstream` (host:port), on free loopback ports."""
    main, ports = configure(folder, upstream, pacs_upstream)
    checked = check(main)
    assert checked.returncode == 0, checked.stderr
    log = folder / "error.log"
    process = subprocess.Popen([require_nginx(), "-c", str(main), "-p", str(folder)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_listening(int(ports["NGINX_HTTPS_PORT"]), process, log)
        yield Proxy(https=f"https://127.0.0.1:{ports['NGINX_HTTPS_PORT']}",
                    http=f"http://127.0.0.1:{ports['NGINX_HTTP_PORT']}", certificate=folder / "certs" / "tls.crt",
                    folder=folder)
    finally:
        stop_group(process, grace_s=5)
