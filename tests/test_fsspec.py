"""`mistral://` through fsspec against the emulator (a process: fsspec's calls block).

One emulator serves the module; each test starts from an empty account.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import fsspec
import httpx
import pandas as pd
import pytest
from conftest import RunningEmulator, emulator_process_with
from emulator_admin import (
    add_batch_output,
    clear_faults,
    clear_requests,
    empty_account,
    requests,
    set_faults,
)

from mistralfs.emulator.tls import self_signed_paths
from mistralfs.fs.filesystem import XATTR_FIELDS
from mistralfs.pyfs import KeyRefused, MistralFileSystem, ServiceFailed, ServiceRefused
from mistralfs.pyfs.filesystem import WHOLE_READ_MAX

# A filesystem's finalizer that fails (say, blocking on a trio thread) fails the test.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEmulator]:
    with emulator_process_with(tmp_path_factory.mktemp("fsspec")) as running:
        yield running


@pytest.fixture
def options(server: RunningEmulator) -> Iterator[dict[str, Any]]:
    """storage_options for the emulator; the account is emptied after each test, and
    fsspec's cached instances (with their listings) are dropped."""
    yield {"api_key": server.api_key, "server_url": server.url}
    MistralFileSystem.clear_instance_cache()
    empty_account(server.url, server.api_key)


@pytest.fixture
def fs(options: dict[str, Any]) -> Iterator[MistralFileSystem]:
    filesystem = fsspec.filesystem("mistral", skip_instance_cache=True, **options)
    yield filesystem
    filesystem.close()


def routes(server: RunningEmulator) -> list[tuple[str, str]]:
    """(method, path) of the requests since the last clear, ids replaced by {id}."""
    out = []
    for r in requests(server.url, server.api_key):
        parts = r["path"].split("/")
        path = "/".join("{id}" if len(p) == 36 else p for p in parts)
        out.append((r["method"], path))
    return out


def test_the_entry_point_makes_mistral_a_protocol_of_fsspec() -> None:
    [point] = [p for p in entry_points(group="fsspec.specs") if p.name == "mistral"]
    assert point.value == "mistralfs.pyfs:MistralFileSystem"
    assert fsspec.get_filesystem_class("mistral") is MistralFileSystem


def test_importing_it_needs_no_fuse() -> None:
    """Python users on macOS or Windows have no FUSE: nothing of pyfuse3 is loaded."""
    code = "import sys, mistralfs.pyfs; assert 'pyfuse3' not in sys.modules, 'pyfuse3'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ls_and_info_show_the_purposes_and_the_remote_fields(
    fs: MistralFileSystem, server: RunningEmulator
) -> None:
    assert fs.ls("", detail=False) == ["batch", "fine-tune", "ocr"]
    assert fs.ls("mistral://batch") == []
    made = add_batch_output(server.url, server.api_key, b'{"a": 1}\n{"a": 2}\n', "out.jsonl")
    fs.pipe("audio/talk.txt", b"hello")
    fs.invalidate_cache()
    assert fs.ls("", detail=False) == ["audio", "batch", "fine-tune", "ocr"]
    info = fs.info("mistral://batch/out.jsonl")
    assert info["name"] == "batch/out.jsonl" and info["type"] == "file"
    assert info["size"] == made["bytes"]
    # Every field the mount shows as user.mistral.*, with the service's values.
    for field in XATTR_FIELDS:
        assert info[field] == made[field], field
    assert info["source"] == "mistral" and info["num_lines"] == 2
    assert fs.ls("batch") == [info]
    assert fs.info("batch") == {"name": "batch", "size": 0, "type": "directory", "purpose": "batch"}
    assert fs.ukey("batch/out.jsonl") == made["id"]
    assert fs.created("batch/out.jsonl").timestamp() == made["created_at"]


