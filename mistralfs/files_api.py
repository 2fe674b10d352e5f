"""What the Files API's File object holds, field by field, as its spec says: shared by
the client (api/models.py), the emulator (emulator/storage.py) and the mount's xattrs
(fs/filesystem.py), so that a field added to the service is added in one place."""

from __future__ import annotations

FILE_FIELDS = (
    "id",
    "bytes",
    "created_at",
    "filename",
    "purpose",
    "sample_type",
    "source",
    "num_lines",
    "mimetype",
    "signature",
)
# Shown as a file's size and name, not as extended attributes.
SHOWN_BY_STAT = ("bytes", "filename")
