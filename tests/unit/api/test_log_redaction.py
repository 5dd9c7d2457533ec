"""Validation errors are logged without the values they refused (BentoML logs each refused request with its
traceback, whose text quotes them)."""

from __future__ import annotations

import logging

import pytest
from pydantic import BaseModel, ValidationError

from api.log_redaction import BENTOML_REQUEST_LOGGER, ValidationInputFilter, describe, install

NAME = "Doe^John"


class Record(BaseModel):
    patient_id: int
    age: int


def refused() -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        Record(patient_id=NAME, age="eighty-one")  # type: ignore[arg-type]
    return caught.value


def test_a_logged_validation_error_names_fields_and_types_but_no_value(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("neuronova.test.redaction")
    logger.addFilter(ValidationInputFilter())
    try:
        raise RuntimeError("wrapped") from refused()
    except RuntimeError:
        logger.exception("Exception on %s [%s]", "/predict/biomarker_prediction", "POST")
    (record,) = caplog.records
    text = caplog.text
    assert NAME not in text and "eighty-one" not in text and "Traceback" not in text
    assert record.getMessage() == ("Exception on /predict/biomarker_prediction [POST]: 2 validation error(s) for "
                                   "Record: patient_id (int_parsing); age (int_parsing)")


def test_other_records_pass_untouched(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("neuronova.test.redaction-other")
    logger.addFilter(ValidationInputFilter())
    try:
        raise ValueError("not a validation error")
    except ValueError:
        logger.exception("failed %d", 1)
    assert caplog.records[0].getMessage() == "failed 1" and "not a validation error" in caplog.text


def test_installed_on_bentoml_s_request_logger(caplog: pytest.LogCaptureFixture) -> None:
    install()
    try:
        raise refused()
    except ValidationError:
        logging.getLogger(BENTOML_REQUEST_LOGGER).error("Exception on /x [POST]", exc_info=True)
    assert NAME not in caplog.text and "patient_id (int_parsing)" in caplog.text


class Nested(BaseModel, extra="forbid"):
    records: dict[str, int]


def test_dict_keys_and_unexpected_field_names_are_not_written() -> None:
    with pytest.raises(ValidationError) as caught:
        Nested(records={NAME: "x"}, **{"Johanna Doe": 1})  # type: ignore[arg-type]
    text = describe(caught.value)
    assert "Johanna" not in text and NAME not in text
    assert text == "2 validation error(s) for Nested: records.… (int_parsing); (body) (extra_forbidden)"