def test_cat_file_reads_ranges_through_the_signed_url(
    fs: MistralFileSystem, server: RunningEmulator
) -> None:
    data = os.urandom(3 * WHOLE_READ_MAX + 17)
    small = b"0123456789"
    fs.pipe({"batch/big.bin": data, "batch/small.bin": small})
    fs.ls("batch")
    clear_requests(server.url, server.api_key)
    assert fs.cat_file("batch/big.bin", 5, 10) == data[5:10]
    assert fs.cat_file("batch/big.bin", -7) == data[-7:]
    middle = WHOLE_READ_MAX - 3
    assert (
        fs.cat_file("batch/big.bin", middle, middle + WHOLE_READ_MAX)
        == data[middle:][:WHOLE_READ_MAX]
    )
    assert fs.cat_file("batch/big.bin", len(data) + 5) == b""
    assert fs.cat_file("batch/big.bin") == data
    # One signed URL for the file, then each range from storage, never the content route.
    assert routes(server) == [("GET", "/v1/files/{id}/url")] + [("GET", "/storage/{id}")] * 4
    clear_requests(server.url, server.api_key)
    assert fs.cat_file("batch/small.bin") == small  # whole and small: one request
    assert fs.cat_file("batch/small.bin", 2, -2) == small[2:-2]
    assert routes(server) == [
        ("GET", "/v1/files/{id}/content"),
        ("GET", "/v1/files/{id}/url"),
        ("GET", "/storage/{id}"),
    ]


def test_open_reads_through_fsspecs_block_cache(
    fs: MistralFileSystem, server: RunningEmulator
) -> None:
    data = os.urandom(4 * 2**20)
    fs.pipe("batch/data.bin", data)
    fs.ls("batch")
    clear_requests(server.url, server.api_key)
    block = 2**20
    with fs.open("batch/data.bin", block_size=block, cache_type="readahead") as f:
        got = b"".join(iter(lambda: f.read(64 * 1024), b""))
        assert type(f.cache).__name__ == "ReadAheadCache"
    assert got == data
    ranges = [r for r in requests(server.url, server.api_key) if r["range"]]
    # 64 reads served by a few ranges, each a read and the block ahead of it.
    assert 3 <= len(ranges) <= 4, ranges
    with fs.open("batch/data.bin", block_size=block, cache_type="blockcache") as f:
        f.seek(3 * block + 5)
        assert f.read(10) == data[3 * block + 5 :][:10]


def test_writes_upload_once_at_close_with_the_folders_purpose(
    fs: MistralFileSystem, server: RunningEmulator, tmp_path: Path
) -> None:
    clear_requests(server.url, server.api_key)
    with fs.open("mistral://fine-tune/train.jsonl", "wb", block_size=2**20) as f:
        for i in range(60_000):
            f.write(b'{"messages": [{"role": "user", "content": "%d"}]}\n' % i)
        assert f.tell() > 2 * 2**20  # past two blocks: written to the spool, not sent
        assert [r for r in routes(server) if r[0] == "POST"] == []
    assert [r for r in routes(server) if r[0] == "POST"] == [("POST", "/v1/files")]
    info = fs.info("fine-tune/train.jsonl")
    assert info["purpose"] == "fine-tune" and info["num_lines"] == 60_000
    local = tmp_path / "local.jsonl"
    local.write_bytes(b'{"a": 1}\n')
    fs.put_file(str(local), "batch/put.jsonl")
    fs.pipe_file("ocr/piped.pdf", b"%PDF-1.4\n%%EOF\n")
    assert fs.cat("batch/put.jsonl") == b'{"a": 1}\n'
    assert fs.info("ocr/piped.pdf")["purpose"] == "ocr"


def test_an_exception_inside_with_uploads_nothing(fs: MistralFileSystem) -> None:
    with pytest.raises(RuntimeError), fs.open("batch/half.jsonl", "wb") as f:
        f.write(b'{"a": 1}\n')
        raise RuntimeError("stop")
    assert not fs.exists("batch/half.jsonl")


