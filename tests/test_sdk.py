"""The official mistralai SDK, unchanged, against the emulator running as a process.

Only ``server_url`` and ``api_key`` are given, as a user would. Sync SDK calls
only: its async API is asyncio-based and these tests do not run under trio.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import RunningEmulator, emulator_process_with
from emulator_admin import add_batch_output, add_file, advance_clock, clear_requests, requests
from mistralai.client import Mistral, errors

JSONL = b'{"messages": [{"role": "user", "content": "hello"}]}\n{"messages": []}\n'
PDF = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"


@pytest.fixture
def sdk(emulator_process: RunningEmulator) -> Iterator[Mistral]:
    with Mistral(api_key=emulator_process.api_key, server_url=emulator_process.url) as client:
        yield client


def test_upload_retrieve_download_signed_url_delete(
    sdk: Mistral, emulator_process: RunningEmulator
) -> None:
    created = sdk.files.upload(
        file={"file_name": "train.jsonl", "content": JSONL}, purpose="fine-tune"
    )
    assert created.filename == "train.jsonl"
    assert created.purpose == "fine-tune"
    assert created.size_bytes == len(JSONL)
    assert created.sample_type == "instruct"
    assert created.source == "upload"
    assert created.num_lines == 2
    assert created.mimetype == "application/jsonl"
    assert created.signature == hashlib.md5(JSONL).hexdigest()

    got = sdk.files.retrieve(file_id=created.id)
    assert got.id == created.id
    assert got.deleted is False
    assert got.size_bytes == len(JSONL)
    assert got.created_at == created.created_at

    response = sdk.files.download(file_id=created.id)
    try:
        assert response.read() == JSONL
    finally:
        response.close()

    signed = sdk.files.get_signed_url(file_id=created.id, expiry=2)
    assert signed.url.startswith(f"{emulator_process.url}/storage/{created.id}?")
    r = httpx.get(signed.url)  # no Authorization header at all
    assert r.status_code == 200
    assert r.content == JSONL

    deleted = sdk.files.delete(file_id=created.id)
    assert deleted.id == created.id
    assert deleted.deleted is True
    with pytest.raises(errors.SDKError) as excinfo:
        sdk.files.retrieve(file_id=created.id)
    assert excinfo.value.status_code == 404
    assert httpx.get(signed.url).status_code in (403, 404)


def test_list_with_filters_and_pages(sdk: Mistral, emulator_process: RunningEmulator) -> None:
    ft = [
        sdk.files.upload(
            file={"file_name": f"set-{i}.jsonl", "content": JSONL}, purpose="fine-tune"
        )
        for i in range(3)
    ]
    pdf = sdk.files.upload(file={"file_name": "Invoice.pdf", "content": PDF}, purpose="ocr")
    out = add_batch_output(emulator_process.url, emulator_process.api_key, b'{"ok": 1}\n')

    everything = sdk.files.list()
    assert everything.total == 5
    assert [f.id for f in everything.data][:1] == [out["id"]]  # newest first

    first = sdk.files.list(purpose="fine-tune", page=0, page_size=2)
    second = sdk.files.list(purpose="fine-tune", page=1, page_size=2)
    assert first.total == second.total == 3
    assert len(first.data) == 2 and len(second.data) == 1
    assert {f.id for f in first.data + second.data} == {f.id for f in ft}

    by_search = sdk.files.list(search="invoice")
    assert [f.id for f in by_search.data] == [pdf.id]
    assert by_search.data[0].mimetype == "application/pdf"
    assert by_search.data[0].num_lines == 0

    mistral = sdk.files.list(source=["mistral"])
    assert [f.id for f in mistral.data] == [out["id"]]
    assert mistral.data[0].sample_type == "batch_result"
    assert mistral.data[0].signature is None

    both = sdk.files.list(source=["mistral", "upload"], sample_type=["batch_result", "instruct"])
    assert {f.id for f in both.data} == {out["id"], *(f.id for f in ft)}

    no_total = sdk.files.list(include_total=False, purpose="ocr")
    assert no_total.total is None
    assert [f.id for f in no_total.data] == [pdf.id]


def test_expiry_and_visibility_on_upload_retrieve_and_list(
    sdk: Mistral, emulator_process: RunningEmulator
) -> None:
    before = int(time.time())
    short = sdk.files.upload(
        file={"file_name": "short.jsonl", "content": JSONL},
        purpose="batch",
        expiry=2,
        visibility="user",
    )
    assert short.visibility == "user"
    assert short.expires_at is not None
    assert before + 2 * 3600 <= short.expires_at <= time.time() + 2 * 3600 + 1  # hours
    plain = sdk.files.upload(file={"file_name": "plain.jsonl", "content": JSONL})
    assert (plain.purpose, plain.expires_at, plain.visibility) == ("fine-tune", None, "workspace")

    got = sdk.files.retrieve(file_id=short.id)
    assert (got.expires_at, got.visibility) == (short.expires_at, "user")
    listed = {f.id: f for f in sdk.files.list().data}
    assert (listed[short.id].expires_at, listed[short.id].visibility) == (short.expires_at, "user")

    with pytest.raises(errors.SDKError) as excinfo:
        sdk.files.upload(file={"file_name": "x.jsonl", "content": JSONL}, expiry=0)
    assert excinfo.value.status_code == 422
    assert '"expiry"' in excinfo.value.body

    # Two hours on (the emulator's clock, moved by its test route), the file is gone.
    advance_clock(emulator_process.url, emulator_process.api_key, 2 * 3600 + 1)
    assert [f.id for f in sdk.files.list().data] == [plain.id]
    with pytest.raises(errors.SDKError) as excinfo:
        sdk.files.retrieve(file_id=short.id)
    assert excinfo.value.status_code == 404


def test_sdk_errors_and_request_log(sdk: Mistral, emulator_process: RunningEmulator) -> None:
    clear_requests(emulator_process.url, emulator_process.api_key)
    with pytest.raises(errors.SDKError) as excinfo:
        sdk.files.upload(
            file={"file_name": "bad.jsonl", "content": b"not json\n"}, purpose="fine-tune"
        )
    assert excinfo.value.status_code == 400
    assert "line contains invalid json" in excinfo.value.body

    with (
        Mistral(api_key="wrong", server_url=emulator_process.url) as bad,
        pytest.raises(errors.SDKError) as excinfo,
    ):
        bad.files.list()
    assert excinfo.value.status_code == 401

    log = requests(emulator_process.url, emulator_process.api_key)
    assert [(e["method"], e["path"], e["status"]) for e in log] == [
        ("POST", "/v1/files", 400),
        ("GET", "/v1/files", 401),
    ]


def test_purposes_of_today_and_undeletable_repository_files(
    sdk: Mistral, emulator_process: RunningEmulator
) -> None:
    safety = sdk.files.upload(
        file={"file_name": "cases.jsonl", "content": JSONL}, purpose="agentic_safety"
    )
    audio = sdk.files.upload(file={"file_name": "talk.mp3", "content": b"ID3\x03\x00"},
                             purpose="audio")  # fmt: skip
    assert [f.id for f in sdk.files.list(purpose="agentic_safety").data] == [safety.id]
    assert [f.id for f in sdk.files.list(purpose="audio").data] == [audio.id]
    repo = add_file(emulator_process.url, emulator_process.api_key, JSONL, purpose="fine-tune")
    assert sdk.files.retrieve(file_id=repo["id"]).source == "repository"
    with pytest.raises(errors.SDKError) as excinfo:
        sdk.files.delete(file_id=repo["id"])
    assert excinfo.value.status_code == 403
    assert [f.id for f in sdk.files.list(source=["repository"]).data] == [repo["id"]]


REQUESTS = (
    b'{"custom_id": "cheese", "body": {"messages": [{"role": "user", '
    b'"content": "Best cheese?"}]}}\n'
    b"this line is not JSON\n"
    b'{"custom_id": "wine", "body": {"max_tokens": 9, "messages": [{"role": "user", '
    b'"content": "Best wine?"}]}}\n'
)


@pytest.fixture
def fast_jobs(tmp_path: pathlib.Path) -> Iterator[Mistral]:
    """The SDK on an emulator whose batch jobs take 0.4 s (the --batch-delay flag)."""
    with (
        emulator_process_with(tmp_path, "--batch-delay", "0.4") as emulator,
        Mistral(api_key=emulator.api_key, server_url=emulator.url) as client,
    ):
        yield client


def test_a_batch_job_end_to_end(fast_jobs: Mistral) -> None:
    sdk = fast_jobs
    source = sdk.files.upload(file={"file_name": "questions.jsonl", "content": REQUESTS},
                              purpose="batch")  # fmt: skip
    job = sdk.batch.jobs.create(
        input_files=[source.id],
        endpoint="/v1/chat/completions",
        model="mistral-small-latest",
        metadata={"name": "tasting"},
    )
    assert (job.status, job.total_requests, job.input_files) == ("QUEUED", 3, [source.id])
    assert job.output_file is None and job.completed_at is None
    seen = [job.status]
    deadline = time.monotonic() + 10
    while job.status not in ("SUCCESS", "FAILED") and time.monotonic() < deadline:
        time.sleep(0.05)
        job = sdk.batch.jobs.get(job_id=job.id)
        if job.status != seen[-1]:
            seen.append(job.status)
    assert seen == ["QUEUED", "RUNNING", "SUCCESS"]
    assert (job.completed_requests, job.succeeded_requests, job.failed_requests) == (3, 2, 1)
    assert job.created_at <= job.started_at <= job.completed_at  # type: ignore[operator]
    assert job.metadata == {"name": "tasting"} and job.model == "mistral-small-latest"

    assert job.output_file is not None and job.error_file is not None
    output = sdk.files.retrieve(file_id=job.output_file)
    assert (output.purpose, output.source, output.sample_type) == (
        "batch",
        "mistral",
        "batch_result",
    )
    response = sdk.files.download(file_id=job.output_file)
    try:
        lines = [json.loads(line) for line in response.read().splitlines()]
    finally:
        response.close()
    assert [line["custom_id"] for line in lines] == ["cheese", "wine"]
    answer = lines[0]["response"]
    assert answer["status_code"] == 200
    assert answer["body"]["choices"][0]["message"]["role"] == "assistant"
    assert "Best cheese?" in answer["body"]["choices"][0]["message"]["content"]
    response = sdk.files.download(file_id=job.error_file)
    try:
        (error,) = [json.loads(line) for line in response.read().splitlines()]
    finally:
        response.close()
    assert error["response"] is None and "line 2" in error["error"]["message"]
    listed = {f.id for f in sdk.files.list(source=["mistral"]).data}
    assert listed == {job.output_file, job.error_file}

    listing = sdk.batch.jobs.list(status=["SUCCESS"], metadata={"name": "tasting"})
    assert listing.total == 1 and [j.id for j in listing.data or []] == [job.id]
    assert sdk.batch.jobs.list(metadata={"name": "other"}).total == 0
    assert sdk.batch.jobs.list(status=["QUEUED", "RUNNING"]).total == 0

    # A job cancelled before it ran ends CANCELLED, with no outputs.
    other = sdk.batch.jobs.create(input_files=[source.id], endpoint="/v1/chat/completions",
                                  model="mistral-small-latest")  # fmt: skip
    cancelled = sdk.batch.jobs.cancel(job_id=other.id)
    assert cancelled.status == "CANCELLATION_REQUESTED"
    deadline = time.monotonic() + 10
    while cancelled.status != "CANCELLED" and time.monotonic() < deadline:
        time.sleep(0.05)
        cancelled = sdk.batch.jobs.get(job_id=other.id)
    assert cancelled.status == "CANCELLED" and cancelled.output_file is None
