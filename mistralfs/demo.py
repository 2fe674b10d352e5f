"""`mistralfs demo`: mount something worth looking at, with or without an account.

With `MISTRAL_API_KEY` set it mounts the real account. Without, it starts a local
emulator in the background (data under `.demo/` in the current folder), fills it once
with a few example files and starts one small batch job over them, and mounts that;
`jobs/` then shows the job running, and its output and error files once it is done
(the emulator's fake model takes a few seconds). Its key is the emulator's default,
and it keeps its port from one start to the next. `--stop` undoes both.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from mistralfs.daemon import commands as daemon
from mistralfs.daemon.state import process_alive

# The emulator's own default key, the one README.md and docs/EMULATOR.md name.
DEMO_KEY = "emulator-key"
EMULATOR_START_TIMEOUT = 20.0
DEMO_DIR_CACHE_TIME = 1.0
DEMO_BATCH_DELAY = 6.0  # seconds the demo's batch job takes: long enough to see it run

SAMPLE_FINE_TUNE = "".join(
    json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    + "\n"
    for q, a in [
        ("What is the capital of France?", "Paris."),
        ("How many legs has a spider?", "Eight."),
        ("What does FUSE stand for?", "Filesystem in Userspace."),
    ]
)
SAMPLE_BATCH = "".join(
    json.dumps({"custom_id": str(i), "body": {"messages": [{"role": "user", "content": q}]}}) + "\n"
    for i, q in enumerate(["Say hello.", "Name a colour."])
)
# The demo's batch job: its folder in jobs/ is `DEMO_JOB_NAME (id8)`.
DEMO_JOB_NAME = "demo"
DEMO_JOB = {
    "endpoint": "/v1/chat/completions",
    "model": "mistral-small-latest",
    "metadata": {"name": DEMO_JOB_NAME},
}


def _emulator_url(state: Path) -> str | None:
    """The URL of the demo emulator if it is still running."""
    try:
        pid = int((state / "emulator.pid").read_text())
        url = (state / "emulator.url").read_text().strip()
    except (OSError, ValueError):
        return None
    return url if process_alive(pid) else None


def _start_emulator(state: Path) -> str:
    """Start the demo emulator on the port it had last time, so its URL stays the same."""
    state.mkdir(parents=True, exist_ok=True)
    port = _previous_port(state)
    url = _spawn_emulator(state, port) if port else None
    if url is None:  # never started here, or another program took that port meanwhile
        url = _spawn_emulator(state, 0)
    if url is None:
        raise SystemExit(f"mistralfs: the demo emulator did not start; see {state}/emulator.log")
    return url


def _previous_port(state: Path) -> int:
    try:
        return urlsplit((state / "emulator.url").read_text().strip()).port or 0
    except (OSError, ValueError):
        return 0


def _spawn_emulator(state: Path, port: int) -> str | None:
    log = open(state / "emulator.log", "ab")  # noqa: SIM115 - handed to the child
    command = [sys.executable, "-m", "mistralfs", "emulator", "--port", str(port)]
    command += ["--data", str(state / "emulator"), "--api-key", DEMO_KEY]
    command += ["--batch-delay", str(DEMO_BATCH_DELAY)]
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
        start_new_session=True, cwd="/",
    )  # fmt: skip
    log.close()
    assert child.stdout is not None
    line = child.stdout.readline().decode().strip()  # "mistralfs emulator listening on URL"
    child.stdout.close()
    if "listening on " not in line:
        child.kill()
        child.wait()
        return None
    url = line.rsplit(" ", 1)[1]
    (state / "emulator.pid").write_text(str(child.pid))
    (state / "emulator.url").write_text(url)
    return url


def _demo_api(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {DEMO_KEY}"}, timeout=30)


def _seed(url: str) -> str | None:
    """Put example files in an empty demo account; the id of the requests for its batch
    job (None if the account held files already)."""
    with _demo_api(url) as http:
        if http.get("/v1/files", params={"page_size": 1}).json().get("total"):
            return None
        uploads = [
            ("fine-tune", "capitals.jsonl", SAMPLE_FINE_TUNE),
            ("batch", "requests.jsonl", SAMPLE_BATCH),
        ]
        ids = []
        for purpose, name, text in uploads:
            answer = http.post(
                "/v1/files", data={"purpose": purpose}, files={"file": (name, text.encode())}
            )
            answer.raise_for_status()
            ids.append(answer.json()["id"])
        return ids[1]


def _start_job(url: str, requests_id: str) -> None:
    """The demo's batch job, started once the mount is up so that jobs/ shows it run:
    its output appears in batch/ and in its folder in jobs/ once it is done."""
    with _demo_api(url) as http:
        job = {**DEMO_JOB, "input_files": [requests_id]}
        http.post("/v1/batch/jobs", json=job).raise_for_status()


def demo_command(mountpoint: Path, state: Path, stop: bool) -> int:
    mountpoint = mountpoint.expanduser().resolve()
    # Absolute: the emulator runs from / (so that it holds no folder busy), and a
    # relative --state would put its data in /.demo, shared by every demo of the machine.
    state = state.expanduser().resolve()
    if stop:
        return _stop(mountpoint, state)
    me = f"{Path(sys.executable).parent}/mistralfs"
    if os.path.ismount(mountpoint):
        print(
            f"mistralfs: {mountpoint} is already mounted; stop that demo first with:\n"
            f"  {me} demo --stop {mountpoint}",
            file=sys.stderr,
        )
        return 1
    mountpoint.mkdir(parents=True, exist_ok=True)
    args = ["mount", str(mountpoint), "--cache-dir", str(state / "cache")]
    env = dict(os.environ)
    server = ""
    requests_id: str | None = None
    url = ""
    if env.get("MISTRAL_API_KEY"):
        target = env.get("MISTRAL_SERVER_URL", "the Mistral API")
    else:
        url = _emulator_url(state) or _start_emulator(state)
        requests_id = _seed(url)
        # Listings of a local emulator cost nothing: trusted briefly, so that jobs/ shows
        # the demo job moving on within a second or two.
        args += ["--server-url", url, "--dir-cache-time", str(DEMO_DIR_CACHE_TIME)]
        env["MISTRAL_API_KEY"] = DEMO_KEY
        target = f"a local emulator at {url} (data in {state}/emulator)"
        server = f"""
