"""Real tools against real mounts: cp, mv, rm, shell redirects, truncate, sed -i, rsync,
tar, find, du, stat, getfattr, vim, gio (GLib's file layer) and Midnight Commander in
tmux.

Each test runs the tool the way a user would, asserts that it succeeded quietly
(exit status 0, nothing on stderr), and then checks the account through the official
SDK: exactly one remote file per name, the right purpose, the right content both
through the mount and through the SDK's download (or a signed URL), and no temporary
file left behind by the tool. A missing tool fails the test: `.ci/setup` installs them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import emulator_admin
import httpx
import pytest
from conftest import RunningEmulator
from mistralai.client import Mistral
from mounting import Mounted, mount, remote_files, wait_for

pytestmark = pytest.mark.fuse

README = Path(__file__).resolve().parent.parent / "README.md"

KiB = 1024
JSONL = b"".join(
    b'{"messages": [{"role": "user", "content": "a %d"}, {"role": "assistant", "content": "ok"}]}\n'
    % i
    for i in range(5)
)


# -- helpers -------------------------------------------------------------------------


def tool(name: str) -> str:
    """The tool's path; a missing tool is a failure (`.ci/setup` installs it), not a skip."""
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed: run .ci/setup"
    return path


def log_excerpt(mounted: Mounted, lines: int = 25) -> str:
    """The daemon log's warnings and errors, and its last lines, for failure messages."""
    text = mounted.log().splitlines()
    notable = [line for line in text if " DEBUG " not in line]
    return "\n".join(
        ["-- mount log, non-debug lines:", *notable[-lines:], "-- last lines:", *text[-lines:]]
    )


