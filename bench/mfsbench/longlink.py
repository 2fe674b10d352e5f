"""The long-link cases (issue 15's rows: R1/M1, R3, R4, L1, W1, W2) over one link, for
four sides side by side: mistralfs, rclone mount tuned for high latency, one curl
process (one connection) and a loop over the official SDK. A row's ratio is mistralfs
against the peer its target names; the one-request-after-another loops run once."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from .case import Case, measure, timed
from .common import KEY, MiB, log, parse_mib
from .linkenv import LinkBench
from .loopback import DD, w2_sources
from .procs import peak_rss, settle_memory
from .report import proxy_note, summary

# rclone's docs for high-latency links: many streams of large chunks per file.
RCLONE_TUNED = ["--vfs-read-chunk-streams", "16", "--vfs-read-chunk-size", "4M"]
# R3 is bimodal for rclone: its GET reuses the connection of the listing's HEADs, or it
# does not and pays the TCP and TLS handshakes (58 ms or 214 ms at 30 ms RTT, in one run).
# A median of 3 flips between the two; each sample is a mount and ~1 s.
R3_MIN_REPS = 7
LOOPS = frozenset({"rclone", "curl", "sdk"})  # one request after another: seconds each
Sides = dict[str, Callable[[], float]]


class LinkRows:
    """The rows over the link ``b`` is behind, each side a function giving one sample."""

    def __init__(self, b: LinkBench) -> None:
        self.b = b
        self.reps = b.sizes.reps
        self.big_mib = b.sizes.big / MiB
        self.signed = b.signed_url(b.ids["big"][0])
        self.auth = ["-H", f"Authorization: Bearer {KEY}"]
        self.upload = [*b.curl(), *self.auth, "-o", "/dev/null", "-F", "purpose=batch"]

    def mount(self, mfs: bool) -> AbstractContextManager[tuple[Path, int]]:
        """A fresh mount: mistralfs, or rclone tuned for the link."""
        return self.b.mount("mfs" if mfs else "rclone", "off", *RCLONE_TUNED)

    def all(self) -> list[Case]:
        return [*self.r1_m1(), self.r3(), *self.r4(), self.l1(), self.w1(), self.w2()]

    def r1_m1(self) -> list[Case]:
        """Cold sequential read, and the daemon's peak RSS meanwhile."""
        b, big_mib = self.b, self.big_mib
        title = f"cold sequential read {big_mib:.0f} MiB"
        r1 = Case("R1", title, "MiB/s", "rclone tuned", ">= 1.0x")
        limit = parse_mib(b.cache_size) + 80
        m1 = Case("M1", "peak RSS during R1", "MiB", "rclone", f"<= {limit:.0f} MiB", limit=limit)
        m1.extra["rclone"] = []

        def read_mount(mfs: bool) -> float:
            side = "mfs" if mfs else "rclone"
            with self.mount(mfs) as (mnt, pid):
                path = b.files(mnt, side, "big")[0]
                os.stat(path)  # the read alone, not the first listing
                with b.proxy_load(r1, side, daemon=pid):
                    t = timed([*DD, f"if={path}"])
                (m1.mfs if mfs else m1.extra["rclone"]).append(peak_rss(pid))
            return big_mib / t

        def sdk_download() -> float:
            t0 = time.perf_counter()
            with b.proxy_load(r1, "sdk"), b.sdk() as sdk:
                answer = sdk.files.download(file_id=b.ids["big"][0])
                try:
                    for _ in answer.iter_bytes(MiB):
                        pass
                finally:
                    answer.close()
            return big_mib / (time.perf_counter() - t0)

        def curl_read() -> float:
            with b.proxy_load(r1, "curl"):
                return big_mib / timed([*b.curl(), "-o", "/dev/null", self.signed])

        sides: Sides = {
            "mfs": lambda: read_mount(True),
            "rclone": lambda: read_mount(False),
            "curl": curl_read,
            "sdk": sdk_download,
        }
        measure(r1, sides, self.reps)
        m1.peer = m1.extra["rclone"]
        log(f"R1: {summary(r1)}; M1 {m1.median('mfs'):.0f} MiB; {proxy_note(r1)}")
        return [r1, m1]

    def r3(self) -> Case:
        """First 4 KiB of the big file, on a fresh mount, after an ls -l of its folder."""
        b = self.b
        r3 = Case("R3", "first 4 KiB after ls -l", "s", "rclone tuned", "<= 1.0x")

        def head_mount(mfs: bool) -> float:
            side = "mfs" if mfs else "rclone"
            with self.mount(mfs) as (mnt, _):
                folder = b.folder(mnt, side, "big")
                subprocess.run(["ls", "-l", str(folder)], check=True, stdout=subprocess.DEVNULL)
                return timed(["head", "-c", "4096", str(b.files(mnt, side, "big")[0])])

        sides: Sides = {
            "mfs": lambda: head_mount(True),
            "rclone": lambda: head_mount(False),
            "curl": lambda: timed([*b.curl(), "-o", "/dev/null", "-r", "0-4095", self.signed]),
        }
        measure(r3, sides, max(self.reps, R3_MIN_REPS))
        log(f"R3: {summary(r3)}")
        return r3

    def r4(self) -> list[Case]:
        """cat of the small files, cold: against the SDK loop (R4) and rclone (R4r)."""
        b = self.b
        n = len(b.ids["small"])
        r4 = Case("R4", f"cat {n} small files, cold", "s", "sdk loop", "<= 0.1x")
        content_urls = [f"{b.client_url}/v1/files/{i}/content" for i in b.ids["small"]]

        def cat_mount(mfs: bool) -> float:
            side = "mfs" if mfs else "rclone"
            with self.mount(mfs) as (mnt, _):
                return timed(["cat", *map(str, b.files(mnt, side, "small"))])

        def sdk_cat() -> float:
            t0 = time.perf_counter()
            with b.sdk() as sdk:
                listed = sdk.files.list(purpose="bench-small", page_size=1000).data
                for record in listed:
                    answer = sdk.files.download(file_id=record.id)
                    answer.read()
                    answer.close()
            if len(listed) != n:
                raise RuntimeError(f"the SDK listed {len(listed)} small files, not {n}")
            return time.perf_counter() - t0

        sides: Sides = {
            "mfs": lambda: cat_mount(True),
            "rclone": lambda: cat_mount(False),
            "curl": lambda: timed([*b.curl(), *self.auth, *content_urls]),
            "sdk": sdk_cat,
        }
        measure(r4, sides, self.reps, once=LOOPS)
        r4_rclone = Case(r4.key + "r", r4.title, "s", "rclone tuned", "<= 0.2x")
        r4_rclone.mfs, r4_rclone.extra = r4.mfs, r4.extra
        r4_rclone.peer = r4.extra["rclone"]
        log(f"R4: {summary(r4)}")
        return [r4, r4_rclone]

    def l1(self) -> Case:
        """ls -l of the small files' folder, cold."""
        b = self.b
        l1 = Case("L1", f"ls -l {len(b.ids['small'])} files, cold", "s", "rclone tuned", "<= 0.5x")

        def ls_mount(mfs: bool) -> float:
            side = "mfs" if mfs else "rclone"
            with self.mount(mfs) as (mnt, _):
                return timed(["ls", "-l", str(b.folder(mnt, side, "small"))])

        def sdk_list() -> float:
            t0 = time.perf_counter()
            with b.sdk() as sdk:
                sdk.files.list(purpose="bench-small", page_size=1000)
            return time.perf_counter() - t0

        list_url = f"{b.client_url}/v1/files?purpose=bench-small&page_size=1000"
        sides: Sides = {
            "mfs": lambda: ls_mount(True),
            "rclone": lambda: ls_mount(False),
            "curl": lambda: timed([*b.curl(), *self.auth, "-o", "/dev/null", list_url]),
            "sdk": sdk_list,
        }
        measure(l1, sides, self.reps)
        log(f"L1: {summary(l1)}")
        return l1

    def sdk_upload(self, paths: list[Path]) -> float:
        """Seconds for the SDK to upload ``paths`` to batch/, one after another."""
        t0 = time.perf_counter()
        with self.b.sdk() as sdk:
            for path in paths:
                with open(path, "rb") as f:
                    sdk.files.upload(file={"file_name": path.name, "content": f}, purpose="batch")
        return time.perf_counter() - t0

    def w1(self) -> Case:
        """cp of the big file into the mount, against curl -F and the SDK's upload."""
        b = self.b
        w1 = Case("W1", f"cp {self.big_mib:.0f} MiB", "s", "curl -F", "<= 1.05x")

        # Each side writes into memory just freed, as on loopback (procs.settle_memory):
        # the emulator, near a core of its own here, is slowed by new pages.
        def cp_big() -> float:
            with b.mistralfs() as (mnt, pid):
                settle_memory(b.src_big)
                with b.proxy_load(w1, "mfs", daemon=pid):
                    return timed(["cp", str(b.src_big), str(mnt / "batch" / "w1.bin")])

        def curl_upload() -> float:
            settle_memory(b.src_big)
            with b.proxy_load(w1, "curl"):
                return timed([*self.upload, "-F", f"file=@{b.src_big}", f"{b.client_url}/v1/files"])

        def sdk_upload_big() -> float:
            settle_memory(b.src_big)
            with b.proxy_load(w1, "sdk"):
                return self.sdk_upload([b.src_big])

        sides: Sides = {"mfs": cp_big, "curl": curl_upload, "sdk": sdk_upload_big}
        measure(w1, self.then_clean(sides), self.reps)
        log(f"W1: {summary(w1)}; {proxy_note(w1)}")
        return w1

    def w2(self) -> Case:
        """cp of many 64 KiB files, against an SDK upload loop and one curl chaining them."""
        b = self.b
        files = w2_sources(b)
        w2 = Case("W2", f"cp {len(files)} x 64 KiB", "s", "sdk loop", "<= 1.0x")

        def cp_many() -> float:
            with b.mistralfs() as (mnt, _):
                os.listdir(mnt / "batch")  # the folder is listed before, as by a shell
                return timed(["cp", *map(str, files), str(mnt / "batch")])

        chained: list[str] = []
        for path in files:  # one curl, one connection: --next per upload
            chained += [*(["--next"] if chained else []), *self.upload, "-F", f"file=@{path}"]
            chained.append(f"{b.client_url}/v1/files")
        sides: Sides = {
            "mfs": cp_many,
            "curl": lambda: timed(chained),
            "sdk": lambda: self.sdk_upload(files),
        }
        measure(w2, self.then_clean(sides), self.reps, once=LOOPS)
        log(f"W2: {summary(w2)}")
        return w2

    def then_clean(self, sides: Sides) -> Sides:
        """Each side's uploads are deleted after it, so that every upload is to a batch/
        that holds what it held before."""

        def cleaned(f: Callable[[], float]) -> Callable[[], float]:
            def run() -> float:
                try:
                    return f()
                finally:
                    self.b.delete_purpose("batch")

            return run

        return {side: cleaned(f) for side, f in sides.items()}


def run_link_cases(b: LinkBench) -> list[Case]:
    """The issue's rows over the link ``b`` is behind now."""
    return LinkRows(b).all()
