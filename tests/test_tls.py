"""TLS end to end: the emulator over HTTPS, and every client path verifying it alike.

A test CA (trustme) issues the emulator's certificate; clients trust it through
`--ca-file` (`FilesClient(ca_file=)`), `SSL_CERT_FILE`, or not at all, and then refuse
the server at once with one line. `--tls` makes the emulator's own certificate.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import certifi
import httpx
import pytest
import trio
import trustme
from conftest import RunningEmulator, emulator_config, emulator_process_with, start_emulator
from cryptography import x509
from mistralai.client import Mistral
from mounting import is_mounted, mount, mount_command, sha256_of

from mistralfs.api import (
    CertificateRejected,
    FilesClient,
    GrowingFile,
    RemoteFile,
    RetryPolicy,
    tls,
)
from mistralfs.api.tls import TrustError, client_context
from mistralfs.api.transport import ThreadedTransport
from mistralfs.emulator.tls import ensure_self_signed, self_signed_paths

MiB = 1024 * 1024
FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, total_budget=5.0)


@dataclass
class TlsFiles:
    """A test CA's certificate (what clients trust) and a server certificate it issued."""

    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(test_ca: trustme.CA, tmp_path: Path) -> TlsFiles:
    files = TlsFiles(ca=tmp_path / "ca.pem", cert=tmp_path / "cert.pem", key=tmp_path / "key.pem")
    test_ca.cert_pem.write_to_path(str(files.ca))
    leaf = test_ca.issue_cert("127.0.0.1", "localhost")
    files.cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(files.key))
    return files


@pytest.fixture(autouse=True)
def no_trust_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test says what it trusts: none inherits SSL_CERT_FILE or SSL_CERT_DIR."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


@pytest.fixture
async def tls_emulator(tls_files: TlsFiles, tmp_path: Path) -> AsyncIterator[RunningEmulator]:
    """The emulator in this trio run, serving HTTPS with the test CA's certificate."""
    config = emulator_config(tmp_path, tls_cert=tls_files.cert, tls_key=tls_files.key)
    async with trio.open_nursery() as nursery:
        yield await start_emulator(nursery, config)
        nursery.cancel_scope.cancel()


async def _uploaded(client: FilesClient, tmp_path: Path, size: int) -> tuple[bytes, str]:
    """Random bytes uploaded to batch/, and their signed URL."""
    data = os.urandom(size)
    (tmp_path / "big.bin").write_bytes(data)
    remote = await client.upload(tmp_path / "big.bin", filename="big.bin", purpose="batch")
    return data, (await client.signed_url(remote.id)).url


async def test_client_over_tls_lists_uploads_and_reads_ranges_on_one_connection(
    tls_emulator: RunningEmulator, tls_files: TlsFiles, tmp_path: Path
) -> None:
    assert tls_emulator.url.startswith("https://")
    async with FilesClient(
        tls_emulator.url, tls_emulator.api_key, retry=FAST, ca_file=tls_files.ca
    ) as client:
        data, url = await _uploaded(client, tmp_path, 2 * MiB + 5)
        # The storage route is on the same server: its signed URLs are https too.
        assert url.startswith(tls_emulator.url + "/storage/")
        assert [f.filename for f in (await client.list_files()).files] == ["big.bin"]
        assert await client.read_range(url, MiB - 3, MiB) == data[MiB - 3 : 2 * MiB - 3]
        assert await client.read_range(url, 7, MiB) == data[7 : MiB + 7]
        assert client.idle_connections() == 1  # one handshake served every call


