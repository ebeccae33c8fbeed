"""The CPU limits: a quota of CPU time (`--cpus`) and a cpuset that holds the sandbox to the
CPU it is pinned to, whatever affinity the payload asks for. The payload is a static C
program (tests/programs/cpu_probe.c)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ipfs_execute, world_traversable_tmpdir

from ipfs_execute_magic.errors import UsageError
from ipfs_execute_magic.sandbox import (
    MOUNT_POINTS,
    SandboxResult,
    SandboxSpec,
    cgroups,
    run_sandbox,
)
from ipfs_execute_magic.sandbox.cgroups import CgroupMount, _limit_files
from ipfs_execute_magic.settings import Limits

PROBE_SOURCE = Path(__file__).parent / "programs" / "cpu_probe.c"
V1_CGROUPS_AS_ROOT = os.geteuid() == 0 and Path("/sys/fs/cgroup/cpuset/cgroup.procs").exists()


# --- pure -------------------------------------------------------------------------------------


def test_cpus_override_is_parsed_like_the_other_limits() -> None:
    assert Limits().cpus is None
    assert Limits().with_overrides(cpus="0.5").cpus == 0.5
    assert Limits().with_overrides(cpus=2).cpus == 2.0
    for bad in ("0", "-1", "nan", "inf", "lots", "0.001"):
        with pytest.raises(UsageError, match="CPU"):
            Limits().with_overrides(cpus=bad)


def test_cpu_quota_and_cpuset_files_for_both_cgroup_versions() -> None:
    limits = Limits(cpus=0.5, memory_bytes=None, pids=None)
    assert _limit_files(1, limits, "1", "0") == {
        "cpu": [("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "50000")],
        "cpuset": [("cpuset.cpus", "1"), ("cpuset.mems", "0")],
    }
    assert _limit_files(2, limits, "1") == {
        "cpu": [("cpu.max", "50000 100000")],
        "cpuset": [("cpuset.cpus", "1")],
    }
    # The kernel's smallest quota is 1 ms.
    assert _limit_files(2, Limits(cpus=0.001, memory_bytes=None, pids=None))["cpu"] == [
        ("cpu.max", "1000 100000")
    ]


def test_a_delegated_v2_tree_without_cpuset_keeps_the_other_limits(monkeypatch, tmp_path) -> None:
    # systemd delegates cpu, memory and pids to a user's subtree, not cpuset. This machine has
    # no such tree: a directory shaped like one stands in for it (cgroup files are plain files).
    root = tmp_path / "cgroup2"
    delegated = root / "user.slice" / "user-1000.slice"
    (delegated / "session").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu memory pids\n")
    (delegated / "cgroup.subtree_control").write_text("cpu memory pids\n")
    (delegated / "cgroup.procs").write_text("")
    mount = CgroupMount(root, 2, frozenset({"cpuset", "cpu", "memory", "pids"}))
    monkeypatch.setattr(cgroups, "_cgroup_mounts_here", lambda: (mount,))
    monkeypatch.setattr(cgroups, "_own_cgroup_v2_path", lambda: "/user.slice/user-1000.slice/x")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)

    made, enforced = cgroups.create_run_cgroups(Limits(cpus=0.5), cpus=(1,))
    (run_cgroup,) = made
    assert run_cgroup.path.parent == delegated
    assert run_cgroup.controllers == {"cpu", "memory", "pids"}
    assert (run_cgroup.path / "cpu.max").read_text() == "50000 100000"
    assert set(enforced) == {"memory", "pids", "cpus"} and "cgroup v2" in enforced["cpus"]


# --- in the sandbox ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe_rootfs() -> Iterator[Path]:
    base = world_traversable_tmpdir("iex-cpu-")
    root = base / "rootfs"
    for name in ("bin", *MOUNT_POINTS):
        (root / name).mkdir(parents=True)
    probe = root / "bin" / "cpu_probe"
    subprocess.run(
        ["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(probe), PROBE_SOURCE],
        check=True,
        capture_output=True,
    )
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755)
    yield root
    shutil.rmtree(base)


def _run_probe(root: Path, limits: Limits, *args: str) -> tuple[dict[str, str], SandboxResult]:
    output_dir = Path(tempfile.mkdtemp(prefix="output-", dir=root.parent))
    stdout, stderr = bytearray(), bytearray()
    spec = SandboxSpec(root, root / "input", output_dir, ("/bin/cpu_probe", *args), limits)
    result = run_sandbox(spec, on_stdout=stdout.extend, on_stderr=stderr.extend)
    assert result.exit_status == 0, stderr.decode()
    return dict(line.split(" ", 1) for line in stdout.decode().splitlines()), result


@pytest.mark.slow
@pytest.mark.skipif(not V1_CGROUPS_AS_ROOT, reason="needs root and a cgroup v1 cpuset")
def test_the_payload_cannot_widen_its_affinity_beyond_its_cpu(probe_rootfs: Path) -> None:
    values, result = _run_probe(probe_rootfs, Limits(timeout=30), "affinity")
    assert values == {"setaffinity": "0", "allowed": "1"}
    assert result.limits_enforced["cpuset"].startswith("CPU ")
    assert "cpuset" not in result.limits_not_enforced


@pytest.mark.slow
@pytest.mark.skipif(not V1_CGROUPS_AS_ROOT, reason="needs root and a cgroup v1 cpu controller")
def test_a_busy_loop_gets_no_more_than_its_cpu_quota(probe_rootfs: Path) -> None:
    values, result = _run_probe(probe_rootfs, Limits(timeout=30, cpus=0.2), "burn", "1.5")
    # CPU time over wall-clock time: the quota is 20 ms in every 100 ms.
    assert float(values["share"]) <= 0.25
    assert result.limits_enforced["cpus"].startswith("0.2 CPUs of time (cgroup v1")


# --- the front ends -----------------------------------------------------------------------------


def test_cli_cpus_option_reaches_the_record(home: Path, busybox_cid: str, empty_cid: str) -> None:
    # A command never run before: an identical run would come from the result cache.
    command = f"true {secrets.token_hex(4)}"
    result = ipfs_execute(
        home, "--json", "--cpus", "0.5", busybox_cid, empty_cid, "sh", "-c", command
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["limits"]["cpus"] == 0.5
    if V1_CGROUPS_AS_ROOT:
        assert record["limits_enforced"]["cpus"].startswith("0.5 CPUs of time")
    bad = ipfs_execute(home, "--cpus", "0", busybox_cid, empty_cid, "true")
    assert bad.returncode != 0 and "CPU limit" in bad.stderr


def test_magic_cpus_option_and_config(ip) -> None:
    import ipfs_execute_magic as ie

    try:
        ip.run_line_magic("config", "IpfsExecuteMagics.cpus = 0.25")
        assert ie.default_runner().settings.limits.cpus == 0.25
        token = secrets.token_hex(4)
        result = ip.run_cell_magic("ipfs_execute", "$busybox --cpus 0.5", f"true {token}")
        assert result.record.limits["cpus"] == 0.5
    finally:
        ip.run_line_magic("config", "IpfsExecuteMagics.cpus = None")
    assert ie.default_runner().settings.limits.cpus is None
