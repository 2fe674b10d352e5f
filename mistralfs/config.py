"""Mount options from the command line and the environment, and where the API key comes from.

The key is never accepted as a command-line value (it would show in `ps` and shell history):
it comes from `--api-key-file`, `MISTRAL_API_KEY`, or the systemd credential
`mistral-api-key`.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mistralfs import DEFAULT_SERVER_URL
from mistralfs.daemon.state import mount_state_file
from mistralfs.fs.names import DEFAULT_LOCAL_NAMES
from mistralfs.fs.upload_settings import UploadSettings
from mistralfs.usage import ConfigError

__all__ = ["DEFAULT_SERVER_URL", "ConfigError"]

DEFAULT_CACHE_SIZE = 256 * 1024**2
DEFAULT_DIR_CACHE_TIME = 30.0
DEFAULT_BLOCK_SIZE = 1024**2
DEFAULT_RETRY_TIME = 30.0
DEFAULT_STOP_TIMEOUT = 600.0
DEFAULT_DISK_CACHE_SIZE = 10 * 1024**3
MAX_FILE_SIZE = 512 * 1024**2
SYSTEMD_CREDENTIAL = "mistral-api-key"
METRICS_HOST = "127.0.0.1"  # --metrics-address without a host: this machine only

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """Parse `256M`, `1G`, `4096` or `1.5GiB` into bytes (binary units)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(
            f"invalid size {text!r}: use a number with an optional K, M, G or T suffix"
        )
    number, unit, _ = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def parse_local_names(text: str) -> tuple[str, ...]:
    """`--local-names`: globs separated by `/` (which no name holds), replacing the
    default list; the word `default` stands for it, and an empty value means none."""
    patterns: list[str] = []
    for pattern in text.split("/") if text else []:
        if not pattern:
            raise ConfigError(f"empty pattern in --local-names {text!r}: separate globs with one /")
        patterns += DEFAULT_LOCAL_NAMES if pattern == "default" else [pattern]
    return tuple(patterns)


def format_local_names(patterns: tuple[str, ...]) -> str:
    """The `--local-names` value that `parse_local_names` reads back as `patterns`."""
    return "/".join(patterns)


def parse_address(text: str) -> tuple[str, int]:
    """`--metrics-address`: `HOST:PORT`, `[IPv6]:PORT`, or `:PORT` / `PORT` for 127.0.0.1.

    Port 0 lets the system choose one (`status --json` shows which).
    """
    host, colon, port = text.strip().rpartition(":")
    if not colon:
        host, port = "", text.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or int(port) > 65535 or (":" in host and not text.startswith("[")):
        raise ConfigError(
            f"invalid metrics address {text!r}: use HOST:PORT, [IPv6]:PORT or :PORT, "
            "e.g. 127.0.0.1:9464"
        )
    return host or METRICS_HOST, int(port)


def format_address(address: tuple[str, int]) -> str:
    """(host, port) as `parse_address` reads it back, and as URLs write it."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def default_cache_dir() -> Path:
    """systemd's CacheDirectory= when running as a unit, else the XDG cache folder."""
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mistralfs"


def read_api_key(api_key_file: Path | None) -> str:
    """Find the API key: --api-key-file, then MISTRAL_API_KEY, then the systemd credential."""
    if api_key_file is not None:
        try:
            key = api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read API key file {api_key_file}: {exc.strerror}") from exc
        if not key:
            raise ConfigError(f"API key file {api_key_file} is empty")
        if api_key_file.stat().st_mode & 0o077:
            print(
                f"mistralfs: warning: API key file {api_key_file} can be read by others; "
                f"chmod 600 {api_key_file}",
                file=sys.stderr,
            )
        return key
    key = os.environ.get("MISTRAL_API_KEY", "").strip()
    if key:
        return key
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        cred = Path(cred_dir) / SYSTEMD_CREDENTIAL
        if cred.is_file():
            key = cred.read_text(encoding="utf-8").strip()
            if key:
                return key
    raise ConfigError(
        "no API key: set MISTRAL_API_KEY, pass --api-key-file FILE, "
        f"or provide the systemd credential {SYSTEMD_CREDENTIAL!r}"
    )


