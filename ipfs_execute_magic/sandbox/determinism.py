"""The sources of nondeterminism a run fixes, the values it fixes them to, and those it cannot.

The values are the defaults of the payload's view (view.py); `plan_determinism` says, per
run, which of them this machine lets the run fix and why not the others. UNFIXABLE_SOURCES
lists what no run can fix (for the README and for run records).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from ..settings import SANDBOX_GID
from .rlimits import RlimitPlan

if TYPE_CHECKING:
    from .view import PayloadView

# 1980-01-01, the earliest date zip can store: tools that honour it build reproducibly. Staged
# trees carry it as every mtime (staging.py), /output starts with it, and the synthetic
# /proc/stat gives it as boot time.
SOURCE_DATE_EPOCH = 315532800

# The payload's CLOCK_MONOTONIC and CLOCK_BOOTTIME (and /proc/uptime) start here, as on a
# freshly booted machine, when a time namespace can be made (the caller needs CAP_SYS_ADMIN).
CLOCK_START_S = 1.0
# The payload runs on exactly this many CPUs (sched_setaffinity): the count is what programs
# size their thread pools by, so it must not depend on the host.
SANDBOX_CPUS = 1


def synthetic_proc_stat(cpu_count: int, boot_time: int) -> bytes:
    """What the sandbox binds over /proc/stat.

    glibc counts its cpuN lines for sysconf(_SC_NPROCESSORS_ONLN/CONF) (Python's os.cpu_count)
    when /sys is absent, as it is here. Its real content (counters since boot, boot time)
    differs on every read anyway; /proc/cpuinfo, which describes the hardware and which
    software reads to choose code paths, stays real.
    """
    zeros = " 0" * 10
    return (
        f"cpu {zeros}\n" + "".join(f"cpu{n}{zeros}\n" for n in range(cpu_count)) + "intr 0\n"
        "ctxt 0\n"
        f"btime {boot_time}\n"
        "processes 0\n"
        "procs_running 1\n"
        "procs_blocked 0\n"
        f"softirq{zeros} 0\n"
    ).encode()


PROC_STAT = synthetic_proc_stat(SANDBOX_CPUS, SOURCE_DATE_EPOCH)

# Sources of nondeterminism that no run fixes (for the README and for run records).
UNFIXABLE_SOURCES: Mapping[str, str] = MappingProxyType(
    {
        "wall_clock": "CLOCK_REALTIME (date, times of files the payload creates, mtimes of /tmp, "
        "/dev, /proc and /output): namespaces cannot offset it",
        "randomness": "getrandom(), /dev/urandom, AT_RANDOM, /proc/sys/kernel/random/uuid",
        "timing": "how far the clocks advance, thread and process scheduling order, races; "
        "/proc/self/timens_offsets shows the host's uptime",
        "cpu_model": "/proc/cpuinfo and CPUID (model, flags, MHz): code may pick other paths (e.g. "
        "SIMD, hence other floating-point results) on another host",
        "cpu_number": "which CPU the run is pinned to (Cpus_allowed in /proc/self/status, getcpu)",
        "host_counters": "/proc/meminfo, /proc/loadavg, /proc/uptime's idle field, /proc/vmstat, "
        "sysinfo(), getrusage(): host memory and load",
        "kernel": "uname -r/-v, /proc/version, /proc/sys/*, boot_id, /proc/self/cgroup (the "
        "host's cgroup version and controllers)",
        "mountinfo": "/proc/self/mountinfo names the host paths of the staged trees and the "
        "per-run output directory (a bind mount shows its path within the source "
        "file system, whatever path it is bound from), host-wide mount ids and device "
        "numbers, the host file system's options and the run's host uid (in the tmpfs "
        "options); df shows its free space (or, for /output, its size limit)",
        "file_identity": "inode and device numbers, st_blocks, directory sizes and link counts: "
        "they depend on the host file system and on staging",
        "namespace_ids": "inode numbers of /proc/self/ns/*",
        "readdir_order": "the order of directory entries (ext4 hash order, tmpfs reverse creation "
        "order); staging.shuffled_view exposes code that depends on it",
        "file_owner": "staged files show as owned by nobody (65534) when the tool runs as root, "
        "by root (0) otherwise",
        "scheduling": "nice value, scheduling policy and I/O priority come from the caller (so "
        "that `nice ipfs-execute ...` works)",
    }
)


def plan_determinism(
    view: PayloadView, rlimit_plan: RlimitPlan, *, interactive: bool, running_as_root: bool
) -> tuple[dict[str, str], dict[str, str]]:
    """(fixed, not fixed): the sources of nondeterminism this run fixes, and how; those it
    cannot fix on this machine, and why. Probes what the machine allows (cached)."""
    # Here, not at import: the view (and a cache hit's key) needs this module's values only.
    from .child import aslr_problem, time_namespace_problem

    cpus = "one CPU" if view.cpu_count == 1 else f"{view.cpu_count} CPUs"
    fixed = {
        "hostname": f"{view.hostname} (own UTS namespace)",
        "environment": f"only {', '.join(sorted(view.env))} and PWD (--clearenv)",
        "umask": f"{view.umask:04o}",
        "ids": f"uid {view.uid}, gid {view.gid} (own user namespace)",
        "cwd": view.cwd,
        "signals": "default dispositions, none blocked",
        "cpu_count": (
            f"{view.cpu_count} (sched_setaffinity to "
            f"{'one' if view.cpu_count == 1 else view.cpu_count} of the allowed CPUs; "
            f"a synthetic /proc/stat lists {cpus} for glibc's sysconf, e.g. Python's "
            "os.cpu_count)"
        ),
        "proc_stat": f"synthetic: {cpus}, zero counters, btime {view.mtime}",
        "output_dir": (
            f"{view.dest_of('output')} starts empty, mode {view.output_mode:04o}, "
            f"mtime {view.mtime}"
        ),
        "stdin": "/dev/null",
    }
    not_fixed: dict[str, str] = {}
    if view.aslr:
        not_fixed["aslr"] = "on: the payload's view keeps it"
    elif (personality_problem := aslr_problem()) is None:
        fixed["aslr"] = "off (personality ADDR_NO_RANDOMIZE): the same memory map in every run"
    else:
        not_fixed["aslr"] = f"on: {personality_problem}"
    clock_problem = time_namespace_problem()
    if clock_problem is None:
        fixed["clocks"] = (
            f"CLOCK_MONOTONIC and CLOCK_BOOTTIME (/proc/uptime) start at "
            f"{view.clock_start_s:g} s (own time namespace)"
        )
    else:
        not_fixed["clocks"] = clock_problem
    if rlimit_plan.not_fixed:
        not_fixed["rlimits"] = "; ".join(
            f"{name} {why}" for name, why in sorted(rlimit_plan.not_fixed.items())
        )
    else:
        fixed["rlimits"] = "every one at a fixed value (FIXED_RLIMITS and the run's Limits)"
    if running_as_root:
        fixed["ids"] += ", no supplementary groups"
    elif extra := set(os.getgroups()) - {os.getgid()}:
        # bwrap cannot drop them: an unprivileged user namespace denies setgroups().
        not_fixed["groups"] = (
            f"the caller's {len(extra)} supplementary group(s) show as "
            f"{SANDBOX_GID} (nogroup) inside"
        )
    if interactive:
        del fixed["stdin"]
        not_fixed["stdin"] = "the caller's (interactive run)"
    return fixed, not_fixed