async def test_a_growing_upload_over_tls_stores_every_byte(
    tls_emulator: RunningEmulator, tls_files: TlsFiles, tmp_path: Path
) -> None:
    """Over TLS the file's parts are read and sent whole (sendfile would send 8 KiB
    records), chunk framing included: the stored file is the written one."""
    path = tmp_path / "grow.bin"
    path.write_bytes(b"")
    growing = GrowingFile()
    pieces = [os.urandom(size) for size in (300_000, 2 * MiB + 3, 5)]
    async with FilesClient(
        tls_emulator.url, tls_emulator.api_key, retry=FAST, ca_file=tls_files.ca
    ) as client:
        assert client.sends_growing_uploads
        upload = client.growing_upload(path, growing, filename="grow.bin", purpose="batch")
        stored: list[RemoteFile] = []

        async def send() -> None:
            stored.append(await upload.run())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            for piece in pieces:
                with path.open("ab") as out:
                    out.write(piece)
                growing.grew(path.stat().st_size)
                await trio.sleep(0.05)
            growing.finish(path.stat().st_size)
        data = b"".join(pieces)
        assert stored[0].bytes == len(data)
        assert stored[0].signature == hashlib.md5(data).hexdigest()


async def test_an_untrusted_certificate_is_refused_at_once_on_every_path(
    tls_emulator: RunningEmulator, tls_files: TlsFiles, tmp_path: Path
) -> None:
    """Not retried (it fails the same way each time), and no request reaches the server."""
    async with FilesClient(
        tls_emulator.url, tls_emulator.api_key, retry=FAST, ca_file=tls_files.ca
    ) as trusting:
        _, url = await _uploaded(trusting, tmp_path, 2 * MiB)
    (tmp_path / "new.jsonl").write_text('{"a": 1}\n')
    async with FilesClient(tls_emulator.url, tls_emulator.api_key, retry=FAST) as client:
        calls = {
            "list": client.check_auth,
            "upload": lambda: client.upload(
                tmp_path / "new.jsonl", filename="new.jsonl", purpose="batch"
            ),
            "signed URL read": lambda: client.read_range(url, 0, MiB),
        }
        for what, call in calls.items():
            with trio.fail_after(2), pytest.raises(CertificateRejected) as raised:
                await call()
            assert "certificate verify failed: unable to get local issuer certificate" in str(
                raised.value
            ), what
        assert sum(client.stats.requests.values()) == 3  # one attempt each


