"""One run: what it is given (SandboxSpec), its bwrap command line, what it reports
(SandboxResult)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from ..errors import SandboxError
from ..settings import DEFAULT_UID_RANGE, Limits
from .determinism import CLOCK_START_S
from .options import BwrapOption, JsonStatusFd, option_args
from .view import DEFAULT_ENV, PayloadView, payload_view


@dataclass(frozen=True)
class SandboxSpec:
    rootfs: Path  # staged root dir, bound read-only at /
    input_dir: Path  # bound read-only at /input
    output_dir: Path  # existing empty host dir, bound writable at /output
    argv: tuple[str, ...]  # run inside, e.g. ("/sbin/init", "sh", "-c", "...")
    limits: Limits = field(default_factory=Limits)
    interactive: bool = False  # True: stdin is the caller's; else /dev/null
    env: Mapping[str, str] = field(default_factory=lambda: DEFAULT_ENV)
    # Where the payload's monotonic and boot clocks start (a verifier may vary it).
    clock_start_s: float = CLOCK_START_S
    # Run by root: the host uids the sandbox may use, one per concurrent run (uid_pool).
    uid_range: tuple[int, int] = DEFAULT_UID_RANGE
    # An input staged by parts (staging.py): (path under /input, host path) in mount order,
    # each bound read-only over the mount point that `input_dir` or an earlier part holds.
    input_parts: tuple[tuple[str, Path], ...] = ()

    def __post_init__(self) -> None:
        if not self.argv:
            raise SandboxError("nothing to run: the sandbox argv is empty")
        if any("\0" in arg for arg in self.argv):
            raise SandboxError("sandbox argv contains a NUL byte")
        for path, _ in self.input_parts:
            if "\0" in path or any(step in ("", ".", "..") for step in path.split("/")):
                raise SandboxError(f"input part path {path!r} is not a relative path of entries")
        _ = self.view  # made only to check the environment and the clock start

    @property
    def view(self) -> PayloadView:
        """What this run's payload sees."""
        return replace(payload_view(self.limits), env=self.env, clock_start_s=self.clock_start_s)


_NOTHING: Mapping[str, str] = MappingProxyType({})


class SandboxResult(NamedTuple):
    exit_status: int | None  # payload's status (128+N if killed by signal N); None: never ran
    timed_out: bool
    duration_s: float
    limits_enforced: Mapping[str, str]  # only what was really enforced, and how
    # asked for but impossible here, with the reason
    limits_not_enforced: Mapping[str, str] = _NOTHING
    # Sources of nondeterminism this run fixed, and how; and those it could not fix here, and
    # why (UNFIXABLE_SOURCES lists the ones no run fixes).
    determinism: Mapping[str, str] = _NOTHING
    determinism_not_fixed: Mapping[str, str] = _NOTHING
    # Which limit ended a run that did not succeed: "timeout", or "memory" when the memory
    # cgroup OOM-killed a process of it; None when no limit is known to have (an RLIMIT_AS
    # allocation failure looks like any other error of the payload).
    killed_by: str | None = None


def sandbox_options(
    spec: SandboxSpec,
    *,
    json_status_fd: int | None = None,
    proc_stat_fd: int | None = None,
    seccomp_fd: int | None = None,
    view: PayloadView | None = None,
) -> list[BwrapOption]:
    """The bwrap options of one run, in mount order: those of `view` (default: the spec's).

    `proc_stat_fd` holds the view's synthetic /proc/stat, bound over /proc/stat, and
    `seccomp_fd` its seccomp filter (run_sandbox always passes both).
    """
    options = (view or spec.view).options(
        spec.rootfs,
        spec.input_dir,
        spec.output_dir,
        input_parts=spec.input_parts,
        proc_stat_fd=proc_stat_fd,
        seccomp_fd=seccomp_fd,
    )
    if json_status_fd is not None:
        options.append(JsonStatusFd(json_status_fd))
    return options


def bwrap_argv(
    spec: SandboxSpec,
    *,
    json_status_fd: int | None = None,
    proc_stat_fd: int | None = None,
    bwrap: str = "bwrap",
) -> list[str]:
    """Pure: the full command line that runs `spec` (no file system access).

    run_sandbox passes the options through `--args FD` instead, so that the sandbox's
    /proc/1/cmdline does not show host paths.
    """
    options = sandbox_options(spec, json_status_fd=json_status_fd, proc_stat_fd=proc_stat_fd)
    # "--": an argv[0] starting with "--" is still the payload.
    return [bwrap, *option_args(options), "--", *spec.argv]
