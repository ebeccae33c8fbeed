"""What separates runs from each other and from the machine's other users: one host uid per
concurrent run when the tool runs as root, and a data directory nobody else can enter.

The real bwrap, the real node and real host uids (setpriv); nothing is mocked.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipfs_execute_magic.errors import SandboxError
from ipfs_execute_magic.sandbox import SandboxResult, SandboxSpec, run_sandbox
from ipfs_execute_magic.sandbox.uid_pool import lease_host_ids
from ipfs_execute_magic.settings import DEFAULT_UID_RANGE, Limits, Settings, parse_uid_range

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="host uids are leased only by root")

# A host uid that is neither the tool's nor a sandbox's: "another user of the machine".
OTHER_USER = 4242


def as_uid(uid: int, *command: str) -> subprocess.CompletedProcess[str]:
    """Run `command` on the host as `uid` (gid of the same number, no groups)."""
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command],
        capture_output=True,
        text=True,
        timeout=30,
    )


# --- the uid range --------------------------------------------------------------------------


def test_uid_range_parses_and_refuses_nonsense() -> None:
    assert parse_uid_range("60578-61183") == (60578, 61183)
    assert Settings(uid_range=(70000, 70009)).uid_range == (70000, 70009)
    for bad in ("", "5", "0-10", "10-5", "65000-65534", "60000-70000", "a-b", f"1-{2**31}"):
        with pytest.raises(Exception, match=r"uid range|not a uid range"):
            parse_uid_range(bad)


def test_default_uid_range_is_free_on_this_machine() -> None:
    import grp
    import pwd

    first, last = DEFAULT_UID_RANGE
    assert not [u.pw_name for u in pwd.getpwall() if first <= u.pw_uid <= last]
    assert not [g.gr_name for g in grp.getgrall() if first <= g.gr_gid <= last]
    assert not first <= 65534 <= last  # nobody is never a sandbox's uid


def test_leases_are_exclusive_and_waiting_ends_in_a_clear_error(tmp_path: Path) -> None:
    with lease_host_ids((70000, 70001), lock_dir=tmp_path) as first:
        with lease_host_ids((70000, 70001), lock_dir=tmp_path) as second:
            assert {first.uid, second.uid} == {70000, 70001}
            assert (first.uid, second.uid) == (first.gid, second.gid)
            started = time.monotonic()
            with (
                pytest.raises(SandboxError, match=r"all 2 sandbox uids of 70000-70001 are in use"),
                lease_host_ids((70000, 70001), lock_dir=tmp_path, wait_s=0.3),
            ):
                pass
            assert 0.3 <= time.monotonic() - started < 5
        # Freed by its holder: the next run gets it.
        with lease_host_ids((70000, 70001), lock_dir=tmp_path) as again:
            assert again.uid == second.uid


def test_a_lease_waits_for_a_uid_to_come_free(tmp_path: Path) -> None:
    got: list[int] = []
    with lease_host_ids((70000, 70000), lock_dir=tmp_path):

        def wait_for_it() -> None:
            with lease_host_ids((70000, 70000), lock_dir=tmp_path, wait_s=10) as ids:
                got.append(ids.uid)

        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        time.sleep(0.2)
        assert got == []
    waiter.join(timeout=10)
    assert got == [70000]


def test_uids_the_system_names_are_never_leased(tmp_path: Path) -> None:
    import grp
    import pwd

    named = {u.pw_uid for u in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    # A named uid followed by an unnamed one (root's 0 and the daemon user's 1 are both named).
    user = min(uid for uid in named if uid > 0 and uid + 1 not in named)
    with lease_host_ids((user, user + 1), lock_dir=tmp_path) as ids:
        assert ids.uid == user + 1
    with (
        pytest.raises(SandboxError, match="belongs to a user or group"),
        lease_host_ids((user, user), lock_dir=tmp_path),
    ):
        pass


# --- two concurrent runs --------------------------------------------------------------------


def _make_rootfs(root: Path) -> Path:
    for name in ("bin", "sbin", "input", "output", "tmp", "proc", "dev"):
        (root / name).mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "sleep", "echo", "cat"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "sbin" / "init").write_text('#!/bin/busybox sh\nexec "$@"\n')
    (root / "sbin" / "init").chmod(0o755)
    return root


@pytest.fixture
def base_dir() -> Iterator[Path]:
    # 0700, as the data directory is: the sandbox reaches its directories without traversing.
    base = Path(tempfile.mkdtemp(prefix="iex-isolation-"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _payload_pid(marker: str, deadline_s: float = 20) -> int:
    """The host pid of the payload's shell that carries `marker` in its argv."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[:1] == [b"sh"] and marker.encode() in argv:
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no payload with {marker} appeared")


