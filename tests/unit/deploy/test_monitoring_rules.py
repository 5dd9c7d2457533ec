"""The shipped monitoring configuration (deploy/monitoring) checked by Prometheus's own tool: the scrape
configuration and rules validate, the alert rules pass their unit tests, and every dashboard query is valid PromQL
over metric names the service exports or the rules record (the served check: tests/http/test_monitoring_http.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.prometheus import MONITORING, dashboard_queries, metric_names, recorded_names, require


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess:
    return subprocess.run([require("promtool"), *args], cwd=cwd, capture_output=True, text=True, check=False)


def test_the_scrape_configuration_and_its_rules_validate() -> None:
    checked = promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 13 rules found" in checked.stdout


def test_every_alert_fires_on_its_condition_and_not_beside_it() -> None:
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test() -> None:
    alerts = {rule["alert"] for group in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    tested = {case["alertname"] for test in yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
              for case in test["alert_rule_test"]}
    assert alerts == tested


def test_a_broken_rule_is_caught(tmp_path: Path) -> None:
    broken = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    broken["groups"][1]["rules"][0]["expr"] = "max by (model_id (neuronova_input_drift_score) > 4"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(broken))
    assert promtool("check", "rules", "alerts.yml", cwd=tmp_path).returncode != 0


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule's expression."""
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{n}", "expr": query}
                                                        for n, query in enumerate(dashboard_queries())]}]}
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", "dashboard.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (model_id, le) (rate(neuronova_ood_score_relative_bucket{model_id=~".*"}[5m]))',
     {"neuronova_ood_score_relative_bucket"}),
    ("neuronova:ratio > on (model_id) 1.15 - max by (model_id) (accuracy) unless on (a) b",
     {"neuronova:ratio", "accuracy", "b"}),
    ('ALERTS{alertstate="firing", alertname=~"NeuroNova.*"}', {"ALERTS"}),
    ("histogram_quantile(0.95, x_bucket offset 5m) * 1e3", {"x_bucket"}),
])
def test_metric_names_are_read_out_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_the_dashboard_uses_the_rules_recordings_that_exist() -> None:
    recordings = {name for query in dashboard_queries() for name in metric_names(query) if ":" in name}
    assert recordings and recordings <= recorded_names()