def test_writing_over_a_name_replaces_its_file(fs: MistralFileSystem) -> None:
    fs.pipe("batch/x.jsonl", b'{"v": 1}\n')
    first = fs.ukey("batch/x.jsonl")
    fs.pipe("batch/x.jsonl", b'{"v": 2}\n')
    assert fs.ls("batch", detail=False) == ["batch/x.jsonl"]
    assert fs.ukey("batch/x.jsonl") != first
    assert fs.cat("batch/x.jsonl") == b'{"v": 2}\n'


def test_mv_uploads_again_and_deletes(fs: MistralFileSystem) -> None:
    fs.pipe("batch/a.jsonl", b'{"a": 1}\n')
    old = fs.ukey("batch/a.jsonl")
    fs.mv("batch/a.jsonl", "mistral://fine-tune/b.jsonl")
    assert fs.ls("batch", detail=False) == []
    moved = fs.info("fine-tune/b.jsonl")
    assert moved["id"] != old and moved["purpose"] == "fine-tune"
    assert fs.cat("fine-tune/b.jsonl") == b'{"a": 1}\n'
    fs.rm("fine-tune/b.jsonl")
    assert not fs.exists("fine-tune/b.jsonl")


def test_a_refusal_is_raised_with_the_services_message(
    fs: MistralFileSystem, server: RunningEmulator
) -> None:
    with pytest.raises(ServiceRefused) as refused:
        fs.pipe("fine-tune/bad.jsonl", b"not json\n")
    assert isinstance(refused.value, ValueError) and refused.value.status == 400
    # The emulator's own words for it, as the mount's log has them.
    assert "Some lines are not valid JSON" in str(refused.value)
    assert "line contains invalid json" in refused.value.message
    assert server.api_key not in str(refused.value) + repr(refused.value)
    assert not fs.exists("fine-tune/bad.jsonl")


def test_a_wrong_key_is_refused_without_showing_it(server: RunningEmulator) -> None:
    key = "sk-wrong-" + "x" * 20
    wrong = MistralFileSystem(api_key=key, server_url=server.url, skip_instance_cache=True)
    with pytest.raises(KeyRefused) as refused:
        wrong.ls("batch")
    assert isinstance(refused.value, PermissionError)
    assert key not in str(refused.value) + repr(refused.value) + repr(wrong)
    assert "api_key" not in wrong.to_dict(include_password=False)
    wrong.close()


def test_missing_paths_raise_file_not_found(fs: MistralFileSystem, options: dict) -> None:
    fs.pipe("batch/here.jsonl", b"{}\n")
    for call in (
        lambda: fs.cat("batch/gone.jsonl"),
        lambda: fs.info("batch/gone.jsonl"),
        lambda: fs.open("batch/gone.jsonl"),
        lambda: fs.rm("batch/gone.jsonl"),
        lambda: fs.ls("no-such-purpose"),
        lambda: fs.cat("batch/here.jsonl/deeper"),
    ):
        with pytest.raises(FileNotFoundError):
            call()
    with pytest.raises(PermissionError):
        fs.pipe("batch/sub/deeper.jsonl", b"{}\n")  # no folders inside a purpose
    # A file deleted elsewhere after it was listed: the service's 404 is a missing file.
    fs.ls("batch")
    with httpx.Client(base_url=fs.server_url) as http:
        http.delete(
            f"/v1/files/{fs.ukey('batch/here.jsonl')}",
            headers={"Authorization": f"Bearer {options['api_key']}"},
        ).raise_for_status()
    with pytest.raises(FileNotFoundError):
        fs.cat("batch/here.jsonl")


def test_pandas_reads_a_jsonl_batch_output(server: RunningEmulator, options: dict) -> None:
    lines = b"".join(b'{"custom_id": "%d", "tokens": %d}\n' % (i, i * i) for i in range(100))
    add_batch_output(server.url, server.api_key, lines, "results.jsonl")
    frame = pd.read_json("mistral://batch/results.jsonl", lines=True, storage_options=options)
    assert list(frame.columns) == ["custom_id", "tokens"]
    assert len(frame) == 100 and frame["tokens"].sum() == sum(i * i for i in range(100))


