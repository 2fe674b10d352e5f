"""Schemathesis against the running emulator with the project's OpenAPI contract.

The contract is ``shared/files-api.openapi.yaml`` beside the repository (CI lays
a copy of ``shared/`` beside its clone); a missing file fails, it never skips.

Every operation is driven with generated valid (positive) and invalid
(negative) requests, through the emulator process the SDK tests use. The
emulator first gets real files (a fine-tune upload, an OCR PDF, a batch output)
and every other valid case asks for one of them by id, so that listings,
File objects, downloads and signed URLs are checked with content, not only 404s.

Checks that run: no 5xx (``not_a_server_error``), 200 bodies match the
response schemas (``response_schema_conformance``), content types match
(``content_type_conformance``), headers match (``response_headers_conformance``),
a request without the key is refused (``ignored_auth``), invalid requests are
refused with a 4xx (``negative_data_rejection``), and valid ones are accepted
(``positive_data_acceptance``) except uploads (below).

Scope: the contract is the seed spec of ``/files`` only. What the service gained since
(API-NOTES "What changed since the seed spec": the File fields ``expires_at`` and
``visibility``, upload ``expiry``/``visibility`` and an optional ``purpose``, listing
``include_total``, the batch jobs API, the retired fine-tuning jobs API) is not in it, and
is checked instead by tests/test_sdk.py (the SDK 3.7 models validate every answer),
tests/test_emulator.py and tests/test_emulator_batch.py.
``test_the_contract_predates_the_newer_fields`` fails once shared/ gains them, so that
this scope is widened then.

Where the real service is known to differ from the contract (shared/API-NOTES.md),
the contract is adjusted in memory, and these checks are left out:

- ``purpose`` (the upload field, the list filter and the File field) is a free
  string: the service takes and returns purposes beyond the three (``audio``,
  ``agentic_safety``); File ``source`` may be ``mistral`` (batch outputs).
- ``page`` >= 0, ``page_size`` >= 1 and ``expiry`` in 1..168 are added: the
  service refuses values outside them with FastAPI's 422, which the contract
  leaves out; without them valid-by-contract values would count as refusals.
- ``status_code_conformance`` is off: the contract lists no 422 anywhere and no
  400 outside uploads, but the service answers FastAPI's 422 for invalid
  parameters (API-NOTES "Errors"). 5xx are still caught by not_a_server_error.
- ``positive_data_acceptance`` is off for uploads: the service checks content
  by purpose (fine-tune must be JSONL, OCR a document or image), which a schema
  cannot say, so a valid-by-schema random file is rightly refused (400/422).
- ``negative_data_rejection`` is off for uploads: in multipart/form-data every
  field is text on the wire, so a purpose "of another type" (an object, a
  number) arrives as just another purpose string, which the service takes.
  Missing parts are still refused (tests/test_emulator.py checks them).
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import yaml
from conftest import RunningEmulator
from emulator_admin import add_batch_output
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks

SPEC = Path(__file__).resolve().parents[2] / "shared" / "files-api.openapi.yaml"

OPERATIONS = [
    ("GET", "/files"),
    ("POST", "/files"),
    ("GET", "/files/{file_id}"),
    ("DELETE", "/files/{file_id}"),
    ("GET", "/files/{file_id}/content"),
    ("GET", "/files/{file_id}/url"),
]
CHECKS = [
    checks.not_a_server_error,
    checks.response_schema_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.ignored_auth,
    checks.negative_data_rejection,
    checks.positive_data_acceptance,
]
MAX_EXAMPLES = 25


def _raw_spec() -> dict[str, Any]:
    if not SPEC.is_file():
        pytest.fail(f"the API contract is missing: {SPEC} (shared/ must sit beside the repo)")
    return yaml.safe_load(SPEC.read_text())


def _as_the_service_behaves(raw: dict[str, Any]) -> dict[str, Any]:
    """The contract with the known differences of the real service (see the docstring)."""
    spec = copy.deepcopy(raw)
    schemas = spec["components"]["schemas"]
    schemas["File"]["properties"]["purpose"].pop("enum")
    schemas["File"]["properties"]["source"].pop("enum")
    files = spec["paths"]["/files"]
    upload = files["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    upload["properties"]["purpose"].pop("enum")
    upload["properties"]["purpose"]["minLength"] = 1  # an empty purpose is a missing one
    bounds = {"page": {"minimum": 0}, "page_size": {"minimum": 1}, "purpose": {}}
    for param in files["get"]["parameters"]:
        param["schema"].update(bounds[param["name"]])
        param["schema"].pop("enum", None)
    (expiry,) = spec["paths"]["/files/{file_id}/url"]["get"]["parameters"][1:]
    expiry["schema"].update({"minimum": 1, "maximum": 168})
    return spec


def _seed_files(emulator: RunningEmulator) -> list[str]:
    """A few real files of different kinds; returns their ids."""
    with httpx.Client(
        base_url=emulator.url, headers={"Authorization": f"Bearer {emulator.api_key}"}
    ) as c:
        ids = []
        for name, content, purpose in [
            ("train.jsonl", b'{"messages": []}\n{"messages": []}\n', "fine-tune"),
            ("scan.pdf", b"%PDF-1.4\n%%EOF\n", "ocr"),
        ]:
            r = c.post("/v1/files", files={"file": (name, content)}, data={"purpose": purpose})
            r.raise_for_status()
            ids.append(r.json()["id"])
    out = add_batch_output(emulator.url, emulator.api_key, b'{"custom_id": "1"}\n')
    return [*ids, out["id"]]


def test_contract_has_the_operations_tested_here() -> None:
    """A new operation in the contract must get its own run below."""
    raw = _raw_spec()
    found = [(m.upper(), p) for p, item in raw["paths"].items() for m in item]
    assert sorted(found) == sorted(OPERATIONS)
    assert raw["servers"][0]["url"].endswith("/v1")  # paths below are served under /v1


def test_the_contract_predates_the_newer_fields() -> None:
    """The scope above: the newer fields and routes are tested elsewhere, not here."""
    raw = _raw_spec()
    file_fields = set(raw["components"]["schemas"]["File"]["properties"])
    assert not file_fields & {"expires_at", "visibility"}
    assert not any(path.startswith("/batch") for path in raw["paths"])
    upload = raw["paths"]["/files"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert "purpose" in upload["schema"]["required"]  # optional in the service today


def test_adjustments_apply_to_the_contract() -> None:
    """Each adjustment finds what it changes: a contract that moved would fail here."""
    raw = _raw_spec()
    adjusted = _as_the_service_behaves(raw)
    assert raw["components"]["schemas"]["File"]["properties"]["purpose"]["enum"]
    assert "enum" not in adjusted["components"]["schemas"]["File"]["properties"]["purpose"]
    assert adjusted["paths"]["/files/{file_id}/url"]["get"]["parameters"][1]["name"] == "expiry"


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_against_the_contract(
    emulator_process: RunningEmulator, method: str, path: str, mode: GenerationMode
) -> None:
    schema = schemathesis.openapi.from_dict(_as_the_service_behaves(_raw_spec()))
    operation = schema[path][method]
    base_url = f"{emulator_process.url}/v1"
    headers = {"Authorization": f"Bearer {emulator_process.api_key}"}
    excluded = []
    if (method, path) == ("POST", "/files"):
        excluded = [checks.positive_data_acceptance, checks.negative_data_rejection]
    known = itertools.cycle(_seed_files(emulator_process))
    turn = itertools.count()
    statuses: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,  # the same cases on every run
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        if mode is GenerationMode.POSITIVE and case.path_parameters and next(turn) % 2:
            case.path_parameters["file_id"] = next(known)
        response = case.call_and_validate(
            base_url=base_url,
            headers=headers,
            checks=[c for c in CHECKS if c not in excluded],
            timeout=30,
        )
        statuses.append(response.status_code)

    run()
    assert statuses, "no request was made"
    assert max(statuses) < 500
    if mode is GenerationMode.POSITIVE:
        if (method, path) == ("GET", "/files"):
            assert set(statuses) == {200}
        elif "{file_id}" in path:
            assert 200 in statuses and 404 in statuses, statuses  # real files and unknown ids
