"""What a run was asked to do (RunRequest) and what it did (RunRecord), as versioned JSON.

A record is stored in IPFS as a small human-readable JSON file (`ipfs cat RECORD`): everything
that determined the output (rootfs, input with the script, argv, environment, the sandbox
profile), what came out (output, exit status, stdout and stderr as CIDs), and what could explain
a difference between two runs (versions, kernel, limits and determinism measures applied).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .params import check_params
from .settings import Limits

RECORD_FORMAT = "ipfs-execute/run-record/1"
# Bumped whenever the meaning of a cache key changes, so old entries stop matching.
CACHE_KEY_FORMAT = "ipfs-execute/cache-key/1"

# Where a script given with the request lands in the input tree. Reserved: an input that already
# has this name is refused rather than silently shadowed.
SCRIPT_DIR = ".ipfs-execute"
SCRIPT_PATH = f"{SCRIPT_DIR}/script"


@dataclass(frozen=True)
class RunRequest:
    """Everything the caller decides about a run. Paths may be CIDs or IPFS paths."""

    rootfs: str
    input: str | None = None  # None: an empty directory
    args: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    interactive: bool = False  # pass a terminal's stdin through (such a run is never cached)
    # A script written into the input tree at SCRIPT_PATH and run as
    # `/sbin/init INTERPRETER /input/SCRIPT_PATH ARGS...` (the notebook cell body).
    script: str | None = None
    interpreter: str = "sh"
    # Parameters (papermill's word): environment variables of the payload, in the cache key.
    params: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        check_params(self.params)

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The payload's environment: `base` (the sandbox's) with the parameters added."""
        return {**base, **dict(self.params)}

    def argv(self) -> tuple[str, ...]:
        if self.script is not None:
            return ("/sbin/init", *self.interpreter.split(), f"/input/{SCRIPT_PATH}", *self.args)
        return ("/sbin/init", *self.args)


def cache_key(
    *,
    rootfs: str,
    input: str,
    argv: tuple[str, ...],
    env: Mapping[str, str],
    sandbox: Mapping[str, Any],
) -> str:
    """A hash over everything that determines a run's output, and nothing else.

    Not in it: timeouts and resource limits (a run that succeeded within them gives the same
    output under others), host paths, times. In it: the content (rootfs and input CIDs, the
    input including the script), the exact argv, the environment and the sandbox profile the
    payload sees (hostname, ids, umask, mount layout, /tmp size).
    """
    material = {
        "format": CACHE_KEY_FORMAT,
        "rootfs": rootfs,
        "input": input,
        "argv": list(argv),
        "env": dict(sorted(env.items())),
        "sandbox": dict(sorted(sandbox.items())),
    }
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class RunRecord:
    """The outcome of one run; `output` is None only when nothing could be saved."""

    rootfs: str
    input: str  # the input the payload saw (with the script, when there is one)
    output: str | None
    args: tuple[str, ...]  # /sbin/init's arguments, as run
    exit_status: int | None  # payload's status; None if it never finished (timeout)
    timed_out: bool
    started_at: str  # UTC, ISO 8601
    # Seconds: resolve, stage_rootfs, stage_input, sandbox, add_output, total.
    durations: dict[str, float]
    limits: dict[str, Any]  # limits requested
    limits_enforced: dict[str, str]  # what was really enforced, and how
    versions: dict[str, str]
    staged_from_cache: dict[str, bool]
    given_input: str | None = None  # the input before the script was added
    script: str | None = None  # CID of the script file
    rootfs_path: str | None = None  # the rootfs as given, resolved to /ipfs/ROOT[/sub] (lineage)
    input_path: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    sandbox: dict[str, Any] = field(default_factory=dict)  # the profile the payload saw
    limits_not_enforced: dict[str, str] = field(default_factory=dict)  # asked for; why not
    determinism: dict[str, str] = field(default_factory=dict)  # sources fixed, and how
    determinism_not_fixed: dict[str, str] = field(default_factory=dict)  # could not, and why
    key: str | None = None  # result-cache key
    stdout: str | None = None  # CID of what the payload printed (its last MiB)
    stderr: str | None = None
    output_truncated: bool = False  # stdout/stderr longer than what was kept
    pure: bool = True  # False when the payload could see the outside (an interactive stdin)
    # The limit that ended a failed run: "timeout" or "memory" (the memory cgroup killed a
    # process), "output_bytes" or "output_files" (/output passed its limit: the run is a
    # failure whatever its exit status); None when none is known to have (records older than
    # this field say nothing).
    killed_by: str | None = None
    # What adding /output had to leave out, one line each ("/output/p: a named pipe (FIFO),
    # left out ..."): FIFOs, sockets and devices have no form in IPFS.
    output_warnings: list[str] = field(default_factory=list)
    # The request's parameters (also in `env`): what the widget and lineage show of them.
    params: dict[str, str] = field(default_factory=dict)
    # The peer ID of the IPFS node that ran it and holds its output, when that is a cluster
    # worker's (cluster.py); None: the node of the data directory that recorded it.
    node: str | None = None
    # The writer's attestation (trust.Attestation as a dict): its key signed (key, output).
    attestation: dict[str, str] | None = None
    format: str = RECORD_FORMAT

    @property
    def succeeded(self) -> bool:
        return (
            self.exit_status == 0
            and not self.timed_out
            and self.killed_by not in ("output_bytes", "output_files")
        )

    def killed_text(self) -> str | None:
        """Which limit ended the run, in words ("killed: out of memory (limit 512 MiB)")."""
        if self.killed_by == "memory":
            limit = self.limits.get("memory_bytes")
            within = f" (limit {_binary_size(limit)})" if isinstance(limit, int) else ""
            return f"killed: out of memory{within}"
        if self.killed_by == "timeout":
            limit = self.limits.get("timeout")
            within = f" {limit:g} s" if isinstance(limit, (int, float)) else ""
            return f"killed: ran past the{within} timeout"
        limit = self.limits.get(self.killed_by or "")
        if self.killed_by == "output_bytes" and isinstance(limit, int):
            return f"killed: output exceeded {_binary_size(limit)}"
        if self.killed_by == "output_files" and isinstance(limit, int):
            return f"killed: output exceeded {limit} files"
        return None

    @property
    def cacheable(self) -> bool:
        return self.succeeded and self.pure and self.output is not None and self.key is not None

    def to_json(self, indent: int | None = 2) -> str:
        # Shallow: every field is JSON already (asdict's deep copy cost a warm run 1 ms).
        data = {item.name: getattr(self, item.name) for item in fields(self)}
        data["args"] = list(self.args)
        return json.dumps(data, indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> RunRecord:
        data = json.loads(text)
        if not isinstance(data, dict) or not str(data.get("format", "")).startswith(
            "ipfs-execute/run-record/"
        ):
            raise ValueError("not an ipfs-execute run record")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["args"] = tuple(values.get("args", ()))
        return cls(**values)

    def recomputed_key(self) -> str:
        return cache_key(
            rootfs=self.rootfs,
            input=self.input,
            argv=("/sbin/init", *self.args),
            env=self.env,
            sandbox=self.sandbox,
        )


def _binary_size(size: int) -> str:
    """512 MiB, 1.5 GiB, 100 B: the largest binary unit, exact when it divides evenly."""
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            value = size / scale
            return f"{value:g} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} B"
