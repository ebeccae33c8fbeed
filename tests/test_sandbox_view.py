"""What the payload sees (PayloadView): one value makes both the bwrap options and the
result-cache key.

Every test walks the dataclass fields, so a field added to the view later is covered without
touching this file (unless its type is new: `_changed` then says so).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest

from ipfs_execute_magic.errors import BadRootfsError, SandboxError
from ipfs_execute_magic.record import RunRequest, cache_key
from ipfs_execute_magic.runner import sandbox_profile
from ipfs_execute_magic.sandbox import (
    DEFAULT_ENV,
    MOUNT_POINTS,
    PayloadView,
    SandboxSpec,
    aslr_problem,
    bwrap_argv,
    mount_point_problem,
    option_args,
    payload_view,
)
from ipfs_execute_magic.sandbox import run as run_module
from ipfs_execute_magic.sandbox.seccomp import SeccompPolicy
from ipfs_execute_magic.sandbox.uid_pool import HostIds
from ipfs_execute_magic.settings import Limits
from ipfs_execute_magic.staging import check_rootfs

VIEW = payload_view(Limits())


def _changed(value: Any) -> Any:
    """Another value of the same kind, still valid for the sandbox."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, SeccompPolicy):
        return value._replace(rules=value.rules[:-1])  # a rule less
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, Mapping):
        first = next(iter(value))
        return {**value, first: _changed(value[first])}
    if isinstance(value, tuple) and value and all(isinstance(item, int) for item in value):
        return (value[0] + 1, *value[1:])
    if isinstance(value, tuple) and value:
        return value[:-1]  # a mount or an isolation option less
    raise AssertionError(f"no way to change {value!r} here: teach _changed its type")


def _variants() -> list[tuple[str, PayloadView]]:
    return [
        (f.name, replace(VIEW, **{f.name: _changed(getattr(VIEW, f.name))}))
        for f in fields(PayloadView)
    ]


def _key(view: PayloadView) -> str:
    return cache_key(
        rootfs="bafyroot",
        input="bafyinput",
        argv=("/sbin/init", "true"),
        env=DEFAULT_ENV,
        sandbox=view.profile(),
    )


@pytest.fixture(scope="module")
def output_parent() -> Iterator[Path]:
    parent = Path(tempfile.mkdtemp(prefix="sandbox-view-test-"))
    yield parent
    shutil.rmtree(parent)


def _realised(view: PayloadView, output_parent: Path) -> tuple[object, ...]:
    """What a run does with `view`: its bwrap arguments, the synthetic /proc/stat, the
    child's set-up, and how it prepares /output."""
    # No pids or memory limit: the rlimit fallbacks would count the host's processes.
    spec = SandboxSpec(
        Path("/r"),
        Path("/i"),
        Path("/o"),
        ("/sbin/init", "true"),
        Limits(pids=None, memory_bytes=None),
    )
    argv = option_args(view.options(spec.rootfs, spec.input_dir, spec.output_dir, proc_stat_fd=3))
    running_as_root = os.geteuid() == 0
    host_ids = HostIds(60578, 60578) if running_as_root else None
    plan = run_module._plan(spec, view, [], {}, running_as_root=running_as_root, host_ids=host_ids)
    output_dir = Path(tempfile.mkdtemp(dir=output_parent))
    run_module._prepare_output_dir(replace(spec, output_dir=output_dir), view, host_ids)
    output = output_dir.stat()
    child = plan.child._replace(cpus=())  # the CPU rotation differs from run to run
    return (
        argv,
        view.proc_stat(),
        view.seccomp.bpf(),
        child,
        (output.st_mode & 0o7777, output.st_mtime),
    )


def test_profile_is_deterministic_json_of_what_the_payload_sees() -> None:
    profile = VIEW.profile()
    assert json.loads(json.dumps(profile)) == profile  # as stored in, and read from, records
    assert payload_view(Limits()).profile() == profile
    assert {f.name for f in fields(PayloadView)} <= set(profile)
    assert profile["hostname"] == "sandbox" and profile["umask"] == "0022"
    # The run's host directories and fds are placeholders: they are not what the payload sees.
    assert "--ro-bind <input> /input" in profile["mounts"]
    # Every mount and option is rendered as its bwrap words (they are tuples underneath).
    assert all(isinstance(item, str) for item in profile["mounts"] + profile["isolation"])
    assert "--perms 1777 --size <tmp_bytes> --tmpfs /tmp" in profile["mounts"]
    assert "--perms 444 --ro-bind-data <proc_stat> /proc/stat" in profile["mounts"]
    assert "--unshare-all" in profile["isolation"]


