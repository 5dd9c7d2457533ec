"""The PACS YAML refuses credentials that would cross the network unencrypted, unless told the network is private."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from pacs.config import ChangesPolling, DicomWebEndpoint, load_config

ROOT = Path(__file__).resolve().parents[3]
BASIC = {"kind": "basic", "username_env": "PACS_USER", "password_env": "PACS_PASSWORD"}


@pytest.mark.parametrize("endpoint", [DicomWebEndpoint, ChangesPolling])
def test_credentials_over_plain_http_to_another_host_are_refused(endpoint) -> None:
    with pytest.raises(pydantic.ValidationError, match="credentials over plain http to pacs.example.org"):
        endpoint(url="http://pacs.example.org/dicom-web", auth=BASIC)


@pytest.mark.parametrize("url, extra", [
    ("https://pacs.example.org/dicom-web", {}),
    ("http://127.0.0.1:8042/dicom-web", {}),
    ("http://localhost:8042/dicom-web", {}),
    ("http://orthanc:8042/dicom-web", {"allow_plain_http": True}),
])
def test_tls_loopback_or_a_declared_private_network_may_carry_credentials(url: str, extra: dict) -> None:
    assert DicomWebEndpoint(url=url, auth=BASIC, **extra).url == url
    assert DicomWebEndpoint(url="http://pacs.example.org/dicom-web").auth is None  # nothing to protect


def test_the_shipped_configuration_declares_its_private_network() -> None:
    config = load_config(ROOT / "deploy" / "pacs" / "pacs.yaml")
    assert config.source.auth is not None and config.source.allow_plain_http
