"""Every rlimit of the payload, fixed: the run's Limits where it sets one, FIXED_RLIMITS for
the rest, so that `ulimit -a` is the same on every host.

A non-root caller cannot raise a hard limit it was given: such values are reported as not
fixed, never faked.
"""

from __future__ import annotations

import functools
import os
import resource
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from ..settings import Limits

# Fixed soft and hard values of the rlimits that Limits does not set (those it leaves at None
# are unlimited): several kernel defaults scale with the host's RAM.
_INF = resource.RLIM_INFINITY
FIXED_RLIMITS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "RLIMIT_STACK": (8 * 1024**2, _INF),
        "RLIMIT_DATA": (_INF, _INF),
        "RLIMIT_RSS": (_INF, _INF),
        "RLIMIT_MEMLOCK": (8 * 1024**2, 8 * 1024**2),  # the kernel's default since 5.16
        "RLIMIT_MSGQUEUE": (819200, 819200),  # the kernel's default (MQ_BYTES_MAX)
        # The default is the host's RAM / 256 KiB: 1024 is below it on any host with 256 MiB or
        # more, and lowering is always allowed.
        "RLIMIT_SIGPENDING": (1024, 1024),
        "RLIMIT_NICE": (0, 0),
        "RLIMIT_RTPRIO": (0, 0),
        "RLIMIT_RTTIME": (_INF, _INF),
        "RLIMIT_LOCKS": (_INF, _INF),
    }
)
# Linux numbers of the rlimits Python's resource module does not name.
_UNNAMED_RLIMITS = {"RLIMIT_LOCKS": 10}
_CAP_SYS_RESOURCE = 24


class RlimitPlan(NamedTuple):
    """Every rlimit the child sets, how the limits among them are described to the user, and
    which values differ from the fixed ones (a non-root caller cannot raise a hard limit)."""

    rlimits: tuple[tuple[int, int, int], ...]  # (resource, soft, hard)
    enforced: Mapping[str, str]
    not_fixed: Mapping[str, str]


def plan_rlimits(
    limits: Limits,
    *,
    have_memory_cgroup: bool,
    have_pids_cgroup: bool,
    running_as_root: bool,
    fixed: Mapping[str, tuple[int, int]] = FIXED_RLIMITS,
) -> RlimitPlan:
    """The rlimits set in the child: every one of them, so that none is the host's.

    `fixed` gives the values of those the run's Limits do not set (the payload view's).
    """
    plan: list[tuple[int, int, int]] = []
    described: dict[str, str] = {}
    not_fixed: dict[str, str] = {}

    def add(name: str, soft: int, hard: int | None = None) -> int:
        which = getattr(resource, name) if hasattr(resource, name) else _UNNAMED_RLIMITS[name]
        wanted = (soft, soft if hard is None else hard)
        got = _capped(which, *wanted, can_raise=_can_raise_hard_limits())
        plan.append((which, *got))
        if got != wanted:
            not_fixed[name] = (
                f"soft {rlimit_text(got[0])}, hard {rlimit_text(got[1])} "
                f"instead of {rlimit_text(wanted[0])}, "
                f"{rlimit_text(wanted[1])}: the caller's hard limit is lower"
            )
        return got[0]

    add("RLIMIT_CORE", 0)
    described["core_dumps"] = "none (RLIMIT_CORE 0)"
    size = add("RLIMIT_FSIZE", _INF if limits.file_bytes is None else limits.file_bytes)
    if limits.file_bytes is not None:
        described["file_size"] = f"{size} bytes per file (RLIMIT_FSIZE)"
    seconds = add("RLIMIT_CPU", _INF if limits.cpu_seconds is None else limits.cpu_seconds)
    if limits.cpu_seconds is not None:
        described["cpu_time"] = f"{seconds} s per process (RLIMIT_CPU)"
    open_files = add("RLIMIT_NOFILE", limits.open_files)
    described["open_files"] = f"{open_files} per process (RLIMIT_NOFILE)"
    if limits.memory_bytes is not None and not have_memory_cgroup:
        size = add("RLIMIT_AS", limits.memory_bytes)
        described["memory"] = (
            f"{size} bytes of address space per process (RLIMIT_AS; "
            "no memory cgroup, so not a whole-sandbox limit)"
        )
    else:
        add("RLIMIT_AS", _INF)
    if limits.pids is not None and not have_pids_cgroup and not running_as_root:
        # RLIMIT_NPROC counts every task of our uid on the host, so allow for those first.
        uid = os.getuid()
        nproc = add("RLIMIT_NPROC", limits.pids + _count_tasks_of_uid(uid))
        described["pids"] = (
            f"{limits.pids} processes/threads (RLIMIT_NPROC {nproc}, "
            f"counted over all processes of uid {uid})"
        )
        not_fixed["RLIMIT_NPROC"] = (
            f"{nproc}: the pids limit plus the caller's other processes (no pids cgroup here)"
        )
    else:
        add("RLIMIT_NPROC", _INF)  # a pids cgroup limits processes, or nothing does
    for name, (soft, hard) in fixed.items():
        add(name, soft, hard)
    return RlimitPlan(tuple(plan), MappingProxyType(described), MappingProxyType(not_fixed))


def _at_most(value: int, ceiling: int) -> int:
    if ceiling == _INF:
        return value
    return ceiling if value == _INF else min(value, ceiling)


def _capped(which: int, soft: int, hard: int, *, can_raise: bool) -> tuple[int, int]:
    """(soft, hard) as wanted, except that without privileges the hard limit we were given
    cannot be raised."""
    if can_raise:
        return soft, hard
    _, given_hard = resource.getrlimit(which)
    hard = _at_most(hard, given_hard)
    return _at_most(soft, hard), hard


@functools.cache
def _can_raise_hard_limits() -> bool:
    """Whether we hold CAP_SYS_RESOURCE (root in a container often does not)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_RESOURCE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def rlimit_text(value: int) -> str:
    return "unlimited" if value == _INF else str(value)


def _count_tasks_of_uid(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                count += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            pass
    return count