def run(
    mounted: Mounted,
    *command: str | os.PathLike[str],
    quiet: bool = True,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a tool; it must exit 0 and, when `quiet`, print nothing on stderr."""
    argv = [str(part) for part in command]
    tool(argv[0])
    result = subprocess.run(
        argv, capture_output=True, input=input, env=env, cwd=cwd, timeout=60, check=False
    )
    stderr = result.stderr.decode(errors="replace")
    failure = (
        f"{' '.join(argv)} -> exit {result.returncode}\nstderr: {stderr}\n{log_excerpt(mounted)}"
    )
    assert result.returncode == 0, failure
    if quiet:
        assert stderr == "", failure
    return result


def download(sdk: Mistral, file_id: str) -> bytes:
    response = sdk.files.download(file_id=file_id)
    try:
        return response.read()
    finally:
        response.close()


def via_signed_url(sdk: Mistral, file_id: str) -> bytes:
    signed = sdk.files.get_signed_url(file_id=file_id, expiry=1)
    response = httpx.get(signed.url, timeout=30)
    assert response.status_code == 200, response.text
    return response.content


def summary(data: bytes) -> tuple[str, str]:
    """Size and digest, so that a failed comparison prints something readable."""
    return summary_of_size(len(data)), hashlib.sha256(data).hexdigest()[:16]


def summary_of_size(size: int) -> str:
    return f"{size} bytes"


def assert_account(
    sdk: Mistral, mounted: Mounted, expected: dict[str, bytes], *, signed: bool = False
) -> dict[str, str]:
    """The account holds exactly `expected` ({"purpose/filename": content}), once each.

    Content is checked through the SDK's download (and a signed URL if `signed`) and
    through the mount; each purpose folder lists exactly the expected names. Returns
    {"purpose/filename": file id}.
    """
    files = remote_files(sdk)
    held = sorted(f"{f.purpose}/{f.filename}" for f in files)
    assert held == sorted(expected), "remote files differ from what the tool should have left"
    ids = {}
    for f in files:
        key = f"{f.purpose}/{f.filename}"
        want = summary(expected[key])
        ids[key] = f.id
        assert summary_of_size(f.size_bytes) == want[0], f"{key}: remote size"
        assert summary(download(sdk, f.id)) == want, f"{key}: SDK download differs"
        if signed:
            assert summary(via_signed_url(sdk, f.id)) == want, f"{key}: signed URL differs"
        path = mounted / key
        assert summary_of_size(path.stat().st_size) == want[0], f"{key}: size through the mount"
        assert summary(path.read_bytes()) == want, f"{key}: content through the mount differs"
    for folder in ("batch", "fine-tune", "ocr"):
        names = sorted(k.split("/", 1)[1] for k in expected if k.startswith(folder + "/"))
        assert sorted(os.listdir(mounted / folder)) == names, f"{folder}/ listing"
    return ids


def assert_gone(sdk: Mistral, file_id: str) -> None:
    with pytest.raises(Exception, match=r"404|[Nn]ot found"):
        sdk.files.retrieve(file_id=file_id)


# -- 1. cp ---------------------------------------------------------------------------


def test_cp_p_into_batch(mounted: Mounted, tmp_path: Path, sdk: Mistral) -> None:
    source = tmp_path / "report.jsonl"
    source.write_bytes(b'{"custom_id": "1"}\n' * 300)
    os.utime(source, (1_000_000_000, 1_000_000_000))
    os.chmod(source, 0o600)
    run(mounted, "cp", "-p", source, mounted / "batch")
    assert_account(sdk, mounted, {"batch/report.jsonl": source.read_bytes()}, signed=True)


def test_cp_onto_an_existing_name_replaces_it(
    mounted: Mounted, tmp_path: Path, sdk: Mistral
) -> None:
    source = tmp_path / "data.txt"
    source.write_bytes(b"first version, rather long: " + b"x" * 5000 + b"\n")
    run(mounted, "cp", source, mounted / "batch")
    old = assert_account(sdk, mounted, {"batch/data.txt": source.read_bytes()})
    # Shorter content: a stale tail or a stale page cache would show.
    source.write_bytes(b"second\n")
    run(mounted, "cp", source, mounted / "batch" / "data.txt")
    new = assert_account(sdk, mounted, {"batch/data.txt": b"second\n"}, signed=True)
    assert new != old
    assert_gone(sdk, old["batch/data.txt"])
    # cp -p onto it again (O_TRUNC, then chmod/chown/utimens), longer this time.
    source.write_bytes(b"third version\n" * 100)
    run(mounted, "cp", "-p", source, mounted / "batch" / "data.txt")
    assert_account(sdk, mounted, {"batch/data.txt": source.read_bytes()})
    assert_gone(sdk, new["batch/data.txt"])


# -- 2. mv ---------------------------------------------------------------------------


def test_mv_within_a_folder(mounted: Mounted, sdk: Mistral) -> None:
    batch = mounted / "batch"
    (batch / "a.jsonl").write_bytes(JSONL)
    [before] = remote_files(sdk)
    run(mounted, "mv", batch / "a.jsonl", batch / "b.jsonl")
    assert_account(sdk, mounted, {"batch/b.jsonl": JSONL}, signed=True)
    assert_gone(sdk, before.id)


def test_mv_across_purposes(mounted: Mounted, sdk: Mistral) -> None:
    (mounted / "batch" / "train.jsonl").write_bytes(JSONL)
    [before] = remote_files(sdk)
    run(mounted, "mv", mounted / "batch" / "train.jsonl", mounted / "fine-tune")
    assert_account(sdk, mounted, {"fine-tune/train.jsonl": JSONL}, signed=True)
    assert_gone(sdk, before.id)
    [moved] = remote_files(sdk)
    assert moved.num_lines == 5 and moved.sample_type == "instruct"
    # And back again, under a new name.
    run(mounted, "mv", mounted / "fine-tune" / "train.jsonl", mounted / "batch" / "req.jsonl")
    assert_account(sdk, mounted, {"batch/req.jsonl": JSONL})


def test_mv_onto_an_existing_name_replaces_it(mounted: Mounted, sdk: Mistral) -> None:
    batch = mounted / "batch"
    (batch / "new.txt").write_bytes(b"the new content\n")
    (batch / "old.txt").write_bytes(b"the old content, which is longer\n")
    run(mounted, "mv", batch / "new.txt", batch / "old.txt")
    assert_account(sdk, mounted, {"batch/old.txt": b"the new content\n"}, signed=True)
    # Across purposes onto an existing name too.
    (mounted / "fine-tune" / "set.jsonl").write_bytes(b'{"old": 1}\n')
    (batch / "set.jsonl").write_bytes(JSONL)
    run(mounted, "mv", batch / "set.jsonl", mounted / "fine-tune" / "set.jsonl")
    assert_account(
        sdk, mounted, {"batch/old.txt": b"the new content\n", "fine-tune/set.jsonl": JSONL}
    )


def test_folders_cannot_be_moved(mounted: Mounted, sdk: Mistral) -> None:
    (mounted / "batch" / "keep.txt").write_bytes(b"keep\n")
    result = subprocess.run(
        [tool("mv"), str(mounted / "batch"), str(mounted / "renamed")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0, "renaming a purpose folder must fail"
    assert sorted(os.listdir(mounted.path)) == ["batch", "fine-tune", "jobs", "ocr"]
    assert_account(sdk, mounted, {"batch/keep.txt": b"keep\n"})


# -- 3. rm ---------------------------------------------------------------------------


def test_rm(mounted: Mounted, sdk: Mistral) -> None:
    (mounted / "batch" / "gone.txt").write_bytes(b"bye\n")
    (mounted / "batch" / "stays.txt").write_bytes(b"hi\n")
    ids = assert_account(sdk, mounted, {"batch/gone.txt": b"bye\n", "batch/stays.txt": b"hi\n"})
    run(mounted, "rm", mounted / "batch" / "gone.txt")
    assert not (mounted / "batch" / "gone.txt").exists()
    assert_account(sdk, mounted, {"batch/stays.txt": b"hi\n"})
    assert_gone(sdk, ids["batch/gone.txt"])


# -- 4. editing uploaded files in place ------------------------------------------------


def test_shell_append_to_an_uploaded_file(mounted: Mounted, sdk: Mistral) -> None:
    path = mounted / "batch" / "log.txt"
    path.write_bytes(b"line 1\n")
    [old] = remote_files(sdk)
    run(mounted, "bash", "-c", 'cat >> "$0"', path, input=b"line 2\nline 3\n")
    assert_account(sdk, mounted, {"batch/log.txt": b"line 1\nline 2\nline 3\n"}, signed=True)
    assert_gone(sdk, old.id)


def test_truncate_shrinks_and_grows_an_uploaded_file(mounted: Mounted, sdk: Mistral) -> None:
    path = mounted / "batch" / "t.bin"
    content = bytes(range(256)) * 40
    path.write_bytes(content)
    run(mounted, "truncate", "-s", "1000", path)
    assert_account(sdk, mounted, {"batch/t.bin": content[:1000]})
    run(mounted, "truncate", "-s", "5000", path)
    assert_account(sdk, mounted, {"batch/t.bin": content[:1000] + bytes(4000)}, signed=True)


def test_sed_in_place_on_fine_tune_jsonl(mounted: Mounted, sdk: Mistral) -> None:
    path = mounted / "fine-tune" / "train.jsonl"
    path.write_bytes(JSONL)
    [old] = remote_files(sdk)
    # sed writes ./sedXXXXXX in the same folder, then renames it onto the target.
    run(mounted, "sed", "-i", "s/a/b/", path)
    expected = b"".join(line.replace(b"a", b"b", 1) + b"\n" for line in JSONL.splitlines())
    assert expected != JSONL
    assert_account(sdk, mounted, {"fine-tune/train.jsonl": expected}, signed=True)
    assert_gone(sdk, old.id)


def test_vim_edit_leaves_no_swap_file_in_the_account(mounted: Mounted, sdk: Mistral) -> None:
    path = mounted / "batch" / "notes.jsonl"
    path.write_bytes(b'{"n": 1}\n')
    [old] = remote_files(sdk)
    # vim creates .notes.jsonl.swp and probes .notes.jsonl.swx beside the file, closing
    # and removing each right away: their uploads (at release, which vim does not wait
    # for) are still under way when the names go.
    run(mounted, "vim", "-u", "NONE", "-i", "NONE", "-N", "-es", "-c", "%s/1/2/", "-c", "wq", path)
    time.sleep(1.0)  # those uploads end well within this; what they stored must be gone
    assert_account(sdk, mounted, {"batch/notes.jsonl": b'{"n": 2}\n'})
    assert_gone(sdk, old.id)


# -- scratch files: one upload per file saved ----------------------------------------


def requests_made(emulator: RunningEmulator, method: str) -> int:
    """`method` requests to /v1/files since the log was cleared, uploads at release included."""
    time.sleep(0.5)  # an upload at a release the tool did not wait for has begun by now
    log = emulator_admin.requests(emulator.url, emulator.api_key)
    return sum(r["method"] == method and r["path"].startswith("/v1/files") for r in log)


def assert_quiet_log(mounted: Mounted) -> None:
    """No failed upload, nothing kept for recovery: scratch files are not failures."""
    notable = [
        line for line in mounted.log().splitlines() if " WARNING " in line or " ERROR " in line
    ]
    assert notable == [], log_excerpt(mounted)
    assert list(mounted.cache_dir.glob("recovery/*")) == []


def test_sed_i_makes_one_upload(
    mounted: Mounted, sdk: Mistral, emulator_process: RunningEmulator
) -> None:
    path = mounted / "fine-tune" / "train.jsonl"
    path.write_bytes(JSONL)
    [old] = remote_files(sdk)
    emulator_admin.clear_requests(emulator_process.url, emulator_process.api_key)
    run(mounted, "sed", "-i", "s/a/b/", path)  # writes ./sedXXXXXX, renames it over the file
    assert requests_made(emulator_process, "POST") == 1
    assert requests_made(emulator_process, "DELETE") == 1
    expected = b"".join(line.replace(b"a", b"b", 1) + b"\n" for line in JSONL.splitlines())
    assert_account(sdk, mounted, {"fine-tune/train.jsonl": expected})
    assert_gone(sdk, old.id)
    assert_quiet_log(mounted)


@pytest.mark.parametrize("folder", ["batch", "fine-tune"])
def test_a_vim_save_makes_one_upload(
    folder: str, mounted: Mounted, sdk: Mistral, emulator_process: RunningEmulator
) -> None:
    """vim's swap files (.NAME.swp, .swx), its probe 4913 and its backup NAME~ stay local:
    they made 5 uploads and 5 deletes, and in fine-tune/ a refused upload of the swap file."""
    path = mounted / folder / "notes.jsonl"
    path.write_bytes(JSONL)
    [old] = remote_files(sdk)
    emulator_admin.clear_requests(emulator_process.url, emulator_process.api_key)
    run(
        mounted,
        "vim",
        "-u",
        "NONE",
        "-i",
        "NONE",
        "-N",
        "-es",
        "-c",
        "%s/a 1/a 9/",
        "-c",
        "wq",
        path,
    )
    assert requests_made(emulator_process, "POST") == 1
    assert requests_made(emulator_process, "DELETE") == 1
    assert_account(sdk, mounted, {f"{folder}/notes.jsonl": JSONL.replace(b"a 1", b"a 9")})
    assert_gone(sdk, old.id)
    assert_quiet_log(mounted)


def test_an_rsync_copy_makes_one_upload_per_file(
    mounted: Mounted, tmp_path: Path, sdk: Mistral, emulator_process: RunningEmulator
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    files = {"a.jsonl": JSONL, "b.jsonl": JSONL * 3, "empty.jsonl": b""}
    for name, data in files.items():
        (source / name).write_bytes(data)
    emulator_admin.clear_requests(emulator_process.url, emulator_process.api_key)
    run(mounted, "rsync", "-a", f"{source}/", f"{mounted / 'batch'}/")  # .NAME.XXXXXX, renamed
    assert requests_made(emulator_process, "POST") == 3
    assert_account(sdk, mounted, {f"batch/{name}": data for name, data in files.items()})
    files["b.jsonl"] = JSONL * 4
    (source / "b.jsonl").write_bytes(files["b.jsonl"])
    emulator_admin.clear_requests(emulator_process.url, emulator_process.api_key)
    # By size, only b.jsonl differs (by mtime too: test_mtimes_tools.py).
    run(mounted, "rsync", "-a", "--size-only", f"{source}/", f"{mounted / 'batch'}/")
    assert requests_made(emulator_process, "POST") == 1
    assert requests_made(emulator_process, "DELETE") == 1
    assert_account(sdk, mounted, {f"batch/{name}": data for name, data in files.items()})
    assert_quiet_log(mounted)


def gio_env(tmp_path: Path) -> dict[str, str]:
    """GLib's local file layer only: no gvfs daemons, no D-Bus session, a private HOME."""
    home = tmp_path / "gio-home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBUS_", "XDG_"))}
    env.update(GIO_USE_VFS="local", GIO_USE_VOLUME_MONITOR="unix", HOME=str(home))
    env["XDG_RUNTIME_DIR"] = str(home)
    return env


