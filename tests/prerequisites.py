"""The rule for tests that need a real server or tool from the operating system (PostgreSQL, haproxy, Orthanc,
dciodvfy): where it is missing they skip with the reason, except under CI, where `.ci/run` installs it, so a missing
one is a broken set-up and fails."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NoReturn

import pytest


def under_ci() -> bool:
    """`CI` set (and not `false`/`0`), as CI services set it and `.ci/run` does."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def unavailable(what: str, reason: str) -> NoReturn:
    """Skip the test because `what` cannot run (`reason`), or fail it under CI."""
    if under_ci():
        pytest.fail(f"CI is set and {what} cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def assert_skips_then_fails_under_ci(monkeypatch: pytest.MonkeyPatch, require: Callable[[], object],
                                     hint: str) -> None:
    """`require` (its tool made missing by the caller) skips naming `hint` without CI and fails under CI."""
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=hint):
        require()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require()