def _wait_for_file(path: Path, deadline_s: float = 20) -> Path:
    """`path`, once it exists: the payload's shell is seen before its first command has run."""
    deadline = time.monotonic() + deadline_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)
    return path


def _host_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


@needs_root
def test_concurrent_runs_have_own_host_uids_and_cannot_touch_each_other(base_dir: Path) -> None:
    rootfs = _make_rootfs(base_dir / "rootfs")
    input_dir = base_dir / "input"
    input_dir.mkdir()
    markers = [f"iex-run-{secrets.token_hex(4)}" for _ in range(2)]
    outputs = [base_dir / f"output-{n}" for n in range(2)]
    results: list[SandboxResult] = []

    def run(marker: str, output: Path) -> None:
        output.mkdir()
        # `sh -c SCRIPT MARKER` tags the shell; `; true` keeps it from exec-ing the sleep.
        script = "echo x > /output/mine; sleep 60; true"
        spec = SandboxSpec(
            rootfs=rootfs,
            input_dir=input_dir,
            output_dir=output,
            argv=("/sbin/init", "sh", "-c", script, marker),
            limits=Limits(timeout=40),
        )
        results.append(run_sandbox(spec))

    threads = [
        threading.Thread(target=run, args=pair) for pair in zip(markers, outputs, strict=True)
    ]
    for thread in threads:
        thread.start()
    pids: list[int] = []
    try:
        pids.extend(_payload_pid(marker) for marker in markers)
        uids = [_host_uid(pid) for pid in pids]
        first, last = DEFAULT_UID_RANGE
        assert uids[0] != uids[1]
        assert all(first <= uid <= last for uid in uids)
        assert [_wait_for_file(out / "mine").stat().st_uid for out in outputs] == uids

        # Run 0's uid against run 1's payload: no signal, no look inside, no write to /output.
        assert as_uid(uids[1], "kill", "-0", str(pids[1])).returncode == 0  # its own: yes
        signalled = as_uid(uids[0], "kill", "-0", str(pids[1]))
        assert signalled.returncode != 0, "one run's uid could signal another run's payload"
        assert "not permitted" in signalled.stderr
        entered = as_uid(uids[0], "ls", f"/proc/{pids[1]}/root/output")
        assert entered.returncode != 0
        written = as_uid(uids[0], "sh", "-c", f"echo evil > /proc/{pids[1]}/root/output/evil")
        assert written.returncode != 0
        assert not (outputs[1] / "evil").exists()
        traced = as_uid(uids[0], "cat", f"/proc/{pids[1]}/environ")
        assert traced.returncode != 0
    finally:
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        for thread in threads:
            thread.join(timeout=60)
    assert [r.exit_status for r in results] == [137, 137]


# --- the data directory ---------------------------------------------------------------------


def test_in_progress_output_and_staged_input_are_private(settings, store, busybox_cid) -> None:
    from ipfs_execute_magic.record import RunRequest
    from ipfs_execute_magic.runner import RunConditions, Runner

    secret = f"secret-{secrets.token_hex(4)}"
    scratch = Path(tempfile.mkdtemp(prefix="iex-private-"))
    (scratch / "data.txt").write_text(secret)
    (scratch / "data.txt").chmod(0o644)  # staged as it is: readable by anyone who gets there
    input_cid = store.add_path(scratch)
    shutil.rmtree(scratch)
    request = RunRequest(
        rootfs=busybox_cid,
        input=input_cid,
        args=("sh", "-c", f"echo {secret} > /output/secret; sleep 3; echo done"),
        limits=Limits(timeout=60),
    )
    done: list[object] = []
    with Runner(settings, store) as runner:
        worker = threading.Thread(
            target=lambda: done.append(runner.run(request, RunConditions(use_cache=False)))
        )
        worker.start()
        try:
            deadline = time.monotonic() + 30
            found: list[Path] = []
            while not found and time.monotonic() < deadline:
                found = list(settings.runs_dir.glob("*/output/secret"))
                time.sleep(0.02)
            assert found, "the run's output never appeared"
            in_progress = found[0]
            staged = settings.staging_dir / "input" / input_cid / "data.txt"
            assert staged.read_text() == secret  # root, the tool's user, reads both
            for directory in (
                settings.home,
                settings.staging_dir,
                settings.runs_dir,
                in_progress.parent.parent,
            ):
                assert directory.stat().st_mode & 0o077 == 0, directory
            # Another user of the machine, knowing both paths, reads neither.
            for path in (in_progress, staged):
                attempt = as_uid(OTHER_USER, "cat", str(path))
                assert attempt.returncode != 0 and secret not in attempt.stdout, path
                assert "Permission denied" in attempt.stderr
        finally:
            worker.join(timeout=90)
    assert done and done[0].record.exit_status == 0  # type: ignore[attr-defined]