def test_only_the_tmp_size_of_the_limits_is_in_the_view() -> None:
    assert (
        payload_view(Limits(timeout=5, memory_bytes=10**8, pids=3, cpu_seconds=1)).profile()
        == VIEW.profile()
    )
    assert payload_view(Limits(tmp_bytes=10**6)).profile() != VIEW.profile()


def test_every_field_changes_the_profile_and_the_cache_key() -> None:
    profile, key = VIEW.profile(), _key(VIEW)
    for name, variant in _variants():
        assert variant.profile() != profile, name
        assert _key(variant) != key, name


def test_every_field_changes_what_the_run_does(output_parent: Path) -> None:
    baseline = _realised(VIEW, output_parent)
    assert _realised(VIEW, output_parent) == baseline  # else the check below proves nothing
    # Where personality() is refused, ASLR stays on whatever the view says (and is reported).
    unrealisable = {"aslr"} if aslr_problem() is not None else set()
    for name, variant in _variants():
        if name not in unrealisable:
            assert _realised(variant, output_parent) != baseline, name


def test_bwrap_argv_and_child_follow_the_view(output_parent: Path) -> None:
    view = replace(
        VIEW,
        hostname="other",
        uid=7,
        gid=8,
        umask=0o077,
        cwd="/input",
        env={"ONLY": "this"},
        tmp_bytes=4096,
        cpu_count=2,
        clock_start_s=5.0,
    )
    argv = " ".join(option_args(view.options(Path("/r"), Path("/i"), Path("/o"))))
    for expected in (
        "--hostname other",
        "--uid 7 --gid 8",
        "--clearenv --setenv ONLY this",
        "--size 4096 --tmpfs /tmp",
        "--size 4096 --tmpfs /dev/shm",
        "--chdir /input",
    ):
        assert expected in argv
    assert "PATH" not in argv
    _argv, _proc_stat, _seccomp, child, _output = _realised(view, output_parent)
    assert (child.umask, child.cpu_count, child.clock_start_ns) == (0o077, 2, 5_000_000_000)
    assert view.proc_stat().count(b"\ncpu") == 2  # cpu0 and cpu1 after the total line


def test_the_spec_runs_its_view() -> None:
    spec = SandboxSpec(
        Path("/r"),
        Path("/i"),
        Path("/o"),
        ("/sbin/init", "true"),
        Limits(tmp_bytes=1234),
        env={"A": "b"},
        clock_start_s=3.0,
    )
    assert spec.view == replace(payload_view(spec.limits), env={"A": "b"}, clock_start_s=3.0)
    assert bwrap_argv(spec)[1:-3] == option_args(
        spec.view.options(spec.rootfs, spec.input_dir, spec.output_dir)
    )
    with pytest.raises(SandboxError, match="environment variable"):
        SandboxSpec(Path("/r"), Path("/i"), Path("/o"), ("x",), env={"A=B": "c"})


def test_the_runner_keys_runs_by_the_view() -> None:
    limits = Limits(tmp_bytes=10**6)
    assert sandbox_profile(RunRequest(rootfs="x", limits=limits)) == payload_view(limits).profile()


def test_mount_points_come_from_the_layout(tmp_path: Path) -> None:
    assert MOUNT_POINTS == ("input", "output", "tmp", "proc", "dev")
    assert VIEW.mount_points == MOUNT_POINTS
    root = tmp_path / "root"
    root.mkdir()
    assert mount_point_problem(root) == ("input", "missing")
    assert mount_point_problem(root, create_missing=True) is None
    assert sorted(p.name for p in root.iterdir()) == sorted(MOUNT_POINTS)
    (root / "tmp").rmdir()
    (root / "tmp").symlink_to("/etc")
    assert mount_point_problem(root) == ("tmp", "a symlink")
    # Staging refuses the same tree with the same check.
    with pytest.raises(BadRootfsError, match="/tmp is a symlink"):
        check_rootfs(root, "bafyroot")
    (root / "tmp").unlink()
    (root / "tmp").write_text("")
    assert mount_point_problem(root) == ("tmp", "not a directory")
