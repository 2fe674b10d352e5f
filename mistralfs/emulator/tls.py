"""HTTPS for the emulator: the certificate and key it serves with, checked before serving.

`--tls` makes a self-signed certificate once, in `DATA/tls/cert.pem` (with its key in
`DATA/tls/key.pem`, 0600), and serves it on every later start, so that a client told to
trust that file (`mistralfs mount --ca-file`, `SSL_CERT_FILE`) keeps trusting it. It is
made again only when it expires within a day or does not name the host served.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
from pathlib import Path

from mistralfs.private import private_folder, write_private_file
from mistralfs.usage import ConfigError

log = logging.getLogger("mistralfs.emulator")

VALID_DAYS = 825
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("", "0.0.0.0", "::")


class TlsSetupError(Exception):
    """The certificate or key cannot be used; the message is the one line shown."""


def self_signed_paths(data_dir: Path) -> tuple[Path, Path]:
    """Where `--tls` keeps its certificate (the file clients trust) and key."""
    return data_dir / "tls" / "cert.pem", data_dir / "tls" / "key.pem"


def ensure_self_signed(data_dir: Path, host: str) -> tuple[Path, Path]:
    """The self-signed certificate and key for `host`, made if missing, expiring or for
    another host."""
    cert_path, key_path = self_signed_paths(data_dir)
    names = _names_for(host)
    if key_path.exists() and _still_good(cert_path, names):
        return cert_path, key_path
    try:
        private_folder(cert_path.parent, "emulator TLS folder")
    except ConfigError as exc:
        raise TlsSetupError(str(exc)) from None
    cert_pem, key_pem = _make_self_signed(names)
    write_private_file(key_path, key_pem)
    write_private_file(cert_path, cert_pem)
    log.info("made a self-signed certificate for %s in %s", ", ".join(names), cert_path)
    return cert_path, key_path


def server_context_check(cert: Path, key: Path | None) -> None:
    """Load the pair as the server will, so that a bad file is one line, not a traceback."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:  # an OSError too: first
        pair = f"{cert} and {key}" if key else str(cert)
        raise TlsSetupError(f"{pair}: not a PEM certificate and its key ({exc.reason})") from None
    except OSError as exc:
        where = exc.filename or (f"{cert} / {key}" if key else cert)
        raise TlsSetupError(
            f"cannot read the TLS certificate or key {where}: {exc.strerror}"
        ) from None


def _names_for(host: str) -> list[str]:
    host = host.strip("[]")
    extra = [] if host in WILDCARD_HOSTS or host in LOCAL_NAMES else [host]
    return [*LOCAL_NAMES, *extra]


def _still_good(cert_path: Path, names: list[str]) -> bool:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        alt_names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    listed = {str(name) for name in alt_names.get_values_for_type(x509.IPAddress)}
    listed |= set(alt_names.get_values_for_type(x509.DNSName))
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    return cert.not_valid_after_utc > soon and all(_canonical(n) in listed for n in names)


def _canonical(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def _make_self_signed(names: list[str]) -> tuple[str, str]:
    """(certificate, key) in PEM: an EC P-256 key, and a certificate that is its own
    issuer, for server authentication only, valid for `names` (as Python 3.13's strict
    verification wants: key usage, key identifiers)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mistralfs emulator")])
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    usage = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
         "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
        False,
    )  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, **usage), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(key_id, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(key_id), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()
