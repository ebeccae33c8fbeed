"""The determinism suite: the real CLI, the real Kubo node, real bwrap.

A payload that prints every source the sandbox fixes gives one output CID across runs and
across two staging locations (two data directories sharing the session's node); payloads that
print the wall clock or random bytes give a new CID every run (so a verifier flags them).
Also: staged trees carry fixed times, and the shuffled view that exposes readdir-order
dependence.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import cli_env, ipfs_execute, world_traversable_tmpdir

from ipfs_execute_magic import sandbox
from ipfs_execute_magic.sandbox import SOURCE_DATE_EPOCH, SandboxSpec, run_sandbox
from ipfs_execute_magic.settings import Limits
from ipfs_execute_magic.staging import (
    Stager,
    shuffled_view,
    shuffled_view_problem,
)
from ipfs_execute_magic.staging_cache import StagingCache

PROBES = Path(__file__).resolve().parent.parent / "examples" / "determinism"


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def python_cid(store, image_dir: Path) -> str:
    from ipfs_execute_magic.images import builders as images

    return store.add_path(images.build_python(image_dir))


@pytest.fixture(scope="module")
def probe_input(store) -> str:
    """The probe scripts plus a little tree: files, a subdirectory, a symlink."""
    data = world_traversable_tmpdir("iex-det-input-")
    for script in PROBES.glob("*.sh"):
        shutil.copy(script, data / script.name)
    (data / "numbers.txt").write_text("1\n2\n3\n")
    (data / "sub").mkdir()
    (data / "sub" / "deep.txt").write_text("deep\n")
    (data / "link").symlink_to("numbers.txt")
    try:
        return store.add_path(data)
    finally:
        shutil.rmtree(data)


@pytest.fixture
def two_homes() -> Iterator[tuple[Path, Path]]:
    """Two fresh data directories, hence two staging locations, on the session's node."""
    homes = (world_traversable_tmpdir("iex-det-a-"), world_traversable_tmpdir("iex-det-b-"))
    yield homes
    for home in homes:
        shutil.rmtree(home, ignore_errors=True)


def run_output(home: Path, api: str, *args: str) -> str:
    """The output CID of one forced run (never a result-cache hit)."""
    result = ipfs_execute(home, "--no-cache", *args, env=cli_env(home, IPFS_EXECUTE_API=api))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def files_of(store, cid: str, prefix: str = "") -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for entry in store.ls(cid):
        if entry.kind == "directory":
            found.update(files_of(store, entry.cid, f"{prefix}{entry.name}/"))
        else:
            found[prefix + entry.name] = store.cat(entry.cid)
    return found


def explain_difference(store, first: str, second: str) -> str:
    a, b = files_of(store, first), files_of(store, second)
    lines = [f"{first} != {second}"]
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            lines.append(
                f"--- {name}\n{a.get(name, b'(missing)').decode(errors='replace')}"
                f"+++ {name}\n{b.get(name, b'(missing)').decode(errors='replace')}"
            )
    return "\n".join(lines)


# --- fixed sources: one CID -------------------------------------------------------------------


def test_fixed_sources_give_one_output_across_runs_and_staging_locations(
    store, python_cid: str, probe_input: str, two_homes: tuple[Path, Path]
) -> None:
    # Clocks are fixed only where a time namespace can be made (root); elsewhere the uptime
    # would differ, so it is left out there.
    args = ["sh", "/input/fixed.sh"]
    if sandbox.time_namespace_problem() is None:
        args.append("clocks")
    home_a, home_b = two_homes
    outputs = [
        run_output(home_a, store.api, python_cid, probe_input, *args),
        run_output(home_a, store.api, python_cid, probe_input, *args),
        run_output(home_b, store.api, python_cid, probe_input, *args),
    ]
    assert outputs[1] == outputs[0], explain_difference(store, outputs[0], outputs[1])
    assert outputs[2] == outputs[0], explain_difference(store, outputs[0], outputs[2])

    # And what the payload saw is the fixed view, not merely a stable one.
    seen = files_of(store, outputs[0])
    assert seen["hostname"] == b"sandbox\n"
    assert seen["umask"] == b"0022\n"
    assert seen["pwd"] == b"/\n"
    assert seen["id"].startswith(b"uid=0(root) gid=0(root)")
    assert seen["personality"] == b"00040000\n"
    env = dict(line.split("=", 1) for line in seen["env"].decode().splitlines())
    assert {k: env[k] for k in sandbox.DEFAULT_ENV} == dict(sandbox.DEFAULT_ENV)
    assert seen["cpus"] == f"1\n1\nbtime {SOURCE_DATE_EPOCH}\n".encode()
    python = seen["python"].decode().splitlines()
    assert python[:3] == ["cpu_count 1", "sysconf 1 1", "affinity 1"]
    if "clocks" in args:
        assert seen["uptime"] == b"1\n"
    assert "pending signals                 (-i) 1024" in seen["ulimit"].decode()
    assert "1980-01-01 00:00:00" in seen["input"].decode()
    assert str(SOURCE_DATE_EPOCH) in seen["input"].decode()
    # No host path of either staging location leaks into what the payload wrote.
    everything = b"".join(seen.values())
    for home in two_homes:
        assert str(home).encode() not in everything


