"""HMAC-signed storage URLs, standing in for Azure Blob SAS URLs.

A URL looks like ``<base>/storage/<file_id>?se=<unix expiry>&sp=r&sig=<hex>``
with ``sig = HMAC-SHA256(secret, f"{path}\\n{se}")``. The storage route checks
it without any Authorization header, as blob storage does; the secret lives
in the data dir so URLs survive restarts of the emulator.

With a ``storage_base`` (the emulator's ``--storage-url``) the URL is
``<storage_base>/<file_id>?se=..&sp=r&sig=..`` instead, as the real service points
at Azure Blob Storage: another server (e.g. nginx over ``DATA/blobs``) serves it.
The query is the very one the emulator's own route would get, signed over
``/storage/<file_id>``, so swapping the base for ``<emulator>/storage`` still verifies.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlencode

STORAGE_PREFIX = "/storage/"


def storage_path(file_id: str) -> str:
    """The path part of a file's storage URL."""
    return f"{STORAGE_PREFIX}{file_id}"


def sign(secret: bytes, path: str, se: int | str) -> str:
    """Signature of ``path`` valid until unix time ``se``."""
    return hmac.new(secret, f"{path}\n{se}".encode(), hashlib.sha256).hexdigest()


def signed_url(
    base_url: str,
    secret: bytes,
    file_id: str,
    expires_at: int,
    storage_base: str | None = None,
) -> str:
    """A complete URL on ``base_url`` (e.g. ``http://127.0.0.1:8080``) readable until expiry.

    With ``storage_base`` the URL is ``<storage_base>/<file_id>?<same query>`` instead.
    """
    path = storage_path(file_id)
    query = urlencode({"se": expires_at, "sp": "r", "sig": sign(secret, path, expires_at)})
    if storage_base:
        return f"{storage_base.rstrip('/')}/{file_id}?{query}"
    return f"{base_url.rstrip('/')}{path}?{query}"


def check(
    secret: bytes, path: str, se: str | None, sig: str | None, now: float | None = None
) -> str:
    """Why a storage request is refused, or ``""`` when it is allowed.

    Constant-time comparison; an unparsable or past ``se`` is refused.
    """
    if not se or not sig:
        return "Signature fields not well formed."
    expected = sign(secret, path, se)
    if not hmac.compare_digest(expected.encode(), sig.encode()):
        return "Signature did not match."
    try:
        expiry = int(se)
    except ValueError:
        return "Signature fields not well formed."
    if (time.time() if now is None else now) > expiry:
        return f"Signed expiry time [{expiry}] must be after current time."
    return ""
