"""The emulator's batch jobs API over HTTP, in process: statuses on the emulator's clock,
the fake model's outputs as real files, filters, validation, and what survives a restart.

Jobs here take an hour (``batch_delay``) and the clock is moved by the test route, so
each status is seen exactly when it is due, with no sleeping.
"""

from __future__ import annotations

import json
import pathlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import trio
from conftest import API_KEY, RunningEmulator, emulator_config, start_emulator

from mistralfs.emulator.batch_jobs import TRANSITIONS, IllegalTransition, Job, JobStatus

HOUR = 3600.0
REQUESTS = (
    b'{"custom_id": "a", "body": {"messages": [{"role": "user", "content": "one"}]}}\n'
    b"\n"
    b'{"custom_id": "b", "body": {"messages": [{"role": "user", "content": "two"}]}}\n'
    b"[1, 2]\n"
    b'{"custom_id": "c", "body": "not an object"}\n'
)


@pytest.fixture
async def slow(tmp_path: pathlib.Path) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an emulator whose jobs take an hour: 30 min queued, 30 min running."""
    async with trio.open_nursery() as nursery:
        emulator = await start_emulator(nursery, emulator_config(tmp_path, batch_delay=HOUR))
        async with httpx.AsyncClient(
            base_url=emulator.url, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as client:
            yield client
        nursery.cancel_scope.cancel()


async def upload(client: httpx.AsyncClient, content: bytes = REQUESTS) -> str:
    r = await client.post(
        "/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}
    )
    assert r.status_code == 200, r.text
    return r.json()["id"]


async def create(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    body.setdefault("endpoint", "/v1/chat/completions")
    body.setdefault("model", "mistral-small-latest")
    r = await client.post("/v1/batch/jobs", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def advance(client: httpx.AsyncClient, seconds: float) -> None:
    r = await client.post("/v1/_emulator/clock", json={"advance": seconds})
    assert r.status_code == 200


async def get(client: httpx.AsyncClient, job_id: str, **params: Any) -> dict[str, Any]:
    r = await client.get(f"/v1/batch/jobs/{job_id}", params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def lines_of(client: httpx.AsyncClient, file_id: str) -> list[dict[str, Any]]:
    r = await client.get(f"/v1/files/{file_id}/content")
    return [json.loads(line) for line in r.content.splitlines()]


JOB_FIELDS = {
    "id", "object", "input_files", "endpoint", "model", "agent_id", "metadata", "output_file",
    "error_file", "errors", "status", "created_at", "started_at", "completed_at",
    "total_requests", "completed_requests", "succeeded_requests", "failed_requests",
}  # fmt: skip


async def test_a_job_moves_on_the_clock_and_writes_its_files(slow: httpx.AsyncClient) -> None:
    source = await upload(slow)
    job = await create(slow, input_files=[source], metadata={"name": "demo"})
    assert set(job) == JOB_FIELDS
    assert (job["object"], job["status"], job["total_requests"]) == ("batch", "QUEUED", 4)
    assert (job["started_at"], job["output_file"], job["errors"]) == (None, None, [])
    await advance(slow, HOUR / 2 - 10)
    assert (await get(slow, job["id"]))["status"] == "QUEUED"
    await advance(slow, 20)
    running = await get(slow, job["id"])
    assert running["status"] == "RUNNING" and running["started_at"] >= job["created_at"] + 1790
    assert running["completed_requests"] == 0
    await advance(slow, HOUR / 4 - 10)  # half way through: the first two requests, answered
    halfway = await get(slow, job["id"])
    assert (halfway["completed_requests"], halfway["succeeded_requests"]) == (2, 2)
    assert (halfway["failed_requests"], halfway["status"]) == (0, "RUNNING")
    # Nothing is written before the job is done.
    assert (await slow.get("/v1/files", params={"source": "mistral"})).json()["data"] == []
    await advance(slow, HOUR / 4)
    done = await get(slow, job["id"])
    assert done["status"] == "SUCCESS"
    assert (done["completed_requests"], done["succeeded_requests"], done["failed_requests"]) == (
        4,
        2,
        2,
    )
    assert done["completed_at"] >= done["started_at"] + 1790
    assert done["errors"] == [{"message": "Some requests could not be processed", "count": 2}]
    outputs = await lines_of(slow, done["output_file"])
    assert [o["custom_id"] for o in outputs] == ["a", "b"]
    assert all(o["error"] is None and o["response"]["status_code"] == 200 for o in outputs)
    assert "one" in outputs[0]["response"]["body"]["choices"][0]["message"]["content"]
    failures = await lines_of(slow, done["error_file"])
    assert [(f["custom_id"], f["response"]) for f in failures] == [(None, None), ("c", None)]
    assert "line 3" in failures[0]["error"]["message"]  # blank lines are not requests
    listed = (await slow.get("/v1/files", params={"source": "mistral"})).json()["data"]
    by_id = {f["id"]: f for f in listed}
    assert set(by_id) == {done["output_file"], done["error_file"]}
    result, error = by_id[done["output_file"]], by_id[done["error_file"]]
    assert (result["purpose"], result["sample_type"], result["num_lines"]) == (
        "batch",
        "batch_result",
        2,
    )
    assert (error["sample_type"], error["mimetype"], error["signature"]) == (
        "batch_error",
        "application/jsonl",
        None,
    )
    assert result["filename"] == f"{job['id']}.jsonl"
    assert error["filename"] == f"{job['id']}_error.jsonl"
    assert await get(slow, job["id"]) == done  # done is done: nothing written twice


async def test_outputs_appear_in_a_files_listing_without_the_job_being_asked_for(
    slow: httpx.AsyncClient,
) -> None:
    job = await create(slow, input_files=[await upload(slow)])
    await advance(slow, HOUR + 1)
    listed = (await slow.get("/v1/files", params={"purpose": "batch"})).json()["data"]
    assert {f["sample_type"] for f in listed} == {"batch_request", "batch_result", "batch_error"}
    assert (await get(slow, job["id"]))["status"] == "SUCCESS"


async def test_the_fake_model_is_deterministic(slow: httpx.AsyncClient) -> None:
    source = await upload(slow)
    first = await create(slow, input_files=[source])
    second = await create(slow, input_files=[source])
    await advance(slow, HOUR + 1)
    a = await lines_of(slow, (await get(slow, first["id"]))["output_file"])
    b = await lines_of(slow, (await get(slow, second["id"]))["output_file"])
    assert [x["response"] for x in a] == [x["response"] for x in b]


async def test_embeddings_and_inline_requests(slow: httpx.AsyncClient) -> None:
    requests = [{"custom_id": "e1", "body": {"input": ["x", "y"]}}, {"body": {"input": "z"}}]
    job = await create(slow, endpoint="/v1/embeddings", model="mistral-embed", requests=requests)
    assert (job["input_files"], job["total_requests"]) == ([], 2)
    assert "outputs" not in await get(slow, job["id"], inline="true")  # not done yet
    await advance(slow, HOUR + 1)
    done = await get(slow, job["id"], inline="true")
    assert done["status"] == "SUCCESS" and done["error_file"] is None
    first, second = done["outputs"]
    assert [first["custom_id"], second["custom_id"]] == ["e1", None]
    vectors = first["response"]["body"]["data"]
    assert [v["index"] for v in vectors] == [0, 1] and len(vectors[0]["embedding"]) == 8
    assert "outputs" not in await get(slow, job["id"])


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ("missing", "not found"),
        ("expired", "not found"),
        ("empty", "no requests"),
    ],
)
async def test_a_job_without_requests_fails(
    slow: httpx.AsyncClient, inputs: str, message: str
) -> None:
    if inputs == "missing":
        files = [str(uuid.uuid4())]
    elif inputs == "empty":
        files = [await upload(slow, b"\n")]
    else:
        r = await slow.post(
            "/v1/files",
            files={"file": ("in.jsonl", REQUESTS)},
            data={"purpose": "batch", "expiry": "1"},
        )
        files = [r.json()["id"]]
        await advance(slow, HOUR)  # gone before the job is made
    job = await create(slow, input_files=files)
    await advance(slow, 2 * HOUR)
    done = await get(slow, job["id"])
    assert done["status"] == "FAILED"
    assert done["output_file"] is None and done["error_file"] is None
    assert message in done["errors"][0]["message"]


async def test_cancel_before_it_runs_and_after_it_is_done(slow: httpx.AsyncClient) -> None:
    source = await upload(slow)
    job = await create(slow, input_files=[source])
    r = await slow.post(f"/v1/batch/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "CANCELLATION_REQUESTED"
    await advance(slow, HOUR / 2 + 1)
    cancelled = await get(slow, job["id"])
    assert cancelled["status"] == "CANCELLED" and cancelled["completed_at"] is not None
    assert cancelled["output_file"] is None
    again = await slow.post(f"/v1/batch/jobs/{job['id']}/cancel")
    assert again.json() == cancelled  # a job that is done stays as it is
    assert (await slow.get("/v1/files", params={"source": "mistral"})).json()["data"] == []


async def test_a_job_that_cannot_finish_in_time_times_out(tmp_path: pathlib.Path) -> None:
    async with trio.open_nursery() as nursery:
        config = emulator_config(tmp_path, batch_delay=10 * HOUR)
        emulator = await start_emulator(nursery, config)
        async with httpx.AsyncClient(
            base_url=emulator.url, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as client:
            job = await create(client, input_files=[await upload(client)], timeout_hours=2)
            await advance(client, 2 * HOUR + 1)
            done = await get(client, job["id"])
            assert done["status"] == "TIMEOUT_EXCEEDED" and done["output_file"] is None
        nursery.cancel_scope.cancel()


async def test_list_filters_order_and_pages(slow: httpx.AsyncClient) -> None:
    source = await upload(slow)
    first = await create(slow, input_files=[source], metadata={"name": "a", "team": "x"})
    await advance(slow, HOUR + 1)
    second = await create(slow, input_files=[source], model="other", metadata={"name": "b"})
    third = await create(slow, input_files=[source], agent_id="ag-1", model=None)

    async def ids(**params: Any) -> list[str]:
        r = await slow.get("/v1/batch/jobs", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and isinstance(body["total"], int)
        return [j["id"] for j in body["data"]]

    assert await ids() == [third["id"], second["id"], first["id"]]  # newest first
    assert await ids(order_by="created") == [first["id"], second["id"], third["id"]]
    assert await ids(page=1, page_size=2) == [first["id"]]
    assert await ids(status="SUCCESS") == [first["id"]]
    assert await ids(status=["QUEUED", "SUCCESS"]) == [third["id"], second["id"], first["id"]]
    assert await ids(model="other") == [second["id"]]
    assert await ids(agent_id="ag-1") == [third["id"]]
    assert await ids(name="a") == [first["id"]]  # metadata, as the SDK sends it
    assert await ids(name="a", team="y") == []
    assert await ids(metadata=json.dumps({"team": "x"})) == [first["id"]]
    after = datetime.fromtimestamp(second["created_at"] - 1, UTC).isoformat()
    assert await ids(created_after=after, created_by_me="true") == [third["id"], second["id"]]
    assert await ids(created_after=str(second["created_at"] - 1)) == [third["id"], second["id"]]


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"status": "DONE"}, ["query", "status"]),
        ({"page": "-1"}, ["query", "page"]),
        ({"page_size": "0"}, ["query", "page_size"]),
        ({"created_after": "yesterday"}, ["query", "created_after"]),
        ({"created_by_me": "maybe"}, ["query", "created_by_me"]),
        ({"order_by": "name"}, ["query", "order_by"]),
        ({"metadata": "[1]"}, ["query", "metadata"]),
    ],
)
async def test_bad_list_parameters_are_422(
    slow: httpx.AsyncClient, params: dict[str, str], loc: list[str]
) -> None:
    r = await slow.get("/v1/batch/jobs", params=params)
    assert r.status_code == 422
    assert [p["loc"] for p in r.json()["detail"]] == [loc]


@pytest.mark.parametrize(
    ("body", "locs"),
    [
        ({"input_files": []}, [["body", "endpoint"]]),
        ({"endpoint": "/v1/files", "input_files": []}, [["body", "endpoint"]]),
        ({"endpoint": "/v1/embeddings"}, [["body"]]),
        ({"endpoint": "/v1/embeddings", "input_files": [], "requests": []}, [["body"]]),
        ({"endpoint": "/v1/embeddings", "input_files": "f"}, [["body", "input_files"]]),
        ({"endpoint": "/v1/embeddings", "requests": [{"custom_id": "1"}]}, [["body", "requests"]]),
        ({"endpoint": "/v1/embeddings", "input_files": [], "model": 3}, [["body", "model"]]),
        ({"endpoint": "/v1/embeddings", "input_files": [], "metadata": []}, [["body", "metadata"]]),
        (
            {"endpoint": "/v1/embeddings", "input_files": [], "timeout_hours": 0},
            [["body", "timeout_hours"]],
        ),
        ([], [["body"]]),
    ],
)
async def test_bad_create_bodies_are_422(
    slow: httpx.AsyncClient, body: Any, locs: list[list[str]]
) -> None:
    r = await slow.post("/v1/batch/jobs", json=body)
    assert r.status_code == 422, r.text
    assert [p["loc"] for p in r.json()["detail"]] == locs
    r = await slow.post("/v1/batch/jobs", content=b"{not json")
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
    assert (await slow.get("/v1/batch/jobs")).json()["total"] == 0


async def test_unknown_and_malformed_job_ids(slow: httpx.AsyncClient) -> None:
    unknown = str(uuid.uuid4())
    for method, path in [("GET", ""), ("POST", "/cancel"), ("DELETE", "")]:
        r = await slow.request(method, f"/v1/batch/jobs/{unknown}{path}")
        assert r.status_code == 404 and r.json() == {"detail": "Batch job not found"}
        r = await slow.request(method, f"/v1/batch/jobs/nope{path}")
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "job_id"]


async def test_delete_forgets_the_job_and_keeps_its_files(slow: httpx.AsyncClient) -> None:
    job = await create(slow, input_files=[await upload(slow)])
    await advance(slow, HOUR + 1)
    done = await get(slow, job["id"])
    r = await slow.delete(f"/v1/batch/jobs/{job['id']}")
    assert r.json() == {"id": job["id"], "object": "batch", "deleted": True}
    assert (await slow.get(f"/v1/batch/jobs/{job['id']}")).status_code == 404
    assert (await slow.get(f"/v1/files/{done['output_file']}")).status_code == 200


async def test_jobs_survive_a_restart(tmp_path: pathlib.Path) -> None:
    config = emulator_config(tmp_path, batch_delay=0.0)
    for turn in range(2):
        async with trio.open_nursery() as nursery:
            emulator: RunningEmulator = await start_emulator(nursery, config)
            async with httpx.AsyncClient(
                base_url=emulator.url, headers={"Authorization": f"Bearer {API_KEY}"}
            ) as client:
                if turn == 0:
                    job = await create(client, input_files=[await upload(client)])
                    assert job["status"] == "SUCCESS"  # no delay: done when first looked at
                else:
                    (again,) = (await client.get("/v1/batch/jobs")).json()["data"]
                    assert again == job
            nursery.cancel_scope.cancel()


def test_statuses_change_only_as_the_table_says() -> None:
    job = Job(id="j", endpoint="/v1/embeddings", input_files=[], model=None, agent_id=None,
              metadata=None, timeout_hours=1, created_time=0.0)  # fmt: skip
    with pytest.raises(IllegalTransition):
        job.become(JobStatus.SUCCESS, 1.0)  # not before it ran
    job.become(JobStatus.RUNNING, 1.0)
    job.become(JobStatus.SUCCESS, 2.0)
    assert (job.started_at, job.completed_at) == (1, 2)
    for status in JobStatus:
        with pytest.raises(IllegalTransition):
            job.become(status, 3.0)  # done is done
    assert set(TRANSITIONS) == set(JobStatus)
    assert all(JobStatus.QUEUED not in moves for moves in TRANSITIONS.values())
