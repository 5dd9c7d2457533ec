"""Prometheus and promtool from the operating system (Debian's `prometheus` package) for the monitoring tests:
the shipped configuration (deploy/monitoring) run for real against a served instance, started on loopback and
stopped by PID. Where they are missing the tests skip with the reason, except under CI (`.ci/run` installs them)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import yaml

from bench.harness import serving
from tests.prerequisites import unavailable

MONITORING = Path(__file__).resolve().parents[1] / "deploy" / "monitoring"
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
                "bool", "inf", "nan"}


def require(binary: str) -> str:
    """The path of Prometheus's `binary`; otherwise skip the test, or fail it under CI."""
    path = shutil.which(binary)
    if path is None:
        unavailable(binary, f"{binary} is not installed (Debian: apt-get install prometheus); the monitoring tests "
                            "run the shipped rules and scrape configuration with it")
    return path


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords, label names
    (in braces or in by / on lists) or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, format strings)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if not call and name.lower() not in PROMQL_WORDS:
            names.add(name)
    return names


def dashboard_queries() -> list[str]:
    """Every query of the shipped Grafana dashboard (panels, variables: their metric, annotations), `$model_id`
    matching all."""
    dashboard = json.loads((MONITORING / "grafana" / "neuronova.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    queries += [re.sub(r"^label_values\(([^,]+),[^)]*\)$", r"\1", variable["definition"])  # Grafana's, not PromQL
                for variable in dashboard["templating"]["list"] if "definition" in variable]
    queries += [annotation["expr"] for annotation in dashboard["annotations"]["list"]]
    return [query.replace("$model_id", ".*") for query in queries]


def shipped_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"] for rule in group["rules"]]


def rule_expressions() -> list[str]:
    return [rule["expr"] for rule in shipped_rules()]


def recorded_names() -> set[str]:
    """The series the shipped rules record (and `ALERTS`, which Prometheus writes for them)."""
    return {rule["record"] for rule in shipped_rules() if "record" in rule} | {"ALERTS"}


@dataclass(frozen=True)
class Prometheus:
    """A running Prometheus: its base URL, and the HTTP API calls the tests make."""

    url: str

    def query(self, expr: str) -> list[dict]:
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def alerts(self) -> dict[str, str]:
        """Each active alert's name with its model and version or route ("NeuroNovaInputDrift ct_classification
        <version>") -> state (pending or firing)."""
        body = httpx.get(f"{self.url}/api/v1/alerts", timeout=10).json()
        keys = ("model_id", "model_version", "endpoint")
        return {" ".join([a["labels"]["alertname"], *(a["labels"][k] for k in keys if k in a["labels"])]):
                a["state"] for a in body["data"]["alerts"]}

    def evaluated_since(self, moment: float) -> bool:
        """Whether every rule group has been evaluated after `moment` (epoch seconds)."""
        groups = httpx.get(f"{self.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return all(_epoch(group["lastEvaluation"]) > moment for group in groups)

    def targets(self) -> list[dict]:
        """Each scrape target's health, last error and last scrape's duration."""
        body = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()
        return [{key: target.get(key) for key in ("scrapeUrl", "health", "lastError", "lastScrapeDuration")}
                for target in body["data"]["activeTargets"]]

    def wait(self, condition: Callable[[], Any], what: str, timeout_s: float = 120.0) -> Any:
        """Poll `condition` until it is truthy; fail naming `what`, the alerts and the targets after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not (value := condition()):
            assert time.monotonic() < deadline, \
                f"{what}: not after {timeout_s}s; alerts {self.alerts()}; targets {self.targets()}"
            time.sleep(0.25)
        return value


def _epoch(timestamp: str) -> float:
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", timestamp.replace("Z", "+00:00"))).timestamp()


def config_for(target_url: str, folder: Path) -> Path:
    """The shipped prometheus.yml with its scrape job pointed at `target_url` and short intervals (a scrape may take
    as long as its interval: a loaded box's /metrics can need more than a second), beside a copy of the shipped
    rules."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="3s", scrape_timeout="3s", evaluation_interval="1s")
    (job,) = config["scrape_configs"]
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": [urlparse(target_url).netloc]}]
    shutil.copy(MONITORING / "alerts.yml", folder / "alerts.yml")
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def prometheus(target_url: str, folder: Path) -> Iterator[Prometheus]:
    """Prometheus on a free loopback port scraping `target_url` with the shipped rules; stopped by PID after."""
    binary = require("prometheus")
    config = config_for(target_url, folder)
    command = [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
               "--web.listen-address=127.0.0.1:{port}"]
    with serving(command, {}, folder / "prometheus.log", ready_path="/-/ready", timeout_s=60, cwd=folder) as server:
        yield Prometheus(server.url)
