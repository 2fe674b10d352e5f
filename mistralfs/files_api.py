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
    # Newer, optional and nullable (SDK 3.7; see shared/API-NOTES.md): unix seconds after
    # which the service no longer holds the file, and who may see it (workspace | user).
    "expires_at",
    "visibility",
)
# Sources whose files the service serves but lets no one delete or replace (a
# repository's; see shared/API-NOTES.md and docs/EMULATOR.md): the mount shows them
# read-only.
UNCHANGEABLE_SOURCES = frozenset({"repository"})
# Who may see a file (upload parameter and field `visibility`); the first is the default.
VISIBILITIES = ("workspace", "user")
# The unit of the upload parameter `expiry`, which the service does not document: hours,
# as for signed URLs (API-NOTES.md). The one place to change it, for mount and emulator.
EXPIRY_UNIT_SECONDS = 3600
# Shown as a file's size and name, not as extended attributes.
SHOWN_BY_STAT = ("bytes", "filename")
