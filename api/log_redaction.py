"""No request value in an error log line: pydantic's validation errors print the values they refused.

BentoML logs every request its input validation refuses, traceback included, before our error handling sees it
(`bentoml._internal.server.http_app.log_exception`), and a `ValidationError`'s text quotes each refused value: a
`patient_id` of `Doe^John` lands in the server log. `ValidationInputFilter` rewrites such a record to the error count,
the fields and the error types, without values and without the traceback (which holds the same text).
"""

from __future__ import annotations

import logging
import re

from pydantic import ValidationError

BENTOML_REQUEST_LOGGER = "bentoml._internal.server.http_app"


def validation_error_in(exc_info: object) -> ValidationError | None:
    """The ValidationError a record's exception is, or was raised from (None when there is none)."""
    error = exc_info[1] if isinstance(exc_info, tuple) and len(exc_info) == 3 else None
    seen = set()
    while isinstance(error, BaseException) and id(error) not in seen:
        if isinstance(error, ValidationError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")


def field_of(location: tuple[int | str, ...]) -> str:
    """The top-level field an error is about; deeper parts (dict keys, an unexpected field's name) are the client's
    words, so they are only marked, never written."""
    first = location[0] if location else None
    name = first if isinstance(first, str) and FIELD_NAME.fullmatch(first) else "(body)"
    return f"{name}.…" if len(location) > 1 else name


def describe(error: ValidationError) -> str:
    """`N validation error(s) for Model: field (error type); ...` and nothing a request carried."""
    fields = "; ".join(f"{field_of(item['loc'])} ({item['type']})"
                       for item in error.errors(include_url=False, include_context=False, include_input=False))
    return f"{error.error_count()} validation error(s) for {error.title}: {fields}"


class ValidationInputFilter(logging.Filter):
    """Drops the traceback of a record carrying a ValidationError and says which fields failed instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = validation_error_in(record.exc_info)
        if error is not None:
            record.msg = f"{record.getMessage()}: {describe(error)}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def install() -> None:
    """On BentoML's request logger and on every handler of the root logger (any other path that logs one)."""
    redaction = ValidationInputFilter()
    logging.getLogger(BENTOML_REQUEST_LOGGER).addFilter(redaction)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redaction)
