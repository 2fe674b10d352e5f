"""Which certificates every client path trusts: one SSLContext, verification never off.

The client's transport (transport.py) and the httpx transports it hands proxied
requests to are given the same context, so a server trusted by one is trusted by the
other. What it trusts, first that applies:

- `--ca-file FILE` (PEM): those certificate authorities only, as curl's `--cacert`;
- `SSL_CERT_FILE` and/or `SSL_CERT_DIR`, the variables OpenSSL, httpx and the official
  SDK read;
- the system's store (Debian's `/etc/ssl/certs`), so that a company's own CA installed
  there is trusted as curl trusts it; certifi's bundle only where the system has none.

Loading a bundle costs tens of milliseconds: each trust is loaded once per process.
"""

from __future__ import annotations

import functools
import os
import ssl
from pathlib import Path


class TrustError(Exception):
    """The certificates to trust cannot be loaded; the message says from where and why."""


def client_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """The context every connection of a client uses, for `ca_file` or else as above.

    Raises TrustError when `ca_file` or SSL_CERT_FILE cannot be read or holds no
    certificate, so that a mount refuses at once rather than at its first request.
    """
    return _context(
        ca_file, os.environ.get("SSL_CERT_FILE") or None, os.environ.get("SSL_CERT_DIR") or None
    )


@functools.cache
def _context(ca_file: Path | None, env_file: str | None, env_dir: str | None) -> ssl.SSLContext:
    if ca_file is not None:
        return _load(f"--ca-file {ca_file}", cafile=str(ca_file))
    if env_file or env_dir:
        where = " and ".join(
            f"{name}={value}"
            for name, value in (("SSL_CERT_FILE", env_file), ("SSL_CERT_DIR", env_dir))
            if value
        )
        return _load(where, cafile=env_file, capath=env_dir)
    paths = ssl.get_default_verify_paths()  # None for a file or folder that is not there
    if paths.cafile or paths.capath:
        return ssl.create_default_context()
    import certifi  # httpx's own dependency

    return _load("certifi's bundle", cafile=certifi.where())


def _load(where: str, *, cafile: str | None = None, capath: str | None = None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    except ssl.SSLError as exc:  # an OSError too: first
        raise TrustError(f"{where} holds no usable PEM certificate ({exc.reason})") from None
    except OSError as exc:
        raise TrustError(f"cannot read the certificates of {where}: {exc.strerror}") from None


def verify_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate check that failed under a transport error, if that was the cause.

    httpx wraps it twice (httpcore, trio), and the client's transport raises an httpx
    error in its place: the cause is found along the chain of causes and contexts.
    """
    seen: set[int] = set()
    found: BaseException | None = exc
    while found is not None and id(found) not in seen:
        if isinstance(found, ssl.SSLCertVerificationError):
            return found
        seen.add(id(found))
        found = found.__cause__ or found.__context__
    return None
