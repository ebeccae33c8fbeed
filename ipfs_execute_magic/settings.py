"""Defaults in one frozen dataclass, overridable from the environment.

| variable                  | meaning                                              |
|---------------------------|------------------------------------------------------|
| IPFS_EXECUTE_API          | multiaddr of a user's own Kubo RPC API (no embedded node) |
| IPFS_EXECUTE_API_AUTH     | its credentials: bearer:TOKEN or basic:USER:PASSWORD      |
| IPFS_EXECUTE_HOME         | data directory: embedded node repo, staging cache, runs   |
| IPFS_EXECUTE_KUBO         | path of the `ipfs` binary for the embedded node           |
| IPFS_EXECUTE_TIMEOUT      | default wall-clock timeout of a run, seconds              |
| IPFS_EXECUTE_FETCH_TIMEOUT| how long to wait for a CID to be retrievable, seconds     |
| IPFS_EXECUTE_ONLINE       | 1: the embedded node joins the network (sharing results)  |
| IPFS_EXECUTE_UID_RANGE    | FIRST-LAST: host uids of sandboxes when run as root       |
| IPFS_EXECUTE_STAGING_LIMIT| size the staging cache is kept under (e.g. 20G)           |
| IPFS_EXECUTE_GATEWAY      | HTTP gateway for links (default: the node's own, stable) |
| IPFS_EXECUTE_GATEWAY_STYLE| path (GW/ipfs/CID) or subdomain (CID.ipfs.GW)             |
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import UsageError

KUBO_VERSION = "v0.43.1"
# Oldest daemon whose RPC API has everything the store uses (MFS composition, add flags).
MIN_KUBO_VERSION = (0, 40, 0)

# Unprivileged identity of the availability probe when the tool runs as root: bwrap started
# by real root keeps host-uid-0 powers (host sysctls are writable from inside).
SANDBOX_UID = 65534
SANDBOX_GID = 65534

# Host uids (and gids of the same numbers) for sandboxes when the tool runs as root, one per
# concurrent run (sandbox/uid_pool.py). systemd's UIDS-GIDS.md leaves 60578-61183 unassigned,
# between the ranges it maps container users into and DynamicUser= (61184-65519); uids that
# the user or group database names are skipped.
DEFAULT_UID_RANGE = (60578, 61183)

# The staging cache's size limit: room for a few dozen rootfs images and inputs, while a data
# directory on a small disk still has to be told (a fraction of the free space would change
# from one run to the next and evict what the previous one kept).
DEFAULT_STAGING_LIMIT = 20 * 1024**3


def default_home() -> Path:
    if os.geteuid() == 0:
        # A system-wide service's state, as the FHS places it (root's own home is not needed:
        # the sandbox reaches the run's directories through binds of its own, whatever the
        # modes of their parents).
        return Path("/var/lib/ipfs-execute")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "ipfs-execute"


def parse_size(text: str | int) -> int:
    """`512M`, `2G`, `1.5GiB`, `1048576` -> bytes. Refuses zero, negative, nan and inf."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
        cleaned = str(text).strip().lower().removesuffix("ib").removesuffix("b")
        try:
            if cleaned and cleaned[-1] in units:
                number = float(cleaned[:-1])
                if not math.isfinite(number):
                    raise ValueError(cleaned)
                value = int(number * units[cleaned[-1]])
            else:
                value = int(cleaned)
        except ValueError:
            raise UsageError(f"{text!r} is not a size (e.g. 512M, 2G)") from None
    if value <= 0:
        raise UsageError(f"{text!r}: a size must be positive")
    return value


def format_bytes(size: int) -> str:
    """1.5 GiB, 12 KiB, 100 B: what `parse_size` reads back (to a rounding)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def parse_seconds(text: str | float) -> float:
    """`30`, `30s`, `1.5` -> seconds. Refuses zero, negative, nan and inf."""
    try:
        value = float(str(text).strip().removesuffix("s"))
    except ValueError:
        raise UsageError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{text!r}: a duration must be a positive, finite number of seconds")
    return value


def parse_count(text: str | int) -> int:
    """`256` -> 256. Refuses zero, negative and anything not a whole number."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise UsageError(f"{text!r} is not a positive whole number") from None
    if value <= 0:
        raise UsageError(f"{text!r} is not a positive whole number")
    return value