The emulator's server URL: {url}  key: {DEMO_KEY}
From Python (the official SDK):
  from mistralai.client import Mistral
  client = Mistral(api_key="{DEMO_KEY}", server_url="{url}")
"""
    result = subprocess.run([sys.executable, "-m", "mistralfs", *args], env=env, check=False)
    if result.returncode != 0:
        return result.returncode
    if requests_id is not None:
        _start_job(url, requests_id)
    print(
        f"""
mistralfs is mounted at {mountpoint}, showing {target}.{server}
Try:
  ls -l {mountpoint}/*
  ls -l {mountpoint}/jobs/*/    # a batch job: job.json, its input, then its output
  cat {mountpoint}/jobs/*/output.jsonl    # once the job is done ({DEMO_BATCH_DELAY:g} s)
  cp some-training-data.jsonl {mountpoint}/fine-tune/     # uploads it
  getfattr -d {mountpoint}/fine-tune/capitals.jsonl      # the remote metadata
  rm {mountpoint}/batch/requests.jsonl                   # deletes it remotely
  {me} recovery list    # what the service refused, and why
Unmount (and stop the demo emulator):
  {me} demo --stop {mountpoint}"""
    )
    return 0


def _stop(mountpoint: Path, state: Path) -> int:
    status = 0
    if os.path.ismount(mountpoint):
        status = daemon.unmount_command(mountpoint, timeout=600)
    try:
        pid = int((state / "emulator.pid").read_text())
    except (OSError, ValueError):
        return status
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    (state / "emulator.pid").unlink(missing_ok=True)
    print("mistralfs: demo stopped")
    return status
