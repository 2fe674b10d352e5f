"""Open files of `mistral://`: read through fsspec's block cache, written whole at close.

Reading: fsspec's cache (`cache_type`, "readahead" by default: each read fetches a
block ahead) asks for ranges, read by the file id the file was opened on. Writing: the
bytes go to a local spool file, uploaded once when the file is closed, with its
folder's purpose; a file left by an exception inside `with` is not uploaded.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from fsspec.spec import AbstractBufferedFile

if TYPE_CHECKING:
    from mistralfs.pyfs.filesystem import MistralFileSystem


class MistralFile(AbstractBufferedFile):
    """One open file; `details` (read mode) is the entry it was opened on."""

    fs: MistralFileSystem

    def __init__(
        self,
        fs: MistralFileSystem,
        path: str,
        mode: str = "rb",
        *,
        details: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        size = details["size"] if details is not None else None
        super().__init__(fs, path, mode, size=size, **kwargs)
        if details is not None:
            self.details = details
        self._spool: IO[bytes] | None = None

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self.fs.read_block_of(self.details, start, end)

    def _initiate_upload(self) -> None:
        self._spool = tempfile.NamedTemporaryFile(prefix="mistralfs-", delete=False)  # noqa: SIM115

    def _upload_chunk(self, final: bool = False) -> bool:
        """Spool what was written; at close, upload the whole file once."""
        assert self._spool is not None
        self._spool.write(self.buffer.getbuffer())
        if final:
            self._spool.close()
            try:
                self.fs.upload_file(
                    Path(self._spool.name),
                    self.path,
                    "create" if self.mode == "xb" else "overwrite",
                )
            finally:
                self._drop_spool()
        return True

    def _drop_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()
            os.unlink(self._spool.name)
            self._spool = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and self.writable():
            # What was written up to an exception is not what the program meant to store.
            self._drop_spool()
            self.closed = True
            return
        self.close()
