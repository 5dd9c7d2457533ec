"""What Nginx in front costs a lone CT request: the shipped configuration (deploy/compose/nginx, TLS with keep-alive)
against the same served instance called directly, requests alternating, paired as in bench/ab_lone.py.

Run: `BENTOML_HOME=.bentoml-test .venv/bin/python bench/nginx_overhead.py [--requests 1000]` (needs Debian's nginx).
Prints each path's median latency and the median of the paired differences.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ab_lone import WARM_UP, ct_sender  # noqa: E402
from bench.biomarker import SERVICE_ENV  # noqa: E402
from bench.harness import free_port, served  # noqa: E402
from tests.nginx import nginx  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    send = ct_sender()
    with tempfile.TemporaryDirectory() as tmp, served(SERVICE_ENV, Path(tmp) / "server.log") as url, \
            nginx(Path(tmp) / "nginx", url.removeprefix("http://"), f"127.0.0.1:{free_port()}") as proxy, \
            httpx.Client(base_url=url) as direct, \
            httpx.Client(base_url=proxy.https, verify=str(proxy.certificate)) as proxied:
        clients = {"direct": direct, "nginx": proxied}
        latencies: dict[str, list[float]] = {name: [] for name in clients}
        for index in range(WARM_UP + args.requests):
            for name in (("direct", "nginx") if index % 2 else ("nginx", "direct")):
                started = time.perf_counter()
                send(clients[name], index).raise_for_status()
                if index >= WARM_UP:
                    latencies[name].append((time.perf_counter() - started) * 1000.0)
    for name, values in latencies.items():
        print(f"{name}: p50 {statistics.median(values):.3f} ms")
    differences = [through - straight for through, straight in zip(latencies["nginx"], latencies["direct"])]
    print(f"median paired difference (nginx - direct): {statistics.median(differences):+.3f} ms over {args.requests}")


if __name__ == "__main__":
    main()
