"""The batch jobs API's routes, as the SDK (mistralai 3.7, ``client.batch.jobs``) calls them::

    GET    /v1/batch/jobs               list: page, page_size, model, agent_id, metadata,
                                        created_after, created_by_me, status*, order_by
    POST   /v1/batch/jobs               create (JSON: endpoint, input_files | requests,
                                        model, agent_id, metadata, timeout_hours)
    GET    /v1/batch/jobs/{id}          one job (``inline=true`` adds its results)
    DELETE /v1/batch/jobs/{id}          forget a job (its files stay)
    POST   /v1/batch/jobs/{id}/cancel   ask it to stop

The SDK sends ``metadata`` exploded, one query key a metadata key
(``?name=demo&k=v``): so every query key these routes do not know is a metadata
filter; ``metadata={"k": "v"}`` (a JSON object) is taken too. Invalid parameters get
FastAPI's 422, as elsewhere; an unknown job 404 ``{"detail": "Batch job not found"}``.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import trio
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mistralfs.emulator import errors
from mistralfs.emulator.batch_jobs import BatchJobs, Job, JobQuery, JobStatus, NewJob
from mistralfs.emulator.params import bool_param, int_param, uuid_param

# SDK 3.7's APIEndpoint: what a batch job may call.
ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/fim/completions",
    "/v1/moderations",
    "/v1/chat/moderations",
    "/v1/ocr",
    "/v1/classifications",
    "/v1/chat/classifications",
    "/v1/conversations",
    "/v1/audio/transcriptions",
)
DEFAULT_TIMEOUT_HOURS = 24
LIST_PARAMS = frozenset(
    {
        "page",
        "page_size",
        "model",
        "agent_id",
        "metadata",
        "created_after",
        "created_by_me",
        "status",
        "order_by",
    }
)
ORDERS = ("created", "-created")
NOT_FOUND = "Batch job not found"


def _jobs(request: Request) -> BatchJobs:
    return request.app.state.batch_jobs


def _problem(kind: str, loc: list[Any], msg: str, value: Any) -> dict[str, Any]:
    return {"type": kind, "loc": loc, "msg": msg, "input": value}


def _invalid(kind: str, loc: list[Any], msg: str, value: Any) -> errors.ValidationFailed:
    """One FastAPI 422 entry, to raise."""
    return errors.ValidationFailed([_problem(kind, loc, msg, value)])


def _metadata_filter(request: Request) -> dict[str, str]:
    params = request.query_params
    wanted = {k: v for k, v in params.items() if k not in LIST_PARAMS}
    raw = params.get("metadata")
    if raw is not None:
        try:
            given = json.loads(raw)
        except ValueError:
            given = None
        if not isinstance(given, dict):
            raise _invalid(
                "dict_type",
                ["query", "metadata"],
                "Input should be a valid dictionary",
                raw,
            )
        wanted |= {str(k): str(v) for k, v in given.items()}
    return wanted


def _created_after(request: Request) -> float | None:
    raw = request.query_params.get("created_after")
    if raw is None or raw == "":
        return None
    try:
        return float(int(raw))
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(raw).timestamp()
    except ValueError:
        raise _invalid(
            "datetime_from_date_parsing",
            ["query", "created_after"],
            "Input should be a valid datetime",
            raw,
        ) from None


def _statuses(request: Request) -> tuple[JobStatus, ...]:
    values = request.query_params.getlist("status")
    allowed = tuple(str(s) for s in JobStatus)
    bad = [v for v in values if v not in allowed]
    if bad:
        raise errors.ValidationFailed([errors.enum(["query", "status"], v, allowed) for v in bad])
    return tuple(JobStatus(v) for v in values)


async def list_jobs(request: Request) -> Response:
    order = request.query_params.get("order_by") or "-created"
    if order not in ORDERS:
        raise errors.ValidationFailed([errors.enum(["query", "order_by"], order, ORDERS)])
    bool_param(request, "created_by_me", False)  # one user: every job is "mine"
    query = JobQuery(
        page=int_param(request, "page", 0, ge=0),
        page_size=int_param(request, "page_size", 100, ge=1),
        model=request.query_params.get("model"),
        agent_id=request.query_params.get("agent_id"),
        metadata=_metadata_filter(request),
        created_after=_created_after(request),
        statuses=_statuses(request),
        newest_first=order == "-created",
    )
    jobs, total = await _jobs(request).page(query)
    return JSONResponse({"data": [j.to_api() for j in jobs], "object": "list", "total": total})


def _new_job(body: Any) -> NewJob:
    """The create request's body, checked as FastAPI would (ValidationFailed otherwise)."""
    if not isinstance(body, dict):
        raise _invalid(
            "model_attributes_type", ["body"], "Input should be a valid dictionary", body
        )
    problems: list[dict[str, Any]] = []
    endpoint = body.get("endpoint")
    if endpoint is None:
        problems.append(errors.missing(["body", "endpoint"]))
    elif endpoint not in ENDPOINTS:
        problems.append(errors.enum(["body", "endpoint"], str(endpoint), ENDPOINTS))
    input_files = body.get("input_files")
    requests = body.get("requests")
    if input_files is not None and (
        not isinstance(input_files, list) or not all(isinstance(f, str) for f in input_files)
    ):
        problems.append(
            _problem(
                "list_type",
                ["body", "input_files"],
                "Input should be a valid list of strings",
                input_files,
            )
        )
    if requests is not None and (
        not isinstance(requests, list)
        or not all(isinstance(r, dict) and isinstance(r.get("body"), dict) for r in requests)
    ):
        problems.append(
            _problem(
                "list_type",
                ["body", "requests"],
                "Input should be a list of objects with a 'body' object",
                requests,
            )
        )
    if (input_files is None) == (requests is None):
        problems.append(
            _problem(
                "value_error",
                ["body"],
                "Value error, exactly one of input_files and requests is needed",
                body,
            )
        )
    for name in ("model", "agent_id"):
        if body.get(name) is not None and not isinstance(body[name], str):
            problems.append(
                _problem(
                    "string_type", ["body", name], "Input should be a valid string", body[name]
                )
            )
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        problems.append(
            _problem(
                "dict_type", ["body", "metadata"], "Input should be a valid dictionary", metadata
            )
        )
    timeout = body.get("timeout_hours", DEFAULT_TIMEOUT_HOURS)
    if isinstance(timeout, bool) or not isinstance(timeout, int):
        problems.append(errors.int_parsing(["body", "timeout_hours"], str(timeout)))
    elif timeout < 1:
        problems.append(errors.bound(["body", "timeout_hours"], str(timeout), ge=1))
    if problems:
        raise errors.ValidationFailed(problems)
    assert isinstance(endpoint, str)
    return NewJob(
        endpoint=endpoint,
        input_files=list(input_files or []),
        requests=requests,
        model=body.get("model"),
        agent_id=body.get("agent_id"),
        metadata=metadata,
        timeout_hours=timeout,
    )


