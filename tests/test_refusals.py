"""Content the service refuses, as a person meets it with real tools (issue #17, 1-2).

cp, sed -i, gio copy, mc and mv report "Bad message" (EBADMSG), not "Invalid argument";
the refused name stays, reads what was written and says why in `user.mistral.error`;
`mv` into a purpose that refuses the file uploads once and says so truthfully; and
`mistralfs recovery` lists, retries, saves and discards what was kept, with a running
mount following it (its names, `status`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import emulator_admin
import pytest
from conftest import RunningEmulator
from mistralai.client import Mistral
from mounting import Mounted, remote_files, wait_for
from test_tools import JSONL, gio_env, run, tool

pytestmark = [pytest.mark.fuse, pytest.mark.logs_expected]

BROKEN = b'{"messages": []}\nthis line is not json\n'


def uploads(emulator: RunningEmulator) -> int:
    """Uploads (POST /v1/files) since the request log was cleared."""
    time.sleep(0.3)  # an upload at a release the tool did not wait for has begun by now
    log = emulator_admin.requests(emulator.url, emulator.api_key)
    return sum(r["method"] == "POST" and r["path"] == "/v1/files" for r in log)


def failing(*command: str | os.PathLike[str], env: dict[str, str] | None = None) -> str:
    """Run a tool that must fail; its stderr."""
    argv = [str(part) for part in command]
    tool(argv[0])
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0, f"{argv} succeeded: {result.stdout}"
    return result.stderr


def getfattr(path: Path, name: str) -> str:
    return os.getxattr(path, name).decode()


def cli_env(mounted: Mounted, emulator: RunningEmulator) -> dict[str, str]:
    """The environment `mistralfs` commands of this mount's user see."""
    env = dict(os.environ, MISTRAL_API_KEY=emulator.api_key, XDG_RUNTIME_DIR=str(mounted.run_dir))
    env.pop("MISTRAL_SERVER_URL", None)
    return env