def parse_cpus(text: str | float) -> float:
    """`0.5`, `2` -> CPUs' worth of CPU time. Refuses zero, negative, nan, inf and quotas
    below the kernel's smallest (1 ms in a 100 ms period)."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise UsageError(f"{text!r} is not a number of CPUs (e.g. 0.5, 2)") from None
    if not math.isfinite(value) or value < 0.01:
        raise UsageError(f"{text!r}: a CPU limit must be a finite number of at least 0.01")
    return value


def parse_uid_range(text: str | tuple[int, int]) -> tuple[int, int]:
    """`60578-61183` -> (60578, 61183): the host uids sandboxes may use when run by root."""
    if isinstance(text, tuple):
        first, last = text
    else:
        first_text, _, last_text = str(text).strip().partition("-")
        try:
            first, last = int(first_text), int(last_text)
        except ValueError:
            raise UsageError(f"{text!r} is not a uid range (e.g. 60578-61183)") from None
    # 0 is root, 65534 nobody and 65535 the 16-bit "no uid": never a sandbox's.
    if not 0 < first <= last < 2**31 or (first <= 65535 and last >= 65534):
        raise UsageError(
            f"uid range {first}-{last} must be FIRST-LAST with 0 < FIRST <= LAST < 2^31, "
            "without 65534 (nobody) and 65535"
        )
    return first, last


GATEWAY_STYLES = ("path", "subdomain")


def parse_gateway(text: str) -> str:
    """`https://dweb.link/` -> `https://dweb.link`: the base URL of an HTTP gateway."""
    url = str(text).strip().rstrip("/")
    scheme, _, rest = url.partition("://")
    if scheme not in ("http", "https") or not rest or any(c in rest for c in "?#/ "):
        raise UsageError(
            f"{text!r} is not a gateway base URL: give scheme and host only, e.g. "
            "https://dweb.link or http://127.0.0.1:8080"
        )
    return url


def parse_gateway_style(text: str) -> str:
    """`path` (GATEWAY/ipfs/CID) or `subdomain` (CID.ipfs.GATEWAY-HOST)."""
    style = str(text).strip().lower()
    if style not in GATEWAY_STYLES:
        raise UsageError(f"gateway style {text!r} is not one of: {', '.join(GATEWAY_STYLES)}")
    return style


# The limits a user may override, by the names every front end uses for them: CLI options
# (--tmp-size -> tmp_size), magic options and traits, and the keywords of `ie.run`.
# Each name maps to the Limits field it sets.
LIMIT_FIELDS = {
    "timeout": "timeout",
    "memory": "memory_bytes",
    "pids": "pids",
    "cpus": "cpus",
    "tmp_size": "tmp_bytes",
    "output_size": "output_bytes",
    "output_files": "output_files",
}
LIMIT_OVERRIDES = tuple(LIMIT_FIELDS)


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
    # What the payload may leave in /output: disk space (as du counts it) and entries.
    output_bytes: int | None = 10 * 1024**3
    output_files: int | None = 1_000_000
    # CPU time per wall-clock time, in CPUs (0.5: half of one); None: as much as its CPU gives.
    cpus: float | None = None

    def __post_init__(self) -> None:
        for name in (
            "timeout",
            "memory_bytes",
            "pids",
            "tmp_bytes",
            "file_bytes",
            "cpu_seconds",
            "open_files",
            "output_bytes",
            "output_files",
            "cpus",
        ):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0
            ):
                raise UsageError(f"limit {name} must be a positive, finite number, got {value!r}")

    def overridden_by(self, source: object) -> Limits:
        """These limits with the overrides named in LIMIT_OVERRIDES read off `source` (parsed
        options, a configurable): the front ends' options and traits carry those names."""
        return self.with_overrides(**{name: getattr(source, name) for name in LIMIT_OVERRIDES})

    def with_overrides(
        self,
        *,
        timeout: float | str | None = None,
        memory: int | str | None = None,
        pids: int | str | None = None,
        tmp_size: int | str | None = None,
        output_size: int | str | None = None,
        output_files: int | str | None = None,
        cpus: float | str | None = None,
    ) -> Limits:
        """These limits with the user's overrides (None: keep). The one place where the CLI's
        options, the magic's options and config, and the Python API's arguments become Limits;
        strings are parsed as the CLI parses them ("512M", "30s")."""
        changes: dict[str, float | int] = {}
        if timeout is not None:
            changes["timeout"] = parse_seconds(timeout)
        if memory is not None:
            changes["memory_bytes"] = parse_size(memory)
        if pids is not None:
            changes["pids"] = parse_count(pids)
        if tmp_size is not None:
            changes["tmp_bytes"] = parse_size(tmp_size)
        if output_size is not None:
            changes["output_bytes"] = parse_size(output_size)
        if output_files is not None:
            changes["output_files"] = parse_count(output_files)
        if cpus is not None:
            changes["cpus"] = parse_cpus(cpus)
        return replace(self, **changes) if changes else self  # type: ignore[arg-type]


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=default_home)
    api: str | None = None  # None: use (and start) the embedded node
    # Credentials of the daemon at `api` (Kubo's AuthSecret syntax); kept out of repr.
    api_auth: str | None = field(default=None, repr=False)
    kubo_binary: str | None = None
    fetch_timeout: float = 60.0
    limits: Limits = field(default_factory=Limits)
    online: bool = False  # embedded node joins the public network only when asked
    # Multiaddrs the embedded node's swarm listens on (a cluster worker's, cluster.py);
    # empty: what its repo says (a random loopback port).
    swarm: tuple[str, ...] = ()
    # Host uids of sandboxes when the tool runs as root: one of them per concurrent run.
    uid_range: tuple[int, int] = DEFAULT_UID_RANGE
    # The staging cache evicts least recently used entries no run holds to stay under this.
    staging_limit_bytes: int = DEFAULT_STAGING_LIMIT
    # Base URL of the HTTP gateway that links in results point to (None: the node's own
    # gateway, on a port that stays the same for a data directory), and how a CID goes in it.
    gateway: str | None = None
    gateway_style: str = "path"
    # Keys whose attestations make a cached result a hit, beyond this data directory's own
    # and those in trusted-keys.json; `trust_any`: any valid attestation does (trust.py).
    trusted_keys: tuple[str, ...] = ()
    trust_any: bool = False

    def __post_init__(self) -> None:
        # Absolute always: the sandbox and the daemon resolve it from other working dirs.
        object.__setattr__(self, "home", Path(self.home).expanduser().absolute())
        object.__setattr__(self, "uid_range", parse_uid_range(self.uid_range))
        object.__setattr__(self, "staging_limit_bytes", parse_size(self.staging_limit_bytes))
        if self.gateway is not None:
            object.__setattr__(self, "gateway", parse_gateway(self.gateway))
        object.__setattr__(self, "gateway_style", parse_gateway_style(self.gateway_style))

    @property
    def repo_dir(self) -> Path:
        return self.home / "kubo"

    @property
    def staging_dir(self) -> Path:
        """The staging cache: rootfs and input trees ready to bind, by CID."""
        return self.home / "cache"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def signing_key_path(self) -> Path:
        """This data directory's private signing key (0600, never in IPFS)."""
        return self.home / "keys" / "signing.key"

    @property
    def trusted_keys_path(self) -> Path:
        return self.home / "trusted-keys.json"

    @property
    def output_templates_dir(self) -> Path:
        """The formatted /output images runs copy, one per (size, file count)."""
        return self.home / "output-templates"

    @property
    def kept_outputs_dir(self) -> Path:
        """Outputs that were produced but could not be added to IPFS wait here."""
        return self.home / "kept-outputs"

    def with_changes(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        env = os.environ
        values: dict[str, object] = {}
        if env.get("IPFS_EXECUTE_HOME"):
            values["home"] = Path(env["IPFS_EXECUTE_HOME"]).expanduser().absolute()
        if env.get("IPFS_EXECUTE_API"):
            values["api"] = env["IPFS_EXECUTE_API"]
        if env.get("IPFS_EXECUTE_API_AUTH"):
            values["api_auth"] = env["IPFS_EXECUTE_API_AUTH"]
        if env.get("IPFS_EXECUTE_KUBO"):
            values["kubo_binary"] = env["IPFS_EXECUTE_KUBO"]
        if env.get("IPFS_EXECUTE_FETCH_TIMEOUT"):
            try:
                values["fetch_timeout"] = parse_seconds(env["IPFS_EXECUTE_FETCH_TIMEOUT"])
            except UsageError as error:
                raise UsageError(f"IPFS_EXECUTE_FETCH_TIMEOUT: {error}") from None
        timeout = env.get("IPFS_EXECUTE_TIMEOUT")
        if timeout:
            try:
                values["limits"] = Limits().with_overrides(timeout=timeout)
            except UsageError as error:
                raise UsageError(f"IPFS_EXECUTE_TIMEOUT: {error}") from None
        if env.get("IPFS_EXECUTE_UID_RANGE"):
            try:
                values["uid_range"] = parse_uid_range(env["IPFS_EXECUTE_UID_RANGE"])
            except UsageError as error:
                raise UsageError(f"IPFS_EXECUTE_UID_RANGE: {error}") from None
        if env.get("IPFS_EXECUTE_STAGING_LIMIT"):
            try:
                values["staging_limit_bytes"] = parse_size(env["IPFS_EXECUTE_STAGING_LIMIT"])
            except UsageError as error:
                raise UsageError(f"IPFS_EXECUTE_STAGING_LIMIT: {error}") from None
        if env.get("IPFS_EXECUTE_GATEWAY"):
            try:
                values["gateway"] = parse_gateway(env["IPFS_EXECUTE_GATEWAY"])
            except UsageError as error:
                raise UsageError(f"IPFS_EXECUTE_GATEWAY: {error}") from None
        if env.get("IPFS_EXECUTE_GATEWAY_STYLE"):
            try:
                values["gateway_style"] = parse_gateway_style(env["IPFS_EXECUTE_GATEWAY_STYLE"])
            except UsageError as error:
                raise UsageError(f"IPFS_EXECUTE_GATEWAY_STYLE: {error}") from None
        if env.get("IPFS_EXECUTE_ONLINE", "").lower() in ("1", "true", "yes"):
            values["online"] = True
        if env.get("IPFS_EXECUTE_TRUST_ANY", "").lower() in ("1", "true", "yes"):
            values["trust_any"] = True
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


def check_home(settings: Settings) -> None:
    """Refuse a data directory that cannot be created or written, before anything uses it."""
    for path in (settings.home, settings.repo_dir, settings.staging_dir, settings.runs_dir):
        problem = _directory_problem(path)
        if problem is not None:
            raise UsageError(
                f"cannot use {settings.home} as the data directory: {problem}; choose another "
                "one (--home, IPFS_EXECUTE_HOME, or the magic's `home` setting)"
            )


def _directory_problem(path: Path) -> str | None:
    """Why `path` cannot be a writable directory (made with its parents if missing), or None."""
    existing = path
    while True:  # the nearest part of `path` that exists decides
        try:
            existing.stat()
            break
        except (FileNotFoundError, NotADirectoryError):
            if existing.parent == existing:
                return f"{existing} does not exist"
            existing = existing.parent
        except OSError as error:
            return f"{existing} cannot be examined ({error.strerror})"
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=True):
        why = (
            "is on a read-only file system"
            if os.statvfs(existing).f_flag & os.ST_RDONLY
            else f"is not writable by uid {os.geteuid()}"
        )
        return f"{existing} {why}"
    return None
