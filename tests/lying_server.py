"""The lying server: the real emulator, with one switch per lie.

Every route behaves genuinely until a switch is thrown; then only that lie is told
(see mistralfs/emulator/lies.py). Works with the in-process ``emulator`` fixture (call
the switches through ``trio.to_thread.run_sync``) and with ``emulator_process`` (for
real mounts) alike.
"""

from __future__ import annotations

from typing import Any

from conftest import RunningEmulator
from emulator_admin import clear_faults, set_faults

HANG_SECONDS = 3600.0


class LyingServer:
    """Switches on an emulator; each adds a rule that lasts `times` requests (None: for good)."""

    def __init__(self, emulator: RunningEmulator) -> None:
        self.url = emulator.url
        self._key = emulator.api_key

    def _rule(self, **rule: Any) -> None:
        set_faults(self.url, self._key, rule)

    def upload_answers(self, times: int | None = None, **fields: Any) -> None:
        """Uploads are stored, and answered with these fields changed (id, bytes, ...)."""
        self._rule(method="POST", path_prefix="/v1/files", lie={"fields": fields}, times=times)

    def listings_add(self, *records: dict[str, Any], times: int | None = None) -> None:
        """Listings carry these records first."""
        self._rule(method="GET", path_prefix="/v1/files", lie={"records": list(records)},
                   times=times)  # fmt: skip

    def listings_never_end(self, *, with_total: bool = True) -> None:
        """Every listing page is full of new files, and the total (if any) lies ahead."""
        lie = {"endless": True, "total": with_total}
        self._rule(method="GET", path_prefix="/v1/files", lie=lie, times=None)

    def bodies_longer_by(self, extra: int, *, with_length: bool = False) -> None:
        """Content and ranges carry `extra` bytes more than asked (and than Content-Range
        says); with `with_length`, Content-Length counts them too."""
        lie = {"extra_bytes": extra, "length": with_length}
        self._rule(method="GET", path_prefix="/", lie=lie, times=None)

    def never_answers(self, path_prefix: str = "/", method: str | None = None) -> None:
        """Requests are accepted and held for an hour: no answer ever comes."""
        self._rule(method=method, path_prefix=path_prefix, status=None, delay=HANG_SECONDS,
                   times=None)  # fmt: skip

    def tell_the_truth(self) -> None:
        """Every switch off."""
        clear_faults(self.url, self._key)