def mistralfs(env: dict[str, str], *args: str | os.PathLike[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mistralfs", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def recovery(mounted: Mounted, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return mistralfs(env, "recovery", *args, "--cache-dir", mounted.cache_dir)


def failed_in_status(mounted: Mounted, env: dict[str, str]) -> list[dict]:
    result = mistralfs(env, "status", "--json", mounted.path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["failed"]


# -- the errno and the reason ---------------------------------------------------------


def test_cp_of_refused_content_says_bad_message_and_the_name_says_why(
    mounted: Mounted, tmp_path: Path, sdk: Mistral, emulator_process: RunningEmulator
) -> None:
    source = tmp_path / "train.jsonl"
    source.write_bytes(BROKEN)
    stderr = failing("cp", source, mounted / "fine-tune")
    assert "train.jsonl': Bad message" in stderr, stderr
    assert remote_files(sdk) == []
    # The name stays: ls shows it, reading it gives back what was written, and its
    # xattr gives the service's own message.
    path = mounted / "fine-tune" / "train.jsonl"
    assert "train.jsonl" in run(mounted, "ls", mounted / "fine-tune").stdout.decode()
    assert path.read_bytes() == BROKEN
    why = run(
        mounted, "getfattr", "--absolute-names", "--only-values", "-n", "user.mistral.error", path
    ).stdout
    assert why.startswith(b"400 Invalid file format") and b"line 2" in why, why
    assert "user.mistral.error" in os.listxattr(path)
    env = cli_env(mounted, emulator_process)
    [failed] = failed_in_status(mounted, env)
    assert failed["name"] == "train.jsonl" and failed["error"] == why.decode()


def test_sed_i_that_breaks_a_fine_tune_file_says_bad_message(
    mounted: Mounted, sdk: Mistral
) -> None:
    path = mounted / "fine-tune" / "train.jsonl"
    path.write_bytes(JSONL)
    [before] = remote_files(sdk)
    stderr = failing("sed", "-i", "1s/^/oops /", path)
    assert "Bad message" in stderr and "Invalid argument" not in stderr, stderr
    [after] = remote_files(sdk)
    assert after.id == before.id  # the rename was refused: nothing changed
    assert path.read_bytes() == JSONL


def test_gio_copy_of_a_text_file_into_ocr_says_bad_message(
    mounted: Mounted, tmp_path: Path, sdk: Mistral
) -> None:
    source = tmp_path / "notes.txt"
    source.write_bytes(b"plain text, which OCR does not take\n")
    stderr = failing("gio", "copy", source, f"{mounted / 'ocr'}/", env=gio_env(tmp_path))
    assert "Bad message" in stderr, stderr
    assert remote_files(sdk) == []
    path = mounted / "ocr" / "notes.txt"
    assert path.read_bytes() == source.read_bytes()
    assert "text/plain" in getfattr(path, "user.mistral.error")


# -- mv into a purpose that refuses the content ----------------------------------------


def test_mv_into_a_refusing_purpose_uploads_once_and_says_why(
    mounted: Mounted, sdk: Mistral, emulator_process: RunningEmulator
) -> None:
    source = mounted / "batch" / "hello.txt"
    source.write_bytes(b"hello, not a document\n")
    [before] = remote_files(sdk)
    emulator_admin.clear_requests(emulator_process.url, emulator_process.api_key)
    stderr = failing("mv", source, f"{mounted / 'ocr'}/")
    assert uploads(emulator_process) == 1  # it was 2: mv took EINVAL for "no RENAME_NOREPLACE"
    assert "subdirectory of itself" not in stderr, stderr
    assert stderr.strip().endswith("ocr/hello.txt': Bad message"), stderr
    [after] = remote_files(sdk)
    assert after.id == before.id and source.read_bytes() == b"hello, not a document\n"
    assert not (mounted / "ocr" / "hello.txt").exists()
    failure = [line for line in mounted.log().splitlines() if "upload of" in line]
    assert failure and "upload of ocr/hello.txt failed" in failure[-1], failure
    # Without a desktop, the reason is on the name that stayed, naming where it went.
    why = getfattr(source, "user.mistral.error")
    assert why.startswith("not moved to ocr/hello.txt: 4") and "text/plain" in why, why
    assert "user.mistral.error" in os.listxattr(source)
    (mounted / "batch" / "hello.txt").rename(mounted / "batch" / "hello2.txt")  # a move that works
    assert "user.mistral.error" not in os.listxattr(mounted / "batch" / "hello2.txt")


# -- mistralfs recovery -----------------------------------------------------------------


def test_recovery_list_retry_into_another_purpose_save_and_discard(
    mounted: Mounted, tmp_path: Path, sdk: Mistral, emulator_process: RunningEmulator
) -> None:
    env = cli_env(mounted, emulator_process)
    for name in ("a.txt", "b.txt", "c.txt"):
        source = tmp_path / name
        source.write_bytes(f"{name} is text\n".encode())
        failing("cp", source, mounted / "ocr")
    listed = recovery(mounted, env, "list", "--json")
    entries = {e["filename"]: e for e in json.loads(listed.stdout)}
    assert sorted(entries) == ["a.txt", "b.txt", "c.txt"]
    assert all(e["purpose"] == "ocr" and "text/plain" in e["error"] for e in entries.values())
    shown = recovery(mounted, env, "list").stdout
    assert "ocr/a.txt" in shown and entries["a.txt"]["id"][:12] in shown
    assert len(failed_in_status(mounted, env)) == 3

    # Retried where it was refused: refused again, kept with the reason.
    again = recovery(mounted, env, "retry", entries["a.txt"]["id"][:8])
    assert again.returncode == 1 and "refused again" in again.stderr, again.stderr
    assert len(failed_in_status(mounted, env)) == 3
    # Into batch/, which takes it: uploaded with the running mount's settings, and the
    # mount follows: the name in ocr/ goes, batch/ shows the file.
    moved = recovery(mounted, env, "retry", entries["a.txt"]["id"], "--purpose", "batch")
    assert moved.returncode == 0, moved.stderr
    [stored] = remote_files(sdk)
    assert (stored.purpose, stored.filename) == ("batch", "a.txt")
    wait_for(lambda: "a.txt" not in os.listdir(mounted / "ocr"), timeout=3)
    wait_for(lambda: (mounted / "batch" / "a.txt").exists(), timeout=3)
    assert (mounted / "batch" / "a.txt").read_bytes() == b"a.txt is text\n"

    saved = recovery(mounted, env, "save", entries["b.txt"]["id"], str(tmp_path / "out"))
    assert saved.returncode == 0, saved.stderr
    assert (tmp_path / "out").read_bytes() == b"b.txt is text\n"
    dropped = recovery(mounted, env, "discard", entries["c.txt"]["id"])
    assert dropped.returncode == 0, dropped.stderr
    assert failed_in_status(mounted, env) == []
    assert json.loads(recovery(mounted, env, "list", "--json").stdout) == []
    wait_for(lambda: os.listdir(mounted / "ocr") == [], timeout=3)
    assert not (mounted / "ocr" / "b.txt").exists()


def test_rm_of_a_refused_name_discards_what_was_kept(
    mounted: Mounted, tmp_path: Path, emulator_process: RunningEmulator
) -> None:
    source = tmp_path / "x.txt"
    source.write_bytes(b"text\n")
    failing("cp", source, mounted / "ocr")
    env = cli_env(mounted, emulator_process)
    assert len(json.loads(recovery(mounted, env, "list", "--json").stdout)) == 1
    run(mounted, "rm", mounted / "ocr" / "x.txt")
    assert json.loads(recovery(mounted, env, "list", "--json").stdout) == []
    assert failed_in_status(mounted, env) == []


def test_mv_of_a_refused_name_into_a_purpose_that_takes_it_uploads_it(
    mounted: Mounted, tmp_path: Path, sdk: Mistral, emulator_process: RunningEmulator
) -> None:
    source = tmp_path / "y.txt"
    source.write_bytes(b"text for batch\n")
    failing("cp", source, mounted / "ocr")
    run(mounted, "mv", mounted / "ocr" / "y.txt", mounted / "batch")
    [stored] = remote_files(sdk)
    assert (stored.purpose, stored.filename) == ("batch", "y.txt")
    assert (mounted / "batch" / "y.txt").read_bytes() == b"text for batch\n"
    env = cli_env(mounted, emulator_process)
    assert json.loads(recovery(mounted, env, "list", "--json").stdout) == []


def test_midnight_commander_shows_bad_message_for_a_refused_copy(
    mounted: Mounted, tmp_path: Path, sdk: Mistral
) -> None:
    from test_tools import Tmux, copy_with_f5, start_mc

    tmux = Tmux()
    try:
        local = tmp_path / "local"
        local.mkdir()
        (local / "notes.txt").write_bytes(b"plain text, which OCR does not take\n")
        start_mc(tmux, tmp_path / "mc-home", mounted / "ocr", local)
        copy_with_f5(tmux, "notes.txt")
        tmux.keys("Enter")
        screen = tmux.wait(lambda s: "Bad message" in s, "mc to report the refusal")
        assert "Invalid argument" not in screen, screen
        assert remote_files(sdk) == []
    finally:
        tmux.kill()
    why = getfattr(mounted / "ocr" / "notes.txt", "user.mistral.error")
    assert "text/plain" in why


def test_recovery_works_on_the_cache_folder_without_a_mount(
    emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral
) -> None:
    from mounting import mount

    source = tmp_path / "z.txt"
    source.write_bytes(b"text, later for batch\n")
    with mount(emulator_process, tmp_path) as mounted:
        failing("cp", source, mounted / "ocr")
    env = cli_env(mounted, emulator_process)
    [entry] = json.loads(recovery(mounted, env, "list", "--json").stdout)
    assert entry["filename"] == "z.txt" and "text/plain" in entry["error"]
    # No mount runs to take the server from: it is given, as to `mount`.
    retried = recovery(
        mounted, env, "retry", entry["id"], "--purpose", "batch",
        "--server-url", emulator_process.url,
    )  # fmt: skip
    assert retried.returncode == 0, retried.stderr
    assert "uploaded ocr/z.txt as batch/z.txt" in retried.stdout
    [stored] = remote_files(sdk)
    assert (stored.purpose, stored.filename) == ("batch", "z.txt")
    assert json.loads(recovery(mounted, env, "list", "--json").stdout) == []


def test_recovery_without_cache_dir_finds_what_running_mounts_keep(
    mounted: Mounted, tmp_path: Path, sdk: Mistral, emulator_process: RunningEmulator
) -> None:
    """The demo, and any mount with `--cache-dir`, keeps its cache elsewhere than the
    default: `recovery` looks in the folders of the running mounts too, so the command
    that `status` points to finds the entries it counts."""
    env = dict(cli_env(mounted, emulator_process), XDG_CACHE_HOME=str(tmp_path / "elsewhere"))
    source = tmp_path / "t.txt"
    source.write_bytes(b"text\n")
    failing("cp", source, mounted / "ocr")
    shown = mistralfs(env, "recovery", "list")
    assert shown.returncode == 0, shown.stderr
    assert "ocr/t.txt" in shown.stdout and str(mounted.cache_dir) in shown.stdout
    [entry] = json.loads(mistralfs(env, "recovery", "list", "--json").stdout)
    moved = mistralfs(env, "recovery", "retry", entry["id"][:8], "--purpose", "batch")
    assert moved.returncode == 0, moved.stderr
    assert [(f.purpose, f.filename) for f in remote_files(sdk)] == [("batch", "t.txt")]
    nothing = mistralfs(env, "recovery", "list")
    assert "nothing kept" in nothing.stdout and str(mounted.cache_dir) in nothing.stdout
