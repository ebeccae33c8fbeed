"""Run one pure computation in a bubblewrap sandbox.

The payload sees a read-only root, read-only /input, writable /output, a size-limited /tmp,
no network, no capabilities, a fixed environment and hostname: all of it is one PayloadView
(view.py), which makes both the bwrap options of a run and the profile that keys the result
cache. Limits come from `settings.Limits`; each run reports which of them were really
enforced and how, because that depends on the machine (cgroup v1 or v2, root or not).

Determinism: beyond the environment and hostname, every run fixes its umask, ids, cwd, every
rlimit, ASLR (off), the CPU count (one) and, where the caller may create a time namespace,
the monotonic and boot clocks. Each run reports which sources it fixed and which it could not
(`SandboxResult.determinism`, `.determinism_not_fixed`); `UNFIXABLE_SOURCES` lists what no run
can fix.

This package knows nothing of IPFS or notebooks: it takes staged directories and an argv.

    options      bwrap options as typed values, and their argv
    view         what the payload sees (PayloadView), mount points and the rootfs check
    spec         one run's SandboxSpec, its bwrap argv, its SandboxResult
    probe        finding bwrap, whether it works here, what its errors mean
    cgroups      per-run cgroups (v1 and v2) for the memory, pids and CPU limits, the cpuset
    seccomp      the payload's seccomp filter: rules as data, compiled with libseccomp
    rlimits      every rlimit of the payload, fixed
    child        what runs between fork and exec (ids, rlimits, CPU pinning, clocks, ASLR)
    determinism  the fixed values, and which sources a run fixes here
    run          run_sandbox: plan, spawn, collect
    uid_pool     one host uid per concurrent run when the tool runs as root
    output_area  /output's byte and file limits: its own file system, and the watch
    output_pool  /output areas made before their runs and released after them, in the background
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cgroups import (
        CgroupMount,
        RunCgroup,
        cgroup_mounts,
        create_run_cgroups,
        remove_run_cgroups,
    )
    from .child import ChildSetup, aslr_problem, die_with_parent, time_namespace_problem
    from .determinism import (
        CLOCK_START_S,
        PROC_STAT,
        SANDBOX_CPUS,
        SOURCE_DATE_EPOCH,
        UNFIXABLE_SOURCES,
        plan_determinism,
        synthetic_proc_stat,
    )
    from .options import (
        CLEAR_ENV,
        DIE_WITH_PARENT,
        DISABLE_USERNS,
        NEW_SESSION,
        UNSHARE_ALL,
        UNSHARE_USER,
        Bind,
        BwrapOption,
        CapDrop,
        Chdir,
        Dev,
        Flag,
        Gid,
        Hostname,
        JsonStatusFd,
        Proc,
        RemountRo,
        RoBind,
        RoBindData,
        SetEnv,
        Tmpfs,
        Uid,
        option_args,
    )
    from .output_area import OutputArea, create_output_area
    from .output_area import release_stale as release_stale_outputs
    from .output_pool import OutputAreaPool
    from .probe import bwrap_version, check_available
    from .rlimits import FIXED_RLIMITS, RlimitPlan, plan_rlimits
    from .run import run_sandbox
    from .seccomp import remember_filters_in
    from .spec import SandboxResult, SandboxSpec, bwrap_argv, sandbox_options
    from .view import (
        DEFAULT_ENV,
        HOSTNAME,
        LAYOUT,
        MOUNT_POINTS,
        SANDBOX_UMASK,
        PayloadView,
        ProcStat,
        RunDir,
        SizedTmpfs,
        mount_point_problem,
        mount_points,
        payload_view,
    )

# Each name is imported from its module when first used: a cache hit needs the view (for
# the key's profile), not cgroups, the runner or the output area (docs/architecture.md).
_SOURCES: dict[str, tuple[str, str]] = {
    "Bind": ("options", "Bind"),
    "BwrapOption": ("options", "BwrapOption"),
    "CLEAR_ENV": ("options", "CLEAR_ENV"),
    "CLOCK_START_S": ("determinism", "CLOCK_START_S"),
    "CapDrop": ("options", "CapDrop"),
    "CgroupMount": ("cgroups", "CgroupMount"),
    "Chdir": ("options", "Chdir"),
    "ChildSetup": ("child", "ChildSetup"),
    "DEFAULT_ENV": ("view", "DEFAULT_ENV"),
    "DIE_WITH_PARENT": ("options", "DIE_WITH_PARENT"),
    "DISABLE_USERNS": ("options", "DISABLE_USERNS"),
    "Dev": ("options", "Dev"),
    "FIXED_RLIMITS": ("rlimits", "FIXED_RLIMITS"),
    "Flag": ("options", "Flag"),
    "Gid": ("options", "Gid"),
    "HOSTNAME": ("view", "HOSTNAME"),
    "Hostname": ("options", "Hostname"),
    "JsonStatusFd": ("options", "JsonStatusFd"),
    "LAYOUT": ("view", "LAYOUT"),
    "MOUNT_POINTS": ("view", "MOUNT_POINTS"),
    "NEW_SESSION": ("options", "NEW_SESSION"),
    "OutputArea": ("output_area", "OutputArea"),
    "OutputAreaPool": ("output_pool", "OutputAreaPool"),
    "PROC_STAT": ("determinism", "PROC_STAT"),
    "PayloadView": ("view", "PayloadView"),
    "Proc": ("options", "Proc"),
    "ProcStat": ("view", "ProcStat"),
    "RemountRo": ("options", "RemountRo"),
    "RlimitPlan": ("rlimits", "RlimitPlan"),
    "RoBind": ("options", "RoBind"),
    "RoBindData": ("options", "RoBindData"),
    "RunCgroup": ("cgroups", "RunCgroup"),
    "RunDir": ("view", "RunDir"),
    "SANDBOX_CPUS": ("determinism", "SANDBOX_CPUS"),
    "SANDBOX_UMASK": ("view", "SANDBOX_UMASK"),
    "SOURCE_DATE_EPOCH": ("determinism", "SOURCE_DATE_EPOCH"),
    "SandboxResult": ("spec", "SandboxResult"),
    "SandboxSpec": ("spec", "SandboxSpec"),
    "SetEnv": ("options", "SetEnv"),
    "SizedTmpfs": ("view", "SizedTmpfs"),
    "Tmpfs": ("options", "Tmpfs"),
    "UNFIXABLE_SOURCES": ("determinism", "UNFIXABLE_SOURCES"),
    "UNSHARE_ALL": ("options", "UNSHARE_ALL"),
    "UNSHARE_USER": ("options", "UNSHARE_USER"),
    "Uid": ("options", "Uid"),
    "aslr_problem": ("child", "aslr_problem"),
    "bwrap_argv": ("spec", "bwrap_argv"),
    "bwrap_version": ("probe", "bwrap_version"),
    "cgroup_mounts": ("cgroups", "cgroup_mounts"),
    "check_available": ("probe", "check_available"),
    "create_output_area": ("output_area", "create_output_area"),
    "create_run_cgroups": ("cgroups", "create_run_cgroups"),
    "die_with_parent": ("child", "die_with_parent"),
    "mount_point_problem": ("view", "mount_point_problem"),
    "mount_points": ("view", "mount_points"),
    "option_args": ("options", "option_args"),
    "payload_view": ("view", "payload_view"),
    "plan_determinism": ("determinism", "plan_determinism"),
    "plan_rlimits": ("rlimits", "plan_rlimits"),
    "release_stale_outputs": ("output_area", "release_stale"),
    "remember_filters_in": ("seccomp", "remember_filters_in"),
    "remove_run_cgroups": ("cgroups", "remove_run_cgroups"),
    "run_sandbox": ("run", "run_sandbox"),
    "sandbox_options": ("spec", "sandbox_options"),
    "synthetic_proc_stat": ("determinism", "synthetic_proc_stat"),
    "time_namespace_problem": ("child", "time_namespace_problem"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _SOURCES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))


__all__ = [
    "CLEAR_ENV",
    "CLOCK_START_S",
    "DEFAULT_ENV",
    "DIE_WITH_PARENT",
    "DISABLE_USERNS",
    "FIXED_RLIMITS",
    "HOSTNAME",
    "LAYOUT",
    "MOUNT_POINTS",
    "NEW_SESSION",
    "PROC_STAT",
    "SANDBOX_CPUS",
    "SANDBOX_UMASK",
    "SOURCE_DATE_EPOCH",
    "UNFIXABLE_SOURCES",
    "UNSHARE_ALL",
    "UNSHARE_USER",
    "Bind",
    "BwrapOption",
    "CapDrop",
    "CgroupMount",
    "Chdir",
    "ChildSetup",
    "Dev",
    "Flag",
    "Gid",
    "Hostname",
    "JsonStatusFd",
    "OutputArea",
    "OutputAreaPool",
    "PayloadView",
    "Proc",
    "ProcStat",
    "RemountRo",
    "RlimitPlan",
    "RoBind",
    "RoBindData",
    "RunCgroup",
    "RunDir",
    "SandboxResult",
    "SandboxSpec",
    "SetEnv",
    "SizedTmpfs",
    "Tmpfs",
    "Uid",
    "aslr_problem",
    "bwrap_argv",
    "bwrap_version",
    "cgroup_mounts",
    "check_available",
    "create_output_area",
    "create_run_cgroups",
    "die_with_parent",
    "mount_point_problem",
    "mount_points",
    "option_args",
    "payload_view",
    "plan_determinism",
    "plan_rlimits",
    "release_stale_outputs",
    "remember_filters_in",
    "remove_run_cgroups",
    "run_sandbox",
    "sandbox_options",
    "synthetic_proc_stat",
    "time_namespace_problem",
]
