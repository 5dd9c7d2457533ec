"""The Kubernetes manifests (deploy/k8s, kustomize) validate offline against the schemas kubernetes-validate bundles,
and say what the scale-out path needs: probes, the 30 s grace, a disruption budget, autoscaling, Secrets by
reference only, the shared volume and the distributed settings; the root file system is read-only and every folder
the service writes is a volume."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.unit.deploy.writable import MODEL_STORE, WRITTEN_ENV

K8S = Path(__file__).resolve().parents[3] / "deploy" / "k8s"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # an older cluster still supported upstream, and the newest schemas


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def manifests() -> list[str]:
    """The manifest files the kustomization lists (other kustomizations it includes aside)."""
    return [name for name in kustomization()["resources"] if name.endswith(".yaml")]


def resources() -> dict[str, dict]:
    """Every resource of this folder that kustomize applies, by kind."""
    documents = [doc for name in manifests() for doc in yaml.safe_load_all((K8S / name).read_text())]
    return {doc["kind"]: doc for doc in documents}


def test_kustomization_lists_every_manifest_and_the_monitoring_config_maps():
    assert set(manifests()) == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    included = [K8S / name for name in kustomization()["resources"] if not name.endswith(".yaml")]
    assert [path.resolve() for path in included] == [(K8S.parent / "monitoring").resolve()]
    monitoring = yaml.safe_load((K8S.parent / "monitoring" / "kustomization.yaml").read_text())
    generated = {entry["name"]: entry["files"] for entry in monitoring["configMapGenerator"]}
    assert generated == {"neuronova-prometheus-rules": ["alerts.yml"],
                         "neuronova-grafana-dashboard": ["grafana/neuronova.json"]}
    assert all((K8S.parent / "monitoring" / f).is_file() for files in generated.values() for f in files)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_manifest_validates_strictly(name, version):
    for document in yaml.safe_load_all((K8S / name).read_text()):
        kubernetes_validate.validate(document, version, strict=True)  # raises ValidationError naming the field


def test_a_broken_manifest_is_caught():
    deployment = resources()["Deployment"]
    broken = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_deployment_probes_grace_secrets_and_volumes():
    by_kind = resources()
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["terminationGracePeriodSeconds"] == 30
    assert container["livenessProbe"]["httpGet"]["path"] in ("/livez", "/health")
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {item["name"]: item for item in container["env"]}
    for secret in ("NEURONOVA_DISTRIBUTED__DATABASE_URL", "NEURONOVA_AUTH__SECRET"):
        assert "value" not in env[secret] and env[secret]["valueFrom"]["secretKeyRef"]["name"] == "neuronova-secrets"
    assert "Secret" not in by_kind  # by reference only: no secret value in the repository
    settings = by_kind["ConfigMap"]["data"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert settings["NEURONOVA_DISTRIBUTED__SHARED_DIR"] == mounts["shared-volume"]
    assert settings["NEURONOVA_DATA_DIR"] == mounts["data"]
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    shared_claim = by_kind["PersistentVolumeClaim"]
    assert claims["shared-volume"] == shared_claim["metadata"]["name"] and shared_claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_budget_autoscaler_and_service_select_the_deployment():
    by_kind = resources()
    deployment = by_kind["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert by_kind["Service"]["spec"]["selector"].items() <= labels.items()
    hpa = by_kind["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert hpa["minReplicas"] >= 2 and {m["type"] for m in hpa["metrics"]} == {"Pods", "Resource"}


def test_the_pod_runs_hardened_and_its_traffic_is_fenced():
    by_kind = resources()
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert container["allowPrivilegeEscalation"] is False and container["capabilities"]["drop"] == ["ALL"]
    policy = by_kind["NetworkPolicy"]["spec"]
    labels = by_kind["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert [port["port"] for rule in policy["ingress"] for port in rule["ports"]] == [3000]
    assert {port["port"] for rule in policy["egress"] for port in rule["ports"]} == {53, 5432, 8042, 443}


def under(path: str, mounts: list[str]) -> bool:
    return any(path == mount or path.startswith(mount.rstrip("/") + "/") for mount in mounts)


def test_the_root_is_read_only_and_every_written_folder_is_a_volume():
    """Each folder the service writes (tests/unit/deploy/writable.py, as the pod's settings name it) lies on a
    writable volume of the container; BentoML's task store is left under the data dir."""
    by_kind = resources()
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    for container in pod["initContainers"] + pod["containers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, container["name"]
    [container] = pod["containers"]
    env = {**by_kind["ConfigMap"]["data"], **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    writable = [path for path, mount in mounts.items() if not mount.get("readOnly")
                and ("emptyDir" in volumes[mount["name"]] or "persistentVolumeClaim" in volumes[mount["name"]])]
    written = {name: env.get(name, default) for name, default in WRITTEN_ENV.items()}
    assert None not in written.values(), [name for name, path in written.items() if path is None]
    for name, path in {**written, "the bento's model store": MODEL_STORE}.items():
        assert under(path, writable), f"{name} ({path}) is not on a writable volume: {writable}"
    assert "BENTOML_RESULT_STORE" not in env  # api/tasks.py puts it under NEURONOVA_DATA_DIR


def test_the_init_container_fills_the_model_volume_from_the_image():
    pod = resources()["Deployment"]["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    [container] = pod["containers"]
    assert init["image"] == container["image"]
    [models] = [m for m in container["volumeMounts"] if m["mountPath"] == MODEL_STORE]
    [target] = [m["mountPath"] for m in init["volumeMounts"] if m["name"] == models["name"]]
    assert init["command"] == ["cp", "-a", f"{MODEL_STORE}/.", f"{target}/"]
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[models["name"]]
    security = init["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
