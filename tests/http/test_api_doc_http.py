"""Every example request in docs/api.md, run as written against a real server.

A fenced bash block whose first line is `# example: <name>` is run whole by bash from the repository root, with
`localhost:3000` pointed at the test server and `curl` given a bearer token (the documented commands target
`make serve`, where authentication is off). Its `# expect: <status> [<error code>]` line is the HTTP status of the
block's last request (and the error code of its body); every earlier request must have succeeded (< 400).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.http.conftest import make_token

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "api.md"
BLOCK = re.compile(r"```bash\n# example: (?P<name>[\w-]+)\n# expect: (?P<status>\d{3})(?: (?P<code>[A-Z_]+))?\n"
                   r"(?P<script>.*?)```", re.S)
PREAMBLE = """set -eu
curl() { command curl -sS -H "Authorization: Bearer $NEURONOVA_TOKEN" -w '%{stderr}HTTP %{http_code}\\n' "$@"; }
"""


@dataclass(frozen=True)
class Example:
    name: str
    status: int
    code: str | None
    script: str


def documented_examples() -> list[Example]:
    return [Example(m["name"], int(m["status"]), m["code"], m["script"]) for m in BLOCK.finditer(DOC.read_text())]


def test_the_document_has_an_example_for_each_route() -> None:
    scripts = " ".join(example.script for example in documented_examples())
    for route in ("/health", "/model_info", "/predict/ct_classification", "/xai/explain",
                  "/predict/biomarker_prediction", "/predict/mri_segmentation", "/task/", "/feedback"):
        assert route in scripts, route
    assert len({example.name for example in documented_examples()}) == len(documented_examples())


@pytest.mark.parametrize("example", documented_examples(), ids=lambda example: example.name)
def test_documented_request(example: Example, server_url: str) -> None:
    script = PREAMBLE + example.script.replace("localhost:3000", server_url.removeprefix("http://"))
    run = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={"PATH": "/usr/bin:/bin", "NEURONOVA_TOKEN": make_token()})
    statuses = [int(s) for s in re.findall(r"^HTTP (\d{3})$", run.stderr, re.M)]
    assert statuses and statuses[-1] == example.status, (statuses, run.stdout[-2000:], run.stderr[-2000:])
    assert all(status < 400 for status in statuses[:-1]), statuses
    if example.code:
        assert f'"code":"{example.code}"' in run.stdout.replace(" ", ""), run.stdout[-2000:]
    else:
        assert run.returncode == 0, run.stderr[-2000:]
