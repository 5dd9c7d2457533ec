"""The Compose stack (deploy/compose) validated where no Docker engine runs: Debian's `docker-compose config` reads
and interpolates it as Compose would, and what it says holds together: every service the design names, secrets only
from the env file, health checks, named volumes, the shipped Nginx, Prometheus and Grafana files mounted, the GPU
override reserving a device."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.nginx import COMPOSE
from tests.prerequisites import unavailable

pytestmark = pytest.mark.stack

SECRETS = ("NEURONOVA_AUTH__SECRET", "POSTGRES_PASSWORD", "ORTHANC_PASSWORD", "NEURONOVA_PACS_TOKEN",
           "GRAFANA_ADMIN_PASSWORD")


def compose_config(env_file: Path, *files: str) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    if binary is None:
        unavailable("docker-compose", "docker-compose is not installed (Debian: apt-get install docker-compose); "
                                      "the stack tests validate the Compose file with it")
    arguments = [part for name in files for part in ("-f", name)]
    # A clean environment: Compose prefers the shell's variables to the env file's (and the suite sets some).
    return subprocess.run([binary, *arguments, "--env-file", str(env_file), "config"], cwd=COMPOSE,
                          env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, check=False)


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    """The example env file with every secret set, as an operator fills it in."""
    lines = [line if line.split("=")[0] not in SECRETS else f"{line}{'s' * 40}"
             for line in (COMPOSE / ".env.example").read_text().splitlines()]
    path = tmp_path / ".env"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_stack_validates_with_every_service_of_the_design(env_file: Path) -> None:
    rendered = compose_config(env_file, "compose.yaml")
    assert rendered.returncode == 0, rendered.stderr
    config = yaml.safe_load(rendered.stdout)
    services = config["services"]
    assert set(services) == {"neuronova", "neuronova-pacs", "postgres", "orthanc", "nginx", "prometheus", "grafana"}
    assert set(config["volumes"]) == {"shared-volume", "postgres", "orthanc", "prometheus", "grafana"}
    neuronova = services["neuronova"]
    assert "ports" not in neuronova  # reached through Nginx only; it can then be scaled
    assert "/readyz" in " ".join(neuronova["healthcheck"]["test"])
    assert neuronova["environment"]["NEURONOVA_AUTH__SECRET"] == "s" * 40
    assert neuronova["environment"]["FORWARDED_ALLOW_IPS"] == \
        services["nginx"]["networks"]["backend"]["ipv4_address"]  # X-Forwarded-For believed from Nginx alone
    assert neuronova["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["neuronova-pacs"]["environment"]["NEURONOVA_PACS__CONFIG"] == "/etc/neuronova/pacs.yaml"
    assert services["orthanc"]["environment"]["NEURONOVA_NOTIFY_URL"] == "http://neuronova-pacs:3000/pacs/notify"

    sources = [volume.split(":")[0] for service in services.values() for volume in service.get("volumes", [])]
    mounted = {Path(source).resolve().relative_to(COMPOSE.parent) for source in sources if source.startswith("/")}
    assert {Path("compose/nginx/templates"), Path("monitoring/prometheus.yml"), Path("monitoring/alerts.yml"),
            Path("monitoring/grafana/neuronova.json"), Path("orthanc/neuronova.lua"), Path("pacs/pacs.yaml")} <= mounted
    assert all((COMPOSE.parent / path).exists() for path in mounted if not str(path).startswith("compose/certs"))


def test_a_secret_left_unset_stops_the_stack(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("")
    unset = compose_config(tmp_path / ".env", "compose.yaml")
    assert unset.returncode != 0 and "set NEURONOVA_AUTH__SECRET in .env" in unset.stderr


def test_the_gpu_override_reserves_a_gpu_with_the_cuda_bento(env_file: Path) -> None:
    rendered = compose_config(env_file, "compose.yaml", "compose.gpu.yaml")
    assert rendered.returncode == 0, rendered.stderr
    for name in ("neuronova", "neuronova-pacs"):
        service = yaml.safe_load(rendered.stdout)["services"][name]
        assert service["image"] == "neuronova-gpu:latest"
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["count"] == 1


def test_no_secret_is_committed() -> None:
    example = dict(line.split("=", 1) for line in (COMPOSE / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert all(example[name] == "" for name in SECRETS)
    assert {".env", "certs/"} <= set((COMPOSE / ".gitignore").read_text().split())
