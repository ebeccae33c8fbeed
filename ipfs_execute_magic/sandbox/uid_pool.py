"""One host uid per concurrent sandbox when the tool runs as root.

Per-uid kernel limits (inotify instances, keyrings, RLIMIT_NPROC) and the rights to signal,
trace or enter another process (`kill`, ptrace, /proc/PID/root) all follow the host uid: runs
that shared one would share those too. So each run leases a uid (and the gid of the same
number) from a range reserved for the tool, as Nix gives each build one of its nixbld users.
Inside, bwrap maps it to uid 0 as before, so outputs and cache keys do not change.

A lease is an flock on one lock file per uid in a machine-wide directory: leases of processes
with different data directories exclude each other too, and a lease is released when its
holder exits, however it dies. Uids that the user or group database (NSS) names are never
leased. When every uid is leased, a run waits up to `WAIT_S` seconds for one to come free.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import grp
import os
import pwd
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from ..errors import SandboxError

# Machine-wide, on a tmpfs: leases never outlive a boot, and every data directory shares it.
LOCK_DIR = Path("/run/ipfs-execute/uids")
WAIT_S = 60.0


class HostIds(NamedTuple):
    uid: int
    gid: int


@functools.lru_cache(maxsize=65536)
def _named_by_system(uid: int) -> bool:
    """Whether the user or group database has an entry for this number.

    Remembered for the process: an NSS lookup costs ~0.2 ms, and a run asks only about the
    uids it tries, lowest first, which are the same ones run after run.
    """
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


def _try_lock(path: Path) -> int | None:
    """The fd holding an exclusive lock on `path`, or None if someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def lease_host_ids(
    uid_range: tuple[int, int], *, lock_dir: Path = LOCK_DIR, wait_s: float = WAIT_S
) -> Iterator[HostIds]:
    """Hold one uid of `uid_range` (inclusive) that no other run holds, lowest free first."""
    first, last = uid_range
    try:
        lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SandboxError(
            f"cannot create the sandbox uid lock directory {lock_dir}: {exc.strerror}"
        ) from None
    deadline = time.monotonic() + wait_s
    pause = 0.01
    while True:
        usable = 0
        for uid in range(first, last + 1):
            if _named_by_system(uid):
                continue
            usable += 1
            fd = _try_lock(lock_dir / str(uid))
            if fd is None:
                continue
            try:
                yield HostIds(uid, uid)
            finally:
                os.close(fd)  # releases the lease
            return
        if not usable:
            raise SandboxError(
                f"every uid of the sandbox uid range {first}-{last} belongs to a user or group "
                "of this machine: set IPFS_EXECUTE_UID_RANGE to a range of unused uids"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SandboxError(
                f"all {usable} sandbox uids of {first}-{last} are in use by other runs "
                f"on this machine (waited {wait_s:g} s): wait for some to finish, or set "
                "IPFS_EXECUTE_UID_RANGE=FIRST-LAST to a larger range of unused uids"
            )
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.5)
