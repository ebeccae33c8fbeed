"""Defaults in one frozen dataclass, overridable from the environment.

| variable                  | meaning                                              |
|---------------------------|------------------------------------------------------|
| IPFS_EXECUTE_API          | multiaddr of a user's own Kubo RPC API (no embedded node) |
| IPFS_EXECUTE_HOME         | data directory: embedded node repo, staging cache, runs   |
| IPFS_EXECUTE_KUBO         | path of the `ipfs` binary for the embedded node           |
| IPFS_EXECUTE_TIMEOUT      | default wall-clock timeout of a run, seconds              |
| IPFS_EXECUTE_FETCH_TIMEOUT| how long to wait for a CID to be retrievable, seconds     |
| IPFS_EXECUTE_ONLINE       | 1: the embedded node joins the network (sharing results)  |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import UsageError

KUBO_VERSION = "v0.43.1"
# Oldest daemon whose RPC API has everything the store uses (MFS composition, add flags).
MIN_KUBO_VERSION = (0, 40, 0)

# Unprivileged identity the sandbox runs as when the tool itself runs as root: bwrap started
# by real root keeps host-uid-0 powers (host sysctls are writable from inside).
SANDBOX_UID = 65534
SANDBOX_GID = 65534


def default_home() -> Path:
    if os.geteuid() == 0:
        # The sandbox runs as an unprivileged uid that cannot traverse /root (0700), so root's
        # cache must live somewhere it can read.
        return Path("/var/lib/ipfs-execute")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "ipfs-execute"


def _env_float(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a number of seconds") from None


def parse_size(text: str) -> int:
    """`512M`, `2G`, `1.5GiB`, `1048576` -> bytes."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    cleaned = str(text).strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if cleaned and cleaned[-1] in units:
            value = int(float(cleaned[:-1]) * units[cleaned[-1]])
        else:
            value = int(cleaned)
    except ValueError:
        raise UsageError(f"{text!r} is not a size (e.g. 512M, 2G)") from None
    if value <= 0:
        raise UsageError(f"{text!r}: a size must be positive")
    return value


def parse_seconds(text: str) -> float:
    """`30`, `30s`, `1.5` -> seconds."""
    try:
        value = float(str(text).strip().removesuffix("s"))
    except ValueError:
        raise UsageError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise UsageError(f"{text!r}: a duration must be positive")
    return value


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run. None means "no limit of this kind"."""

    timeout: float | None = 600.0  # wall clock, seconds
    memory_bytes: int | None = 2 * 1024**3  # whole sandbox incl. its /tmp tmpfs
    pids: int | None = 256  # processes and threads
    tmp_bytes: int = 256 * 1024**2  # size of the /tmp tmpfs
    file_bytes: int | None = 4 * 1024**3  # largest single file the payload may write
    cpu_seconds: int | None = None  # CPU time (RLIMIT_CPU)
    open_files: int = 1024

    def __post_init__(self) -> None:
        for name in ("timeout", "memory_bytes", "pids", "file_bytes", "cpu_seconds"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"limit {name} must be positive, got {value}")


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=default_home)
    api: str | None = None  # None: use (and start) the embedded node
    kubo_binary: str | None = None
    fetch_timeout: float = 60.0
    limits: Limits = field(default_factory=Limits)
    online: bool = False  # embedded node joins the public network only when asked

    def __post_init__(self) -> None:
        # Absolute always: the sandbox and the daemon resolve it from other working dirs.
        object.__setattr__(self, "home", Path(self.home).expanduser().absolute())

    @property
    def repo_dir(self) -> Path:
        return self.home / "kubo"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def kept_outputs_dir(self) -> Path:
        """Outputs that were produced but could not be added to IPFS wait here."""
        return self.home / "kept-outputs"

    def with_changes(self, **changes: object) -> Settings:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        env = os.environ
        values: dict[str, object] = {}
        if env.get("IPFS_EXECUTE_HOME"):
            values["home"] = Path(env["IPFS_EXECUTE_HOME"]).expanduser().absolute()
        if env.get("IPFS_EXECUTE_API"):
            values["api"] = env["IPFS_EXECUTE_API"]
        if env.get("IPFS_EXECUTE_KUBO"):
            values["kubo_binary"] = env["IPFS_EXECUTE_KUBO"]
        fetch_timeout = _env_float("IPFS_EXECUTE_FETCH_TIMEOUT", None)
        if fetch_timeout is not None:
            values["fetch_timeout"] = fetch_timeout
        timeout = _env_float("IPFS_EXECUTE_TIMEOUT", None)
        if timeout is not None:
            values["limits"] = Limits(timeout=timeout)
        if env.get("IPFS_EXECUTE_ONLINE", "").lower() in ("1", "true", "yes"):
            values["online"] = True
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
