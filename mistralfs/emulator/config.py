"""The emulator's settings: where it keeps its files, the key it accepts, where it
listens and how (plain HTTP or TLS), and what faults it plays."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

from mistralfs.emulator.faults import RandomPlan
from mistralfs.emulator.tls import ensure_self_signed, server_context_check
from mistralfs.files_api import EXPIRY_UNIT_SECONDS


@dataclass
class EmulatorConfig:
    """Where the emulator keeps its files, the key it accepts, and where it listens.

    ``faults`` turns on seeded random faults from the start: a parsed plan or a
    SPEC string (see :mod:`mistralfs.emulator.faults`).

    ``storage_url`` (e.g. ``http://127.0.0.1:8081/blobs``) makes signed URLs point
    at ``<storage_url>/<id>?se=..&sp=r&sig=..`` instead of the emulator's own
    ``/storage/`` route, as the service points at Azure Blob Storage: a static
    server over ``data_dir/blobs`` then serves content.

    ``tls_cert`` (and ``tls_key``, unless the key is in the same PEM file) serve HTTPS;
    ``tls`` serves HTTPS with a self-signed certificate kept in ``data_dir/tls/``
    (see :mod:`mistralfs.emulator.tls`). Signed URLs are then https:// too.
    """

    data_dir: pathlib.Path
    api_key: str
    host: str = "127.0.0.1"
    port: int = 8080
    max_file_size: int = 512 * 1024 * 1024
    faults: RandomPlan | str | None = None
    storage_url: str | None = None
    tls: bool = False
    tls_cert: pathlib.Path | None = None
    tls_key: pathlib.Path | None = None
    # Seconds in one unit of an upload's `expiry` (undocumented; hours, see upload_params.py).
    expiry_unit: int = EXPIRY_UNIT_SECONDS
    # Seconds a batch job takes from QUEUED to done (half queued, half running).
    batch_delay: float = 2.0

    def tls_files(self) -> tuple[pathlib.Path, pathlib.Path | None] | None:
        """The certificate and key to serve HTTPS with (made for ``tls``), checked
        loadable; None for plain HTTP. Raises TlsSetupError with one line."""
        if self.tls_cert is None and not self.tls:
            return None
        if self.tls_cert is None:
            return ensure_self_signed(self.data_dir, self.host)
        server_context_check(self.tls_cert, self.tls_key)
        return self.tls_cert, self.tls_key