async def test_a_connection_opened_ahead_is_used_after_the_servers_session_tickets(
    tls_files: TlsFiles,
) -> None:
    """A TLS 1.3 server built on OpenSSL's sockets (nginx, blob storage) sends session
    tickets right after the handshake: the connection opened ahead reads as readable,
    yet it is the one the first request goes on, and the next (no second handshake)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tls_files.cert, tls_files.key)
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                raw, _ = listener.accept()
                accepted.append(raw)
                connection = server.wrap_socket(raw, server_side=True)
                while connection.recv(4096).endswith(b"\r\n\r\n"):
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    threading.Thread(target=serve, daemon=True).start()
    url = f"https://127.0.0.1:{listener.getsockname()[1]}/blob"
    transport = ThreadedTransport(client_context(tls_files.ca), max_per_host=1)
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            await transport.connect_ahead(url, 5)
            await trio.sleep(0.2)  # the tickets are in
            for _ in range(2):
                assert (await client.get(url)).content == b"ok"
            assert len(accepted) == 1
    finally:
        listener.close()
        for raw in accepted:
            raw.close()


async def test_requests_sent_while_connections_open_ahead_wait_for_them(
    tls_files: TlsFiles,
) -> None:
    """Connections opened ahead are opened in parallel, as many as asked; requests sent
    while they are still opening (TLS costs round trips) take them as they come rather
    than open their own; and a host that refuses fails the call, holding no slot."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tls_files.cert, tls_files.key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []

    def answer(raw: socket.socket) -> None:
        with contextlib.suppress(OSError):
            time.sleep(0.3)  # a long link's handshake
            connection = server.wrap_socket(raw, server_side=True)
            while connection.recv(4096).endswith(b"\r\n\r\n"):
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                raw, _ = listener.accept()
                accepted.append(raw)
                threading.Thread(target=answer, args=(raw,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    url = f"https://127.0.0.1:{listener.getsockname()[1]}/blob"
    transport = ThreadedTransport(client_context(tls_files.ca), max_per_host=8)
    answers: list[bytes] = []
    try:
        async with httpx.AsyncClient(transport=transport) as client:

            async def get() -> None:
                answers.append((await client.get(url)).content)

            started = time.monotonic()
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(transport.connect_ahead, url, 5, 3)
                    await trio.sleep(0.05)  # on their way
                    for _ in range(3):
                        nursery.start_soon(get)
            assert answers == [b"ok"] * 3
            assert len(accepted) == 3  # one handshake each, in parallel:
            assert time.monotonic() - started < 0.55  # not one after another
            await transport.connect_ahead(url, 5, 3)  # it has them already
            assert len(accepted) == 3 and transport.idle_connections(url) == 3
            with pytest.raises(httpx.ConnectError, match="ConnectionRefusedError"):
                await transport.connect_ahead("https://127.0.0.1:9/nothing", 5, 2)
            refused = transport._pools[("https", "127.0.0.1", 9)]
            assert refused.in_use == 0 and refused.connecting_ahead == 0
    finally:
        listener.close()
        for raw in accepted:
            raw.close()


async def test_ssl_cert_file_is_trusted_as_by_openssl_and_the_sdk(
    tls_emulator: RunningEmulator, tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca))
    async with FilesClient(tls_emulator.url, tls_emulator.api_key, retry=FAST) as client:
        await client.check_auth()


def test_without_settings_the_system_store_is_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """As curl and OpenSSL do: a company CA installed there is trusted too. (Not
    certifi's bundle, which httpx and the SDK trust by default.)"""
    if not (ssl.get_default_verify_paths().cafile or ssl.get_default_verify_paths().capath):
        pytest.skip("this system has no certificate store (certifi's bundle is used)")
    monkeypatch.setattr(certifi, "where", lambda: "/nonexistent/cacert.pem")
    tls._context.cache_clear()
    trusted = {cert["serialNumber"] for cert in client_context().get_ca_certs()}
    system = {cert["serialNumber"] for cert in ssl.create_default_context().get_ca_certs()}
    assert system and system <= trusted  # certificates found in SSL_CERT_DIR join as used


def test_a_trust_that_cannot_be_loaded_says_which_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(TrustError, match=f"cannot read the certificates of --ca-file {missing}"):
        client_context(missing)
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(TrustError, match=r"junk\.pem holds no usable PEM certificate"):
        client_context(tmp_path / "junk.pem")
    monkeypatch.setenv("SSL_CERT_FILE", str(missing))
    with pytest.raises(TrustError, match=f"SSL_CERT_FILE={missing}: No such file"):
        client_context()


async def test_self_signed_certificate_is_made_once_kept_and_served(tmp_path: Path) -> None:
    config = emulator_config(tmp_path, tls=True)
    async with trio.open_nursery() as nursery:
        running = await start_emulator(nursery, config)
        cert, key = self_signed_paths(running.data_dir)
        assert running.url.startswith("https://")
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        async with FilesClient(running.url, running.api_key, retry=FAST, ca_file=cert) as client:
            await client.check_auth()
        nursery.cancel_scope.cancel()
    made = cert.read_bytes()
    assert ensure_self_signed(running.data_dir, "127.0.0.1")[0].read_bytes() == made
    # Another host served: a certificate that names it.
    ensure_self_signed(running.data_dir, "emulator.test")
    assert cert.read_bytes() != made
    names = x509.load_pem_x509_certificate(cert.read_bytes()).extensions
    alt_names = names.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "emulator.test" in alt_names.get_values_for_type(x509.DNSName)


def test_official_sdk_works_over_tls_with_ssl_cert_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with emulator_process_with(tmp_path, "--tls") as running:
        cert = self_signed_paths(running.data_dir)[0]
        assert running.url.startswith("https://")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        sdk = Mistral(api_key=running.api_key, server_url=running.url)
        uploaded = sdk.files.upload(
            file={"file_name": "a.jsonl", "content": b'{"x": 1}\n'}, purpose="batch"
        )
        assert [f.id for f in sdk.files.list().data] == [uploaded.id]
        url = sdk.files.get_signed_url(file_id=uploaded.id).url
        assert url.startswith("https://")
        context = ssl.create_default_context(cafile=cert)
        assert httpx.get(url, verify=context).content == b'{"x": 1}\n'
        emulator_log = (tmp_path / "emulator.log").read_text()
        assert f"trust it with --ca-file {cert.resolve()}" in emulator_log


def test_emulator_refuses_a_certificate_it_cannot_serve_in_one_line(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "mistralfs", "emulator", "--port", "0"]
    base += ["--data", str(tmp_path / "emu")]
    for extra, said in (
        (["--tls-cert", str(tmp_path / "none.pem")], "cannot read the TLS certificate or key"),
        (["--tls-key", str(tmp_path / "key.pem")], "--tls-key needs --tls-cert"),
    ):
        result = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and said in result.stderr, result.stderr


# ---------------------------------------------------------------- real mounts


@pytest.fixture
def tls_emulator_process(tls_files: TlsFiles, tmp_path: Path) -> Iterator[RunningEmulator]:
    with emulator_process_with(
        tmp_path, "--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.key)
    ) as running:
        yield running


@pytest.mark.fuse
def test_mount_over_tls_reads_and_writes(
    tls_emulator_process: RunningEmulator, tls_files: TlsFiles, tmp_path: Path
) -> None:
    """Trusted through the `-o ca_file=` form (the daemon is handed it as --ca-file):
    a file read through its signed URL in ranges, a file written by `cp`."""
    emulator = tls_emulator_process
    context = ssl.create_default_context(cafile=tls_files.ca)
    headers = {"Authorization": f"Bearer {emulator.api_key}"}
    data = os.urandom(3 * MiB + 11)
    with httpx.Client(base_url=emulator.url, headers=headers, verify=context) as http:
        http.post(
            "/v1/files", files={"file": ("in.bin", data)}, data={"purpose": "batch"}
        ).raise_for_status()
        (tmp_path / "out.bin").write_bytes(data[::-1])
        with mount(emulator, tmp_path, "-o", f"ca_file={tls_files.ca}") as mounted:
            assert (mounted / "batch" / "in.bin").read_bytes() == data
            subprocess.run(["cp", str(tmp_path / "out.bin"), str(mounted / "batch")], check=True)
            stored = {f["filename"]: f["id"] for f in http.get("/v1/files").json()["data"]}
            content = http.get(f"/v1/files/{stored['out.bin']}/content").content
        assert sha256_of(tmp_path / "out.bin") == hashlib.sha256(content).hexdigest()
        paths = [r["path"] for r in http.get("/v1/_emulator/requests").json()["requests"]]
    assert any(p.startswith("/storage/") for p in paths)  # ranges through the signed URL


@pytest.mark.fuse
def test_mount_refuses_an_untrusted_certificate_in_one_line(
    tls_emulator_process: RunningEmulator, tmp_path: Path
) -> None:
    command, env, mounted = mount_command(tls_emulator_process, tmp_path)
    env.pop("SSL_CERT_FILE", None)
    env.pop("SSL_CERT_DIR", None)
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 15
    assert result.returncode == 1
    assert result.stderr == (
        f"mistralfs: cannot use the server at {tls_emulator_process.url}: certificate verify "
        "failed: unable to get local issuer certificate (use --ca-file)\n"
    )
    assert not is_mounted(mounted.path)


@pytest.mark.fuse
def test_mount_refuses_a_missing_ca_file_in_one_line(tmp_path: Path) -> None:
    nowhere = RunningEmulator(
        url="https://127.0.0.1:9",
        api_key="k",
        data_dir=tmp_path,
        config=None,  # type: ignore[arg-type]
    )
    missing = tmp_path / "missing.pem"
    for extra in (["--ca-file", str(missing)], ["-o", f"ca_file={missing}"]):
        command, env, mounted = mount_command(nowhere, tmp_path, *extra)
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert result.stderr == (
            f"mistralfs: cannot read the certificates of --ca-file {missing}: "
            "No such file or directory\n"
        )
        assert not is_mounted(mounted.path)