async def create_job(request: Request) -> Response:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise errors.ValidationFailed(
            [
                _problem("json_invalid", ["body", 0], "JSON decode error", {})
                | {"ctx": {"error": str(exc)}}
            ]
        ) from None
    job = await _jobs(request).create(_new_job(body))
    return JSONResponse(job.to_api())


def _found(job: Job | None) -> Job:
    if job is None:
        raise HTTPException(404, NOT_FOUND)
    return job


async def get_job(request: Request) -> Response:
    jobs = _jobs(request)
    inline = bool_param(request, "inline", False)
    job = _found(await jobs.get(uuid_param(request, "job_id")))
    answer = job.to_api()
    if inline and job.status in (JobStatus.SUCCESS, JobStatus.FAILED):
        answer["outputs"] = await trio.to_thread.run_sync(jobs.inline_results, job)
    return JSONResponse(answer)


async def cancel_job(request: Request) -> Response:
    job = _found(await _jobs(request).cancel(uuid_param(request, "job_id")))
    return JSONResponse(job.to_api())


async def delete_job(request: Request) -> Response:
    job_id = uuid_param(request, "job_id")
    if not await _jobs(request).delete(job_id):
        raise HTTPException(404, NOT_FOUND)
    return JSONResponse({"id": job_id, "object": "batch", "deleted": True})