@dataclass
class MountConfig:
    """Everything a mount needs, resolved and validated."""

    mountpoint: Path
    server_url: str
    api_key: str = field(repr=False)
    cache_dir: Path
    cache_size: int = DEFAULT_CACHE_SIZE
    max_throughput: int | None = None  # bytes/s a sequential reader need not go past
    dir_cache_time: float = DEFAULT_DIR_CACHE_TIME
    block_size: int = DEFAULT_BLOCK_SIZE
    read_only: bool = False
    allow_other: bool = False
    max_file_size: int = MAX_FILE_SIZE
    retry_time: float = DEFAULT_RETRY_TIME
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    disk_cache: Path | None = None
    disk_cache_size: int = DEFAULT_DISK_CACHE_SIZE
    ca_file: Path | None = None  # the only TLS trust when set (see mistralfs/api/tls.py)
    local_names: tuple[str, ...] = DEFAULT_LOCAL_NAMES  # scratch files, never uploaded
    # --visibility, --expiry
    upload_defaults: UploadSettings = field(default_factory=UploadSettings)
    metrics_address: tuple[str, int] | None = None  # (host, port) of /metrics; None: off

    @property
    def pid_file(self) -> Path:
        return mount_state_file(self.mountpoint, "pid")

    @property
    def control_socket(self) -> Path:
        return mount_state_file(self.mountpoint, "sock")

    @property
    def spool_dir(self) -> Path:
        """Per mountpoint, so that recovery after a crash touches only this mount's files."""
        digest = hashlib.sha256(str(self.mountpoint).encode()).hexdigest()[:16]
        return self.cache_dir / "spool" / digest

    @property
    def recovery_dir(self) -> Path:
        return self.cache_dir / "recovery"

    @property
    def times_file(self) -> Path:
        """The times programs set, by file id (fs/mtimes.py); per mountpoint, as the spool."""
        return self.cache_dir / "times" / f"{self.spool_dir.name}.sqlite3"


# `-o` spellings of the mount options, for mount(8), fstab and mount.fuse3.
_VALUE_OPTIONS = {
    "server_url": "--server-url",
    "api_key_file": "--api-key-file",
    "ca_file": "--ca-file",
    "cache_size": "--cache-size",
    "max_throughput": "--max-throughput",
    "dir_cache_time": "--dir-cache-time",
    "cache_dir": "--cache-dir",
    "log_file": "--log-file",
    "log_level": "--log-level",
    "retry_time": "--retry-time",
    "stop_timeout": "--stop-timeout",
    "disk_cache": "--disk-cache",
    "disk_cache_size": "--disk-cache-size",
    "local_names": "--local-names",
    "visibility": "--visibility",
    "expiry": "--expiry",
    "metrics_address": "--metrics-address",
}
_FLAG_OPTIONS = {
    "read_only": "--read-only",
    "ro": "--read-only",
    "allow_other": "--allow-other",
    "foreground": "--foreground",
}
# Options that mean something to mount(8), fstab or systemd, not to mistralfs.
_IGNORED_OPTIONS = {
    "rw", "defaults", "auto", "noauto", "user", "users", "nouser", "owner", "_netdev",
    "nofail", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
    "relatime", "norelatime", "strictatime", "nodiratime", "sync", "async", "loop",
}  # fmt: skip
_IGNORED_PREFIXES = ("x-", "comment=", "helper=")


def options_to_args(spec: str) -> list[str]:
    """`server_url=U,allow_other,_netdev` -> `--server-url U --allow-other`."""
    args: list[str] = []
    for option in filter(None, (o.strip() for o in spec.split(","))):
        name, has_value, value = option.partition("=")
        if option in _IGNORED_OPTIONS or option.startswith(_IGNORED_PREFIXES):
            continue
        if name in _FLAG_OPTIONS and not has_value:
            args.append(_FLAG_OPTIONS[name])
        elif name in _VALUE_OPTIONS and has_value:
            args += [_VALUE_OPTIONS[name], value]
        elif name == "api_key":
            raise ConfigError("the API key is never a mount option: use api_key_file=FILE")
        else:
            known = sorted([*_VALUE_OPTIONS, *_FLAG_OPTIONS])
            raise ConfigError(f"unknown mount option {option!r} (known: {', '.join(known)})")
    return args