def test_gio_save_onto_an_uploaded_file(mounted: Mounted, tmp_path: Path, sdk: Mistral) -> None:
    # g_file_replace(), as GLib applications save: open without O_TRUNC, then ftruncate.
    path = mounted / "batch" / "notes.txt"
    path.write_bytes(b"the first draft, longer than the second\n")
    [old] = remote_files(sdk)
    run(mounted, "gio", "save", path, input=b"second draft\n", env=gio_env(tmp_path))
    assert_account(sdk, mounted, {"batch/notes.txt": b"second draft\n"})
    assert_gone(sdk, old.id)


# -- 5. rsync ------------------------------------------------------------------------


def rsync_source(tmp_path: Path) -> dict[str, bytes]:
    """50 files of varied sizes: some empty, some around 200 KB."""
    source = tmp_path / "src"
    source.mkdir()
    files = {}
    for i in range(50):
        size = 0 if i % 10 == 0 else 200 * KiB + i if i % 10 == 1 else (i * 997) % 20_000 + 1
        data = (f"file {i}\n".encode() * (size // 7 + 1))[:size]
        files[f"f{i:02d}.dat"] = data
        (source / f"f{i:02d}.dat").write_bytes(data)
    return files


@pytest.mark.parametrize("extra", [[], ["--inplace"]], ids=["temp-and-rename", "inplace"])
def test_rsync_fifty_files_twice(
    extra: list[str], mounted: Mounted, tmp_path: Path, sdk: Mistral
) -> None:
    files = rsync_source(tmp_path)
    source = tmp_path / "src"
    run(mounted, "rsync", "-a", *extra, f"{source}/", f"{mounted / 'batch'}/")
    assert_account(sdk, mounted, {f"batch/{name}": data for name, data in files.items()})
    # Change a few: one grows, one shrinks, one becomes empty, an empty one gets content.
    changes = {
        "f03.dat": files["f03.dat"] + b"appended\n" * 500,
        "f11.dat": b"short now\n",
        "f25.dat": b"",
        "f40.dat": b"was empty\n",
    }
    for name, data in changes.items():
        (source / name).write_bytes(data)
        files[name] = data
    run(mounted, "rsync", "-a", *extra, f"{source}/", f"{mounted / 'batch'}/")
    assert_account(sdk, mounted, {f"batch/{name}": data for name, data in files.items()})
    assert not [f.filename for f in remote_files(sdk) if f.filename.startswith(".")]


def test_rsync_of_a_tree_with_subfolders_flattened_as_the_readme_shows(
    mounted: Mounted, tmp_path: Path, sdk: Mistral
) -> None:
    """Purpose folders hold no folders: `rsync -a` of a tree fails on its `mkdir`
    (exit 23); the README's form copies every file of the tree into one folder."""
    source = tmp_path / "tree"
    (source / "sub" / "deeper").mkdir(parents=True)
    files = {"top.txt": b"top\n", "sub/mid.txt": b"mid\n", "sub/deeper/low.txt": b"low\n"}
    for name, data in files.items():
        (source / name).write_bytes(data)
    target = f"{mounted / 'batch'}/"
    plain = subprocess.run(
        ["rsync", "-a", f"{source}/", target], capture_output=True, text=True, timeout=60
    )
    assert plain.returncode == 23 and "mkdir" in plain.stderr, plain.stderr
    for copied in (mounted / "batch").iterdir():  # what it copied before it gave up
        copied.unlink()
    readme = README.read_text()
    assert "rsync -a --files-from=<(cd src && find . -type f) --no-relative" in readme
    run(
        mounted, "bash", "-c",
        f"rsync -a --files-from=<(cd {source} && find . -type f) --no-relative {source}/ {target}",
    )  # fmt: skip
    assert_account(sdk, mounted, {f"batch/{Path(n).name}": d for n, d in files.items()})


# -- 6. tar, find, du, stat, getfattr ----------------------------------------------------


def test_tar_extract_then_find_du_stat_getfattr(
    mounted: Mounted, tmp_path: Path, sdk: Mistral
) -> None:
    source = tmp_path / "tree"
    source.mkdir()
    files = {}
    for i in range(20):
        data = os.urandom(i * 3000 + 17)
        files[f"part-{i:02d}.bin"] = data
        (source / f"part-{i:02d}.bin").write_bytes(data)
    archive = tmp_path / "a.tar"
    run(mounted, "tar", "-cf", archive, "-C", source, *sorted(files))
    with tarfile.open(archive) as t:
        assert all(member.isfile() for member in t.getmembers())
    run(mounted, "tar", "-xf", archive, "-C", mounted / "batch")
    ids = assert_account(sdk, mounted, {f"batch/{name}": data for name, data in files.items()})

    found = run(mounted, "find", mounted.path, "-type", "f").stdout.decode().split()
    assert sorted(found) == sorted(str(mounted / "batch" / name) for name in files)

    du = run(mounted, "du", "-sh", mounted / "batch").stdout.decode()
    size, where = du.split()
    assert where == str(mounted / "batch")
    assert size not in ("0", "0K") and re.fullmatch(r"[\d.]+[KMG]?", size), du
    du_bytes = run(mounted, "du", "-s", "--apparent-size", "-B1", mounted / "batch").stdout
    assert int(du_bytes.split()[0]) >= sum(len(d) for d in files.values())

    name = "part-07.bin"
    out = run(mounted, "stat", "-c", "%s %F %a", mounted / "batch" / name).stdout.decode()
    assert out.split() == [str(len(files[name])), "regular", "file", "644"]

    attrs = run(mounted, "getfattr", "-d", name, cwd=mounted / "batch").stdout.decode()
    assert f'user.mistral.id="{ids["batch/" + name]}"' in attrs, attrs
    assert 'user.mistral.purpose="batch"' in attrs, attrs
    assert 'user.mistral.source="upload"' in attrs, attrs
    assert "signed_url" not in attrs, attrs  # read by name only
    url = run(
        mounted, "getfattr", "--only-values", "-n", "user.mistral.signed_url", name,
        cwd=mounted / "batch",
    ).stdout.decode()  # fmt: skip
    assert httpx.get(url, timeout=30).content == files[name]


def test_cp_a_out_keeps_the_metadata_but_no_signed_url(
    mounted: Mounted, tmp_path: Path, sdk: Mistral
) -> None:
    (mounted / "batch" / "kept.jsonl").write_bytes(JSONL)
    [remote] = remote_files(sdk)
    run(mounted, "cp", "-a", mounted / "batch" / "kept.jsonl", tmp_path)
    copy = tmp_path / "kept.jsonl"
    assert copy.read_bytes() == JSONL
    assert os.getxattr(copy, "user.mistral.id") == remote.id.encode()
    # A link that reads the file without the key does not travel with copies.
    assert not [n for n in os.listxattr(copy) if "signed_url" in n]


def blocks(size: int) -> int:
    """`size` bytes rounded up to df's 4 KiB blocks."""
    return -(-size // 4096) * 4096


def test_df_shows_what_the_account_holds_and_ls_a_shows_dot_entries(
    emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral
) -> None:
    sizes = {"batch": 3 * 1024 * 1024 + 5, "fine-tune": len(JSONL)}
    sdk.files.upload(
        file={"file_name": "big.bin", "content": b"x" * sizes["batch"]}, purpose="batch"
    )
    sdk.files.upload(file={"file_name": "a.jsonl", "content": JSONL}, purpose="fine-tune")
    with mount(emulator_process, tmp_path) as mounted:
        # The first df lists the account (nothing was listed yet); used = their bytes.
        used = run(mounted, "df", "-B1", "--output=used,size,avail", mounted.path).stdout
        [used_bytes, size, avail] = map(int, used.decode().splitlines()[1].split())
        assert used_bytes == blocks(sum(sizes.values())), used
        assert size == used_bytes + avail and avail >= 2**40
        inodes = run(mounted, "df", "--output=iused", mounted.path).stdout.decode()
        assert int(inodes.splitlines()[1]) == 2, inodes
        (mounted / "batch" / "new.txt").write_bytes(b"y" * 4096)
        used = run(mounted, "df", "-B1", "--output=used", mounted.path).stdout.decode()
        assert int(used.splitlines()[1]) == blocks(sum(sizes.values()) + 4096), used
        human = run(mounted, "df", "-h", mounted.path).stdout.decode()
        assert human.splitlines()[1].split()[2] == "3.1M", human
        for folder in (mounted.path, mounted / "batch"):
            listing = run(mounted, "ls", "-la", folder).stdout.decode().splitlines()
            names = [line.split()[-1] for line in listing[1:]]
            assert names[:2] == [".", ".."], listing
        assert sorted(os.listdir(mounted / "batch")) == ["big.bin", "new.txt"]


# -- 7. gio --------------------------------------------------------------------------


def test_gio_list_info_copy_remove(mounted: Mounted, tmp_path: Path, sdk: Mistral) -> None:
    env = gio_env(tmp_path)
    (mounted / "batch" / "present.jsonl").write_bytes(JSONL)
    listing = run(
        mounted, "gio", "list", "-a", "standard::*", mounted / "batch", env=env
    ).stdout.decode()
    [line] = listing.splitlines()
    assert line.startswith(f"present.jsonl\t{len(JSONL)}\t(regular)"), listing
    assert "standard::content-type=" in line

    source = tmp_path / "upload.txt"
    source.write_bytes(b"copied by gio\n" * 1000)
    run(mounted, "gio", "copy", source, f"{mounted / 'batch'}/", env=env)
    ids = assert_account(
        sdk,
        mounted,
        {"batch/present.jsonl": JSONL, "batch/upload.txt": source.read_bytes()},
        signed=True,
    )

    info = run(mounted, "gio", "info", mounted / "batch" / "upload.txt", env=env).stdout.decode()
    assert "type: regular" in info, info
    assert f"standard::size: {len(source.read_bytes())}" in info, info
    xattrs = run(
        mounted, "gio", "info", "-a", "xattr::*", mounted / "batch" / "upload.txt", env=env
    ).stdout.decode()
    assert f"xattr::mistral.id: {ids['batch/upload.txt']}" in xattrs, xattrs

    run(mounted, "gio", "remove", mounted / "batch" / "upload.txt", env=env)
    assert_account(sdk, mounted, {"batch/present.jsonl": JSONL})
    assert_gone(sdk, ids["batch/upload.txt"])


def test_gio_offers_deletion_rather_than_a_trash_it_cannot_make(
    mounted: Mounted, tmp_path: Path, sdk: Mistral
) -> None:
    """File managers ask GLib whether a file can go to a trash: here it cannot (no
    `.Trash-UID` folder can be made in the root), so they must offer to delete it for
    good rather than fail. Run as the mounting user without root's power over modes."""
    env = gio_env(tmp_path)
    path = mounted / "batch" / "a.jsonl"
    path.write_bytes(JSONL)
    as_owner = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", tool("gio")]
    info = run(mounted, *as_owner, "info", "-a", "access::*", path, env=env).stdout.decode()
    assert "access::can-trash: FALSE" in info, info
    assert "access::can-delete: TRUE" in info, info
    [remote] = remote_files(sdk)
    run(mounted, *as_owner, "remove", path, env=env)
    assert_account(sdk, mounted, {})
    assert_gone(sdk, remote.id)


def utab_entries(path: Path) -> list[str]:
    """libmount's own notes on the mounts (user options such as x-gvfs-notrash) at `path`."""
    try:
        text = Path("/run/mount/utab").read_text()
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if f" TARGET={path} " in f" {line} "]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may write anywhere")
def test_gio_as_root_is_told_there_is_no_trash(
    emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral
) -> None:
    """Root may make `.Trash-0` anywhere as far as modes go, so GLib would offer a trash
    that the mount cannot hold (no folder can be made in its root). The mount carries
    GLib's `x-gvfs-notrash` option (in libmount's utab): no trash, deletion offered."""
    env = gio_env(tmp_path)
    with mount(emulator_process, tmp_path) as mounted:
        path = mounted / "batch" / "a.jsonl"
        path.write_bytes(JSONL)
        assert [line for line in utab_entries(mounted.path) if "x-gvfs-notrash" in line]
        info = run(mounted, "gio", "info", "-a", "access::*", path, env=env).stdout.decode()
        assert "access::can-trash: FALSE" in info, info
        assert "access::can-delete: TRUE" in info, info
        trash = subprocess.run(
            ["gio", "trash", str(path)], env=env, capture_output=True, text=True, timeout=60
        )
        assert trash.returncode != 0 and "not supported" in trash.stderr, trash.stderr
        assert not (mounted / ".Trash-0").exists()
        [remote] = remote_files(sdk)  # still there: refusing the trash deleted nothing
        run(mounted, "gio", "remove", path, env=env)
        assert_account(sdk, mounted, {})
        assert_gone(sdk, remote.id)
    assert utab_entries(mounted.path) == []  # the note goes with the mount


# -- 8. Midnight Commander in tmux ---------------------------------------------------------


class Tmux:
    """A tmux server of our own (its own socket), so no other tmux session is touched."""

    def __init__(self) -> None:
        self.socket_dir = Path(tempfile.mkdtemp(prefix="mistralfs-tmux-"))
        self.socket = str(self.socket_dir / "socket")
        self.session = "mc"

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            [tool("tmux"), "-S", self.socket, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert result.returncode == 0, f"tmux {args}: {result.stderr}"
        return result.stdout

    def keys(self, *keys: str) -> None:
        self("send-keys", "-t", self.session, *keys)

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", self.session)

    def wait(self, predicate, what: str, timeout: float = 10.0) -> str:
        """Poll the screen until `predicate(screen)`; fail showing the last screen."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            if time.monotonic() > deadline:
                pytest.fail(f"mc: waited {timeout}s for {what}; the screen was:\n{screen}")
            time.sleep(0.1)

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=30)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def panel_rows(screen: str, side: int) -> list[str]:
    """The names in a panel (0 left, 1 right), '/'-prefixed for folders."""
    rows = []
    for line in screen.splitlines():
        parts = line.split("||")
        if len(parts) == 2 and parts[side].count("|") >= 3:
            rows.append(parts[side].strip("|").split("|")[0].strip())
    return rows


def status(screen: str, side: int) -> str:
    """The mini status line of a panel: the name under its cursor."""
    lines = screen.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("|---") and index + 1 < len(lines):
            parts = lines[index + 1].split("||")
            if len(parts) == 2:
                return parts[side].strip("| ")
    return ""


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    session = Tmux()
    try:
        yield session
    finally:
        session.kill()


def start_mc(tmux: Tmux, home: Path, left: Path, right: Path) -> None:
    """Midnight Commander in a tmux pane, `left` and `right` in its panels, its settings
    under `home`: -u no subshell, -a plain ASCII frames. The pane stays after mc exits,
    so that its exit status can be read."""
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBUS_", "TMUX"))}
    env.update(HOME=str(home), TERM="xterm-256color", XDG_CONFIG_HOME=str(home / ".config"))
    env.update(XDG_DATA_HOME=str(home / ".local"), XDG_CACHE_HOME=str(home / ".cache"))
    shell = (
        f"TERM=xterm-256color {tool('mc')} -u -a '{left}' '{right}'; "
        'echo "mc exited with status $?"; sleep 600'
    )
    tmux("new-session", "-d", "-s", tmux.session, "-x", "200", "-y", "50", shell, env=env)


def copy_with_f5(tmux: Tmux, name: str) -> str:
    """In mc, copy `name` from the right panel to the left one (F5); the copy dialog's
    screen, before it is confirmed."""
    tmux.wait(lambda s: name in panel_rows(s, 1), "the right panel")
    tmux.keys("Tab")
    select(tmux, 1, name)
    tmux.keys("F5")
    return tmux.wait(lambda s: f'Copy file "{name}"' in s, "the copy dialog")


def select(tmux: Tmux, side: int, name: str) -> None:
    """Move the cursor of the active panel (`side`) onto `name`."""
    tmux.keys("Home")
    screen = tmux.wait(lambda s: status(s, side) in ("..", "/..", "UP--DIR"), "the cursor on ..")
    for _ in range(60):
        if status(screen, side) == name:
            return
        before = status(screen, side)
        tmux.keys("Down")
        screen = tmux.wait(
            lambda s, b=before: status(s, side) != b, f"the cursor to move to {name}"
        )
    pytest.fail(f"mc: {name} not found in the panel:\n{screen}")


def test_midnight_commander_browse_view_copy_delete(
    mounted: Mounted, tmp_path: Path, sdk: Mistral, tmux: Tmux
) -> None:
    batch = mounted / "batch"
    (batch / "view.txt").write_bytes(b"viewme line one\nsecond line of the file\n")
    (batch / "delme.txt").write_bytes(b"to be deleted\n")
    local = tmp_path / "local"
    local.mkdir()
    (local / "fromlocal.txt").write_bytes(b"copied by mc from the other panel\n" * 20)
    start_mc(tmux, tmp_path / "mc-home", mounted.path, local)

    # Browse: the root shows the purpose folders; go into batch/.
    tmux.wait(lambda s: {"/batch", "/fine-tune", "/ocr"} <= set(panel_rows(s, 0)), "the root")
    select(tmux, 0, "/batch")
    tmux.keys("Enter")
    screen = tmux.wait(
        lambda s: {"delme.txt", "view.txt"} <= set(panel_rows(s, 0)), "batch/ to be listed"
    )
    assert f"{batch} " in screen.splitlines()[1], screen

    # View a file with F3, then leave the viewer.
    select(tmux, 0, "view.txt")
    tmux.keys("F3")
    screen = tmux.wait(lambda s: "viewme line one" in s, "the viewer to show view.txt")
    assert "second line of the file" in screen and str(batch / "view.txt") in screen, screen
    tmux.keys("q")
    tmux.wait(lambda s: "view.txt" in panel_rows(s, 0), "the panels after the viewer")

    # Copy a file from the other panel into the mount with F5 + Enter.
    tmux.keys("Tab")
    select(tmux, 1, "fromlocal.txt")
    tmux.keys("F5")
    tmux.wait(lambda s: 'Copy file "fromlocal.txt"' in s, "the copy dialog")
    tmux.keys("Enter")
    screen = tmux.wait(lambda s: "fromlocal.txt" in panel_rows(s, 0), "the copy to show up")
    assert "Error" not in screen, screen
    expected = {
        "batch/view.txt": b"viewme line one\nsecond line of the file\n",
        "batch/delme.txt": b"to be deleted\n",
        "batch/fromlocal.txt": (local / "fromlocal.txt").read_bytes(),
    }
    ids = assert_account(sdk, mounted, expected, signed=True)

    # Delete one with F8 + Enter.
    tmux.keys("Tab")
    select(tmux, 0, "delme.txt")
    tmux.keys("F8")
    tmux.wait(lambda s: '"delme.txt"?' in s, "the delete confirmation")
    tmux.keys("Enter")
    screen = tmux.wait(lambda s: "delme.txt" not in panel_rows(s, 0), "delme.txt to go")
    assert "Error" not in screen, screen
    del expected["batch/delme.txt"]
    assert_account(sdk, mounted, expected)
    assert_gone(sdk, ids["batch/delme.txt"])

    # Quit with F10: mc exits 0 and nothing else changed.
    tmux.keys("F10")
    tmux.wait(lambda s: "mc exited with status" in s, "mc to exit")
    assert "mc exited with status 0" in tmux.screen()
    assert_account(sdk, mounted, expected)
    wait_for(lambda: sorted(os.listdir(batch)) == ["fromlocal.txt", "view.txt"], timeout=2)
