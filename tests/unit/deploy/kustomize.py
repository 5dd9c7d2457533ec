"""What `kubectl kustomize deploy/k8s` prints, rendered in Python for the features deploy/k8s uses (resources, nested
kustomizations, configMapGenerator from files, namespace, labels without selectors, images), so the policy scan runs
where no kustomize binary is installed. `test_k8s_policy.py` compares it with the real kustomize wherever one is."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

CLUSTER_SCOPED = frozenset({"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                            "CustomResourceDefinition", "PriorityClass"})
SUPPORTED = frozenset({"apiVersion", "kind", "namespace", "labels", "resources", "images", "configMapGenerator",
                       "generatorOptions"})


def _pod_specs(document: dict[str, Any]) -> list[dict[str, Any]]:
    spec = document.get("spec", {})
    if document["kind"] == "Pod":
        return [spec]
    if document["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    return [spec["template"]["spec"]] if "template" in spec else []


def _image(image: str, rules: list[dict[str, str]]) -> str:
    base = image.split("@")[0]
    last = base.rsplit("/", 1)[-1]
    name = base[: len(base) - len(last)] + last.split(":")[0]
    for rule in rules:
        if rule["name"] == name:
            new = rule.get("newName", name)
            if "digest" in rule:
                return f"{new}@{rule['digest']}"
            return f"{new}:{rule['newTag']}" if "newTag" in rule else new
    return image


def render(folder: Path) -> list[dict[str, Any]]:
    """The documents kustomize builds from `folder`."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED
    if unsupported:
        raise ValueError(f"{folder}/kustomization.yaml uses {sorted(unsupported)}: render it with kustomize")
    documents: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        if path.is_dir():
            documents += render(path)
        else:
            documents += [copy.deepcopy(doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    generators = kustomization.get("configMapGenerator", [])
    if generators and kustomization.get("generatorOptions") != {"disableNameSuffixHash": True}:
        raise ValueError("generated names with a hash suffix: render it with kustomize")
    for generator in generators:
        if set(generator) - {"name", "files", "options"} or set(generator.get("options", {})) - {"labels"}:
            raise ValueError(f"configMapGenerator {generator['name']}: render it with kustomize")
        metadata = {"name": generator["name"], **({"labels": dict(generator["options"]["labels"])}
                                                   if "options" in generator else {})}
        documents.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata,
                          "data": {Path(file).name: (folder / file).read_text() for file in generator["files"]}})
    for document in documents:
        metadata = document.setdefault("metadata", {})
        if "namespace" in kustomization and document["kind"] not in CLUSTER_SCOPED:
            metadata["namespace"] = kustomization["namespace"]
        for rule in kustomization.get("labels", []):
            if rule.get("includeSelectors") or rule.get("includeTemplates"):
                raise ValueError("labels with includeSelectors/includeTemplates: render it with kustomize")
            metadata.setdefault("labels", {}).update(rule["pairs"])
        for pod in _pod_specs(document):
            for container in pod.get("initContainers", []) + pod.get("containers", []):
                container["image"] = _image(container["image"], kustomization.get("images", []))
    return documents
