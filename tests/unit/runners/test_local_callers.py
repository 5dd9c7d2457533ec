"""BentoML's local caller of an API method, built once per service instance: same behaviour, one wrapper."""

from __future__ import annotations

import bentoml
from pydantic import Field

from runners.local_callers import cache_local_callers


@bentoml.service
class Greeter:
    name = "greeter"

    @bentoml.api
    def greet(self, who: str, greeting: str = Field(default="hello")) -> str:
        return f"{greeting} {who}, from {self.name}"


def test_each_instance_keeps_one_caller_that_behaves_as_bentomls() -> None:
    cache_local_callers()  # as api.bentoml_patches.install does; a second call changes nothing
    first, second = Greeter(), Greeter()
    second.name = "other"
    assert first.greet is first.greet and first.greet is not second.greet
    assert first.greet("ada") == "hello ada, from greeter"  # a pydantic Field default, filled in as BentoML does
    assert second.greet("ada", greeting="hi") == "hi ada, from other"
    assert first.greet.local is first.greet and first.greet.func is Greeter.inner.greet.func