# --- impure payloads: a new CID every run ----------------------------------------------------


@pytest.mark.parametrize("probe", ["clock.sh", "random.sh"])
def test_wall_clock_and_random_bytes_give_new_outputs(
    store, busybox_cid: str, probe_input: str, home: Path, probe: str
) -> None:
    first = run_output(home, store.api, busybox_cid, probe_input, "sh", f"/input/{probe}")
    second = run_output(home, store.api, busybox_cid, probe_input, "sh", f"/input/{probe}")
    assert first != second


# --- staging: fixed times ------------------------------------------------------------------------


def _tree_times(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (mode, mtime) of every entry, symlinks themselves included."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            st = path.lstat()
            found[str(path.relative_to(root))] = (stat.S_IMODE(st.st_mode), int(st.st_mtime))
    st = root.lstat()
    found["."] = (stat.S_IMODE(st.st_mode), int(st.st_mtime))
    return found


def test_staged_trees_have_fixed_times_and_modes_wherever_staged(
    store, probe_input: str, busybox_cid: str
) -> None:
    caches = [world_traversable_tmpdir("iex-det-cache-") for _ in range(2)]
    try:
        staged = []
        for cache_root in caches:
            stager = Stager(store, StagingCache(cache_root))
            staged.append(
                (
                    _tree_times(stager.stage_input(probe_input).path),
                    _tree_times(stager.stage_rootfs(busybox_cid).path),
                )
            )
        (input_a, rootfs_a), (input_b, rootfs_b) = staged
        assert input_a == input_b and rootfs_a == rootfs_b
        for tree in (input_a, rootfs_a):
            assert {mtime for _mode, mtime in tree.values()} == {SOURCE_DATE_EPOCH}
        assert input_a["."] == (0o755, SOURCE_DATE_EPOCH)
        assert input_a["numbers.txt"][0] == 0o644 and input_a["sub"][0] == 0o755
        assert input_a["link"][0] == 0o777  # the symlink's own time was set, not its target's
    finally:
        for cache_root in caches:
            shutil.rmtree(cache_root, ignore_errors=True)


# --- the shuffled view ---------------------------------------------------------------------------


@pytest.fixture
def fifty_files() -> Iterator[Path]:
    directory = world_traversable_tmpdir("iex-det-shuffle-")
    for number in range(50):
        (directory / f"file-{number:02d}").write_text(f"{number}\n")
    yield directory
    shutil.rmtree(directory)


def _mounts_but_output_images() -> list[str]:
    # Runs of other test processes on the machine mount and unmount their /output images.
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line for line in lines if " - ext4 /dev/loop" not in line]


def test_shuffled_view_lists_the_same_names_in_another_order(fifty_files: Path) -> None:
    assert (
        shuffled_view_problem() is None
    )  # ./run setup installs disorderfs (with its FUSE dependency)
    plain = os.listdir(fifty_files)
    mounts_before = _mounts_but_output_images()
    with shuffled_view(fifty_files) as view:
        assert view != fifty_files and os.path.ismount(view)
        listings = [os.listdir(view) for _ in range(5)]
        assert (view / "file-07").read_text() == "7\n"
        with pytest.raises(OSError):
            (view / "new").write_text("read-only view\n")
    assert all(sorted(listing) == sorted(plain) for listing in listings)
    assert any(listing != plain for listing in listings)
    assert len({tuple(listing) for listing in listings}) > 1  # a new order at every listing
    assert not view.exists()
    assert _mounts_but_output_images() == mounts_before


def test_the_sandbox_reads_through_a_shuffled_view(
    fifty_files: Path, busybox_tarball: Path
) -> None:
    root = world_traversable_tmpdir("iex-det-root-")
    output = world_traversable_tmpdir("iex-det-out-")
    try:
        subprocess.run(["tar", "-xzf", str(busybox_tarball), "-C", str(root)], check=True)
        out = bytearray()
        with shuffled_view(root) as root_view, shuffled_view(fifty_files) as input_view:
            script = "find /input -type f; cat /input/file-42"
            spec = SandboxSpec(
                root_view,
                input_view,
                output,
                ("/sbin/init", "sh", "-c", script),
                Limits(timeout=30),
            )
            result = run_sandbox(spec, on_stdout=out.extend)
        assert result.exit_status == 0
        *names, content = out.decode().splitlines()
        assert sorted(names) == sorted(f"/input/{name}" for name in os.listdir(fifty_files))
        assert content == "42"
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(output, ignore_errors=True)