def test_open_files_globs_a_folder(server: RunningEmulator, options: dict) -> None:
    for i in range(3):
        add_batch_output(server.url, server.api_key, b'{"i": %d}\n' % i, f"out-{i}.jsonl")
    add_batch_output(server.url, server.api_key, b"{}\n", "notes.txt")
    files = fsspec.open_files("mistral://batch/*.jsonl", **options)
    assert sorted(f.path for f in files) == [f"batch/out-{i}.jsonl" for i in range(3)]
    contents = set()
    for of in files:
        with of as f:
            contents.add(f.read())
    assert contents == {b'{"i": %d}\n' % i for i in range(3)}


def test_the_filesystem_pickles_without_a_live_client(
    fs: MistralFileSystem, options: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs.pipe("batch/p.jsonl", b"{}\n")
    copy = pickle.loads(pickle.dumps(fs))  # after use: its thread and client stay here
    assert copy.cat("batch/p.jsonl") == b"{}\n"
    assert copy._thread is not fs._thread
    # A key found in the environment is read where the filesystem is made, not carried.
    monkeypatch.setenv("MISTRAL_API_KEY", options["api_key"])
    monkeypatch.setenv("MISTRAL_SERVER_URL", options["server_url"])
    from_env = fsspec.filesystem("mistral", skip_instance_cache=True)
    assert from_env.cat("batch/p.jsonl") == b"{}\n"
    assert options["api_key"] not in pickle.dumps(from_env).decode("latin-1")
    monkeypatch.delenv("MISTRAL_API_KEY")
    with pytest.raises(ValueError, match="MISTRAL_API_KEY"):
        fsspec.filesystem("mistral", skip_instance_cache=True)


@pytest.mark.fuse
def test_duplicates_and_odd_names_read_as_in_the_mount(
    server: RunningEmulator, fs: MistralFileSystem, tmp_path: Path
) -> None:
    """A path means the same file in the mount and in Python."""
    from mounting import mount

    first = add_batch_output(server.url, server.api_key, b'{"n": 1}\n', "data.jsonl")
    time.sleep(1.1)  # created_at has one-second resolution: the oldest keeps the name
    second = add_batch_output(server.url, server.api_key, b'{"n": 2}\n', "data.jsonl")
    odd = add_batch_output(server.url, server.api_key, b'{"n": 3}\n', "a/b.jsonl")
    names = fs.ls("batch", detail=False)
    assert names == sorted(
        ["batch/data.jsonl", f"batch/data ({second['id'][:8]}).jsonl", "batch/a\u2215b.jsonl"]
    )
    assert fs.ukey("batch/data.jsonl") == first["id"]
    with mount(server, tmp_path) as mounted:
        shown = sorted(os.listdir(mounted / "batch"))
        assert [f"batch/{n}" for n in shown] == names
        for name in shown:
            file_id = os.getxattr(mounted / "batch" / name, "user.mistral.id").decode()
            assert file_id == fs.ukey(f"batch/{name}")
            assert (mounted / "batch" / name).read_bytes() == fs.cat(f"batch/{name}")
    assert fs.info("batch/a\u2215b.jsonl")["filename"] == odd["filename"] == "a/b.jsonl"


@pytest.mark.logs_expected  # the client's WARNING for each retry
def test_rate_limits_are_waited_out_as_the_service_says(
    fs: MistralFileSystem, server: RunningEmulator
) -> None:
    """What each Dask worker meets when the account's rate limit is reached."""
    fs.pipe("batch/r.jsonl", b"{}\n")
    fs.invalidate_cache()
    rule = {"method": "GET", "path_prefix": "/v1/files", "status": 429, "retry_after": 1}
    set_faults(server.url, server.api_key, {**rule, "times": 2})
    started = time.monotonic()
    assert fs.cat("batch/r.jsonl") == b"{}\n"
    assert time.monotonic() - started >= 2  # Retry-After: 1, twice
    clear_faults(server.url, server.api_key)


FORK_SCRIPT = """
import os, sys, fsspec
options = dict(api_key=sys.argv[1], server_url=sys.argv[2])
fs = fsspec.filesystem("mistral", **options)
assert fs.cat("batch/f.jsonl") == b"{}\\n"
pid = os.fork()
if pid == 0:
    child = fsspec.filesystem("mistral", **options)
    assert child is not fs
    assert child.cat("batch/f.jsonl") == b"{}\\n"
    sys.exit(0)  # the parent's filesystem is finalized here too: it must not wait
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert fs.cat("batch/f.jsonl") == b"{}\\n"
"""


def test_a_forked_child_opens_its_own_client(fs: MistralFileSystem, options: dict) -> None:
    """As multiprocessing's fork does: the parent's trio thread is not in the child."""
    fs.pipe("batch/f.jsonl", b"{}\n")
    script = [sys.executable, "-c", FORK_SCRIPT, options["api_key"], options["server_url"]]
    subprocess.run(script, check=True, timeout=60)


@pytest.mark.logs_expected  # the client's ERROR for the refused certificate
def test_tls_trusts_what_the_mount_trusts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ca_file`, else SSL_CERT_FILE; never an unverified connection."""
    with emulator_process_with(tmp_path, "--tls") as running:
        cert = self_signed_paths(running.data_dir)[0]
        options = {"api_key": running.api_key, "server_url": running.url}
        with_ca = MistralFileSystem(ca_file=str(cert), skip_instance_cache=True, **options)
        with_ca.pipe("batch/t.jsonl", b"{}\n")
        assert with_ca.cat("batch/t.jsonl") == b"{}\n"  # the API, then a signed URL
        with_ca.close()
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        from_env = MistralFileSystem(skip_instance_cache=True, **options)
        assert from_env.ls("batch", detail=False) == ["batch/t.jsonl"]
        from_env.close()
        monkeypatch.delenv("SSL_CERT_FILE")
        untrusted = MistralFileSystem(skip_instance_cache=True, **options)
        with pytest.raises(ServiceFailed, match="certificate verify failed"):
            untrusted.ls("batch")
        untrusted.close()


def test_putting_many_files_lists_the_folder_once(
    fs: MistralFileSystem, server: RunningEmulator, tmp_path: Path
) -> None:
    """Each upload and delete updates the cached listing, as the mount's own do."""
    for i in range(12):
        (tmp_path / f"part-{i:02}.jsonl").write_bytes(b'{"i": %d}\n' % i)
    fs.ls("batch")
    clear_requests(server.url, server.api_key)
    fs.put([str(p) for p in sorted(tmp_path.glob("*.jsonl"))], "batch/")
    fs.rm([f"batch/part-{i:02}.jsonl" for i in range(6)])
    assert [r for r in routes(server) if r == ("GET", "/v1/files")] == []
    assert fs.ls("batch", detail=False) == [f"batch/part-{i:02}.jsonl" for i in range(6, 12)]
    fs.invalidate_cache()
    assert fs.ls("batch", detail=False) == [f"batch/part-{i:02}.jsonl" for i in range(6, 12)]


def test_an_asyncio_program_awaits_it_and_may_cancel(
    options: dict, server: RunningEmulator
) -> None:
    """`asynchronous=True` from the caller's own loop; a cancelled call ends at once and
    leaves the client as it was."""

    async def main() -> None:
        fs = MistralFileSystem(asynchronous=True, skip_instance_cache=True, **options)
        await fs._pipe_file("batch/a.jsonl", b"{}\n")
        assert await fs._cat_file("batch/a.jsonl") == b"{}\n"
        slow = {"method": "GET", "path_prefix": "/v1/files", "status": None, "delay": 3.0}
        set_faults(server.url, server.api_key, {**slow, "times": 1})
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fs._ls("batch", refresh=True), 0.5)
        assert time.monotonic() - started < 2
        clear_faults(server.url, server.api_key)
        assert await fs._ls("batch", detail=False, refresh=True) == ["batch/a.jsonl"]
        fs.close()

    asyncio.run(main())
