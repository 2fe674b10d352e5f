"""One upload body, sent several ways through a shaped link to the emulator: time and cores.

    .venv/bin/python bench/upload_probe.py [--size 64] [--link rtt=30ms,rate=60MB/s]
        [--plain] [--reps 2] [VARIANT ...]

A variant is ``FRAMING-SENDS``: framing ``cl`` (a Content-Length body, as curl and the
SDK send) or ``chunk`` (chunked, 1 MiB chunks, as the mount's growing upload); sends
``sendfile`` (``socket.sendfile``, which on an ``ssl.SSLSocket`` falls back to 8 KiB
``send`` calls: 8 KiB TLS records) or a block size (``8k``, ``16k``, ``256k``, ``1m``:
``pread`` and ``sendall`` of that many bytes; TLS cuts records of at most 16 KiB).
Default: ``cl-1m chunk-sendfile chunk-1m cl-8k``.

It starts its own emulator (HTTPS with a certificate made by ``openssl``, unless
``--plain``) and one ``mfsbench/link.py`` in front of it, sends each variant with http.client,
and prints one JSON line per upload: the wall time, when the body was all handed to
the socket, how long the answer took after that, and the CPU seconds of the emulator,
the proxy and this process. The emulator's CPU seconds per body are the number that
says what a way of sending costs the server; the wall time says whether it set the pace.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mfsbench.procs import cpu_seconds, start_announced

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
KEY = "probe-key-" + "k" * 22
BLOCKS = {"sendfile": 0, "8k": 8 << 10, "16k": 16 << 10, "256k": 256 << 10, "1m": MiB}
CHUNK = MiB


def send(
    variant: str, port: int, tls: ssl.SSLContext | None, src: Path, pids: list[int]
) -> dict[str, object]:
    framing, _, sends = variant.partition("-")
    if framing not in ("cl", "chunk") or sends not in BLOCKS:
        raise SystemExit(f"unknown variant {variant!r}")
    block = BLOCKS[sends]
    size = src.stat().st_size
    boundary = secrets.token_hex(16)
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="p.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    before = [cpu_seconds(pid) for pid in pids] + [time.process_time()]
    t0 = time.perf_counter()
    conn = (
        http.client.HTTPSConnection("127.0.0.1", port, context=tls, timeout=600)
        if tls
        else http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    )
    conn.putrequest("POST", "/v1/files")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
    if framing == "cl":
        conn.putheader("Content-Length", str(len(head) + size + len(tail)))
    else:
        conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    sock = conn.sock
    with open(src, "rb") as f:

        def body(offset: int, n: int) -> None:
            if not block:
                sock.sendfile(f, offset, n)
                return
            end = offset + n
            while offset < end:
                m = min(block, end - offset)
                sock.sendall(os.pread(f.fileno(), m, offset))
                offset += m

        chunked = framing == "chunk"
        conn.send(b"%X\r\n%b\r\n" % (len(head), head) if chunked else head)
        for offset in range(0, size, CHUNK):
            n = min(CHUNK, size - offset)
            if chunked:
                conn.send(b"%X\r\n" % n)
            body(offset, n)
            if chunked:
                conn.send(b"\r\n")
        conn.send(b"%X\r\n%b\r\n0\r\n\r\n" % (len(tail), tail) if chunked else tail)
    sent = time.perf_counter()
    answer = conn.getresponse()
    answer.read()
    done = time.perf_counter()
    conn.close()
    after = [cpu_seconds(pid) for pid in pids] + [time.process_time()]
    used = [round(a - b, 2) for a, b in zip(after, before, strict=True)]
    return {
        "variant": variant,
        "status": answer.status,
        "wall_s": round(done - t0, 2),
        "sent_s": round(sent - t0, 2),
        "answer_after_sent_s": round(done - sent, 3),
        "emulator_cpu_s": used[0],
        "proxy_cpu_s": used[1],
        "client_cpu_s": used[2],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "variants", nargs="*", default=["cl-1m", "chunk-sendfile", "chunk-1m", "cl-8k"]
    )
    parser.add_argument("--size", type=int, default=64, help="MiB (default 64)")
    parser.add_argument("--link", default="rtt=30ms,rate=60MB/s")
    parser.add_argument("--plain", action="store_true", help="HTTP, not HTTPS")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args(argv)
    for variant in args.variants:
        framing, _, sends = variant.partition("-")
        if framing not in ("cl", "chunk") or sends not in BLOCKS:
            parser.error(f"unknown variant {variant!r}")
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="mistralfs-upload-probe-") as tmp:
        work = Path(tmp)
        src = work / "src.bin"
        with open(src, "wb") as f:
            for _ in range(0, args.size * MiB, 4 * MiB):
                f.write(os.urandom(4 * MiB))
        cmd = [sys.executable, "-m", "mistralfs", "emulator", "--port", "0"]
        cmd += ["--data", str(work / "data"), "--api-key", KEY, "--max-file-size", "2G"]
        cmd += ["--log-level", "warning"]
        tls = None
        if not args.plain:
            cert, key = work / "cert.pem", work / "key.pem"
            openssl = ["openssl", "req", "-x509", "-newkey", "ec"]
            openssl += ["-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"]
            openssl += ["-subj", "/CN=probe", "-addext", "subjectAltName=IP:127.0.0.1"]
            openssl += ["-keyout", str(key), "-out", str(cert)]
            subprocess.run(openssl, check=True, capture_output=True)
            cmd += ["--tls-cert", str(cert), "--tls-key", str(key)]
            tls = ssl.create_default_context(cafile=str(cert))
        try:
            url = start_announced(
                cmd, work / "emulator.log", "mistralfs emulator listening on", procs
            )
            link = [
                sys.executable,
                str(ROOT / "bench" / "mfsbench" / "link.py"),
                "--link",
                args.link,
            ]
            link += ["--upstream", f"127.0.0.1:{url.rsplit(':', 1)[1]}"]
            address = start_announced(link, work / "link.log", "link listening on", procs)
            port = int(address.split()[0].rsplit(":", 1)[1])
            for _ in range(args.reps):
                for variant in args.variants:
                    result = send(variant, port, tls, src, [p.pid for p in procs])
                    print(json.dumps(result), flush=True)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
