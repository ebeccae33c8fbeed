"""Whether bwrap can sandbox anything here, and what its complaints mean.

Finds bwrap, asks its version, probes a sandbox the way runs start one, and turns bwrap's
own messages into errors that say which knob to turn (user namespaces, mostly).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import SandboxError, SandboxUnavailableError
from ..files import replace_file
from ..settings import SANDBOX_GID, SANDBOX_UID
from .options import (
    DIE_WITH_PARENT,
    DISABLE_USERNS,
    UNSHARE_ALL,
    UNSHARE_USER,
    Dev,
    Proc,
    RoBind,
    option_args,
)

_NAMESPACE_FAILURE_MARKERS = (
    "creating new namespace",
    "setting up uid map",
    "no permissions to creat",
    "unprivileged_userns_clone",
    "user namespace",
)

_available = False
FACTS_NAME = "bwrap-facts.json"  # in the caller's data directory: see check_available
# bwrap's version by its path, as remembered with a successful probe.
_known_versions: dict[str, str] = {}
# Whether runs can have a time namespace of their own, by bwrap's path: "" yes, else why not
# (child.time_namespace_problem; remembered with the probe, one process less a run).
known_time_namespace: dict[str, str] = {}


def find_bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailableError(
            "bubblewrap (bwrap) is not installed; install the Debian package bubblewrap"
        )
    return path


@functools.cache
def bwrap_version() -> str:
    """E.g. "0.8.0"."""
    bwrap = find_bwrap()
    if bwrap in _known_versions:
        return _known_versions[bwrap]
    completed = subprocess.run(
        [bwrap, "--version"], capture_output=True, text=True, check=False, timeout=10
    )
    words = completed.stdout.split()
    if completed.returncode != 0 or not words:
        raise SandboxUnavailableError(f"`bwrap --version` failed: {completed.stderr.strip()}")
    return words[-1]


def check_available(facts_dir: Path | None = None) -> None:
    """Raise SandboxUnavailableError unless bwrap can start a sandbox for us here.

    With `facts_dir` (a private directory), a success is remembered there with bwrap's
    version, for what it depends on: this bwrap binary (path, size, mtime), uid, user
    namespace, boot and the sysctls that switch user namespaces off. Later processes skip
    the probe, two process starts of every CLI run.
    """
    global _available
    if _available:
        return
    bwrap = find_bwrap()
    facts = None if facts_dir is None else facts_dir / FACTS_NAME
    key = _facts_key(bwrap)
    if facts is not None and key is not None:
        try:
            known = json.loads(facts.read_text())
            if known["key"] == key:
                _known_versions[bwrap] = str(known["version"])
                if "time_namespace" in known:
                    known_time_namespace[bwrap] = str(known["time_namespace"])
                else:
                    _remember(facts, {**known, "time_namespace": _time_namespace_fact()})
                _available = True
                return
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not probed here yet, or by another bwrap
    # Probe exactly the way runs start bwrap (same uid, all namespaces, fresh /proc).
    probe = [
        bwrap,
        *option_args(
            [
                UNSHARE_ALL,
                UNSHARE_USER,
                DISABLE_USERNS,
                DIE_WITH_PARENT,
                RoBind(Path("/"), "/"),
                Proc("/proc"),
                Dev("/dev"),
            ]
        ),
        "--",
        bwrap,
        "--version",
    ]
    drop = os.geteuid() == 0
    try:
        completed = subprocess.run(
            probe,
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
            env={},
            preexec_fn=drop_privileges if drop else None,
        )
    except subprocess.SubprocessError as exc:
        raise SandboxUnavailableError(f"could not start bwrap: {exc}") from None
    if completed.returncode != 0:
        message = bwrap_message(completed.stderr) or f"bwrap exited with {completed.returncode}"
        if _looks_like_namespace_failure(message):
            raise SandboxUnavailableError(f"{message}; {_user_namespace_hint()}")
        raise SandboxUnavailableError(f"bwrap cannot start a sandbox here: {message}")
    _available = True
    if facts is not None and key is not None:
        _remember(
            facts,
            {"key": key, "version": bwrap_version(), "time_namespace": _time_namespace_fact()},
        )


def _time_namespace_fact() -> str:
    from .child import time_namespace_problem  # child imports this module

    return time_namespace_problem() or ""


def _facts_key(bwrap: str) -> str | None:
    """What a remembered probe holds for: the binary, uid, user namespace, boot, sysctls."""
    try:
        st = os.stat(bwrap)
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/user")
    except OSError:
        return None
    sysctls = [_read_sysctl(path) for path in _USERNS_SYSCTLS]
    return (
        f"{bwrap} {st.st_size} {st.st_mtime_ns} uid {os.geteuid()} {namespace} boot {boot} "
        f"sysctls {sysctls}"
    )


def _remember(path: Path, facts: dict[str, str]) -> None:
    try:
        replace_file(path, json.dumps(facts).encode())  # whole, whoever reads it meanwhile
    except OSError:
        pass  # a read-only data directory probes every time


def drop_privileges() -> None:
    """Become the unprivileged sandbox uid (between fork and exec, when started as root)."""
    os.setgroups([])
    os.setgid(SANDBOX_GID)
    os.setuid(SANDBOX_UID)


def bwrap_message(stderr: str) -> str | None:
    """bwrap's own last complaint ("bwrap: ...") among the stderr lines, if any."""
    lines = [line.strip() for line in stderr.splitlines() if line.startswith("bwrap: ")]
    return lines[-1] if lines else None


def setup_error(message: str, *, running_as_root: bool) -> SandboxError:
    """The error for a sandbox that bwrap could not set up, with what to do about it."""
    if _looks_like_namespace_failure(message):
        return SandboxUnavailableError(
            f"sandbox set-up failed: {message}; {_user_namespace_hint()}"
        )
    hint = ""
    if running_as_root and "Permission denied" in message:
        hint = (
            " (the sandbox starts as an unprivileged uid: what it runs in the rootfs and "
            "input must be readable and executable by others)"
        )
    return SandboxError(f"sandbox set-up failed: {message}{hint}")


def _read_sysctl(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


_USERNS_SYSCTLS = (
    "/proc/sys/kernel/unprivileged_userns_clone",
    "/proc/sys/user/max_user_namespaces",
    "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
)


def _user_namespace_hint() -> str:
    """Which knob keeps unprivileged user namespaces off on this machine."""
    if _read_sysctl("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return "user namespaces are disabled: run `sysctl -w kernel.unprivileged_userns_clone=1`"
    if _read_sysctl("/proc/sys/user/max_user_namespaces") == "0":
        return "user namespaces are disabled: run `sysctl -w user.max_user_namespaces=15000`"
    if _read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        return (
            "AppArmor forbids unprivileged user namespaces: run "
            "`sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` "
            "or install an AppArmor profile for bwrap"
        )
    return (
        "bwrap cannot create user namespaces here (check the sysctls "
        "user.max_user_namespaces and kernel.unprivileged_userns_clone, "
        "or the container's seccomp/AppArmor policy)"
    )


def _looks_like_namespace_failure(message: str) -> bool:
    lowered = message.lower()
    return any(marker in lowered for marker in _NAMESPACE_FAILURE_MARKERS)
