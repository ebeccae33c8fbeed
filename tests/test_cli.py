"""`ipfs-execute` end to end: the real console script, the real Kubo node, real bwrap."""

from __future__ import annotations

import fcntl
import gzip
import io
import json
import os
import pty
import select
import struct
import subprocess
import tarfile
import termios
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import BIN, cli_env, ipfs_execute, left_run_dirs, world_traversable_tmpdir

from ipfs_execute_magic.cid import EMPTY_DIRECTORY_CID
from ipfs_execute_magic.errors import EXIT_TIMEOUT, EXIT_TOOL_FAILURE, EXIT_USAGE


def leftovers(home: Path) -> list[str]:
    """Anything a finished run should not leave behind."""
    found = [f"run dir {p}" for p in left_run_dirs(home)]
    tmp = home / "cache" / "tmp"
    if tmp.exists():
        found += [f"cache temp {p}" for p in tmp.iterdir() if not p.name.endswith(".lock")]
    return found


def sandbox_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


def test_original_session_blabla(home: Path, busybox_cid: str, empty_cid: str, kubo_env) -> None:
    result = ipfs_execute(home, busybox_cid, empty_cid, "sh", "-c", "echo blabla > /output/test")
    assert result.returncode == 0, result.stderr
    cid = result.stdout.strip()
    assert len(cid.splitlines()) == 1  # only the CID on stdout
    cat = subprocess.run(
        ["ipfs", "cat", f"{cid}/test"], env=kubo_env, capture_output=True, text=True, check=True
    )
    assert cat.stdout == "blabla\n"
    assert leftovers(home) == []


def test_payload_output_goes_to_stderr_and_options_after_input_are_verbatim(
    home: Path, busybox_cid: str, empty_cid: str
) -> None:
    result = ipfs_execute(
        home,
        busybox_cid,
        empty_cid,
        "sh",
        "-c",
        'echo out; echo err >&2; echo "$@" > /output/args',
        "sh",
        "--timeout",
        "1",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert "out\n" in result.stderr and "err\n" in result.stderr
    assert "out" not in result.stdout
    cid = result.stdout.strip()
    from ipfs_execute_magic.settings import Settings
    from ipfs_execute_magic.store import Store

    with Store.connect(Settings(home=home)) as store:
        assert store.cat(f"{cid}/args") == b"--timeout 1 --json\n"


def test_exit_status_passthrough_keeps_output(
    home: Path, busybox_cid: str, empty_cid: str, store
) -> None:
    result = ipfs_execute(
        home, busybox_cid, empty_cid, "sh", "-c", "echo partial > /output/p; exit 3"
    )
    assert result.returncode == 3
    assert store.cat(f"{result.stdout.strip()}/p") == b"partial\n"


def test_json_record(home: Path, busybox_cid: str, empty_cid: str) -> None:
    result = ipfs_execute(
        home,
        "--json",
        "--timeout",
        "30",
        busybox_cid,
        empty_cid,
        "sh",
        "-c",
        "echo 1 > /output/one",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["rootfs"] == busybox_cid and record["input"] == empty_cid
    assert record["output"].startswith("bafy")
    assert record["args"] == ["sh", "-c", "echo 1 > /output/one"]
    assert record["exit_status"] == 0 and record["timed_out"] is False
    assert record["limits"]["timeout"] == 30
    assert "timeout" in record["limits_enforced"]
    assert set(record["durations"]) >= {"resolve", "stage_rootfs", "sandbox", "add_output", "total"}
    assert record["versions"]["kubo"] == "0.43.1"


def test_chaining_an_output_rootfs(
    home: Path, busybox_cid: str, busybox_tarball: Path, store
) -> None:
    # A run whose output is a new image: the busybox image plus /etc/motd.
    data = world_traversable_tmpdir("iex-chain-")
    (data / "rootfs.tar.gz").write_bytes(busybox_tarball.read_bytes())
    input_cid = store.add_path(data)
    build = ipfs_execute(
        home,
        busybox_cid,
        input_cid,
        "sh",
        "-c",
        "mkdir /tmp/r && tar xzf /input/rootfs.tar.gz -C /tmp/r && "
        "echo chained > /tmp/r/etc/motd && "
        "tar czf /output/rootfs.tar.gz -C /tmp/r .",
    )
    assert build.returncode == 0, build.stderr
    image = build.stdout.strip()
    use = ipfs_execute(
        home,
        f"{image}/rootfs.tar.gz",
        store.empty_directory(),
        "sh",
        "-c",
        "cat /etc/motd > /output/motd",
    )
    assert use.returncode == 0, use.stderr
    assert store.cat(f"{use.stdout.strip()}/motd") == b"chained\n"


def test_input_is_read_only_and_root_is_read_only(home: Path, busybox_cid: str, store) -> None:
    data = world_traversable_tmpdir("iex-ro-")
    (data / "in.txt").write_text("data\n")
    input_cid = store.add_path(data)
    script = (
        "cat /input/in.txt > /output/copy; "
        "(echo x > /input/in.txt) 2>/dev/null && echo input-writable >> /output/bad; "
        "(echo x > /etc/x) 2>/dev/null && echo root-writable >> /output/bad; "
        "(echo 1 > /proc/sys/kernel/hostname) 2>/dev/null && echo sys-writable >> /output/bad; "
        "grep CapEff /proc/self/status > /output/caps; "
        "(wget -q -T 2 -O- http://1.1.1.1/ || nc -w 2 1.1.1.1 80 </dev/null) "
        ">/dev/null 2>&1 && echo network >> /output/bad; "
        "hostname > /output/hostname; true"
    )
    result = ipfs_execute(home, busybox_cid, input_cid, "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    out = result.stdout.strip()
    names = {e.name for e in store.ls(out)}
    assert "bad" not in names, store.cat(f"{out}/bad")
    assert store.cat(f"{out}/copy") == b"data\n"
    assert store.cat(f"{out}/caps").split() == [b"CapEff:", b"0000000000000000"]
    assert store.cat(f"{out}/hostname") == b"sandbox\n"


def test_timeout_kills_everything(home: Path, busybox_cid: str, empty_cid: str, store) -> None:
    marker = f"iex-timeout-{os.getpid()}-{time.monotonic_ns()}"
    started = time.monotonic()
    result = ipfs_execute(
        home,
        "--timeout",
        "2",
        busybox_cid,
        empty_cid,
        "sh",
        "-c",
        f"echo before > /output/b; setsid sh -c 'sleep 1000 # {marker}' & sleep 1000 # {marker}",
    )
    elapsed = time.monotonic() - started
    assert result.returncode == EXIT_TIMEOUT, result.stderr
    assert elapsed < 15
    assert "killed" in result.stderr
    assert store.cat(f"{result.stdout.strip()}/b") == b"before\n"  # partial output kept
    time.sleep(0.3)
    assert sandbox_processes(marker) == []
    assert leftovers(home) == []


def test_usage_errors_exit_2(home: Path, busybox_cid: str) -> None:
    assert ipfs_execute(home).returncode == EXIT_USAGE
    only_rootfs = ipfs_execute(home, busybox_cid)
    assert only_rootfs.returncode == EXIT_USAGE and "INPUT" in only_rootfs.stderr
    bad_cid = ipfs_execute(home, "not-a-cid", busybox_cid, "true")
    assert bad_cid.returncode == EXIT_USAGE
    assert "not-a-cid" in bad_cid.stderr and len(bad_cid.stderr.strip().splitlines()) == 1
    bad_option = ipfs_execute(home, "--timeout", "soon", busybox_cid, busybox_cid)
    assert bad_option.returncode == EXIT_USAGE
    input_file = ipfs_execute(home, busybox_cid, busybox_cid, "true")
    assert input_file.returncode == EXIT_USAGE and "not a directory" in input_file.stderr


def test_tool_failures_exit_125_with_one_line(
    home: Path, busybox_cid: str, empty_cid: str, store
) -> None:
    not_archive = store.add_bytes(b"this is not an archive at all\n" * 10)
    result = ipfs_execute(home, not_archive, empty_cid, "true")
    assert result.returncode == EXIT_TOOL_FAILURE
    assert not_archive in result.stderr and len(result.stderr.strip().splitlines()) == 1

    # A valid archive without /sbin/init.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("bin/")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    no_init = store.add_bytes(buffer.getvalue())
    result = ipfs_execute(home, no_init, empty_cid, "true")
    assert result.returncode == EXIT_TOOL_FAILURE
    assert "/sbin/init" in result.stderr and len(result.stderr.strip().splitlines()) == 1

    # Corrupt: a truncated gzip stream.
    whole = gzip.compress(b"\0" * 100_000)
    cut = store.add_bytes(whole[: len(whole) // 2])
    result = ipfs_execute(home, cut, empty_cid, "true")
    assert result.returncode == EXIT_TOOL_FAILURE and cut in result.stderr


def test_malicious_archive_names_member_and_leaves_host_untouched(
    home: Path, empty_cid: str, store
) -> None:
    victim = world_traversable_tmpdir("iex-victim-")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        link = tarfile.TarInfo("escape")
        link.type = tarfile.SYMTYPE
        link.linkname = str(victim)
        tar.addfile(link)
        payload = b"pwned"
        member = tarfile.TarInfo("escape/owned.txt")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    evil = store.add_bytes(buffer.getvalue())
    result = ipfs_execute(home, evil, empty_cid, "true")
    assert result.returncode == EXIT_TOOL_FAILURE
    assert "escape/owned.txt" in result.stderr
    assert list(victim.iterdir()) == []
    assert leftovers(home) == []


def test_eight_concurrent_runs_share_a_cold_cache(busybox_cid: str, store, settings) -> None:
    # A fresh data directory (cold cache) that uses the session's node as "own daemon".
    home = world_traversable_tmpdir("iex-concurrent-")
    env = cli_env(home, IPFS_EXECUTE_API=store.api)
    inputs = []
    for index in range(8):
        folder = world_traversable_tmpdir("iex-in-")
        (folder / "n").write_text(f"{index}\n")
        inputs.append(store.add_path(folder))

    def one(index: int) -> tuple[int, subprocess.CompletedProcess]:
        return index, ipfs_execute(
            home,
            busybox_cid,
            inputs[index],
            "sh",
            "-c",
            "cat /input/n > /output/n; echo done >> /output/n",
            env=env,
        )

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for index, result in results:
        assert result.returncode == 0, result.stderr
        assert store.cat(f"{result.stdout.strip()}/n") == f"{index}\ndone\n".encode()
    assert len(list((home / "cache" / "rootfs").iterdir())) == 1
    assert leftovers(home) == []


def test_interactive_terminal_stdin(home: Path, busybox_cid: str, empty_cid: str, store) -> None:
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [str(BIN / "ipfs-execute"), busybox_cid, empty_cid, "sh"],
        stdin=secondary,
        stdout=subprocess.PIPE,
        stderr=secondary,
        env=cli_env(home),
        text=True,
    )
    os.close(secondary)
    os.write(primary, b"echo typed > /output/typed\nexit 0\n")
    # Drain the terminal so the sandbox never blocks writing to it.
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([primary], [], [], 0.1)
            if ready:
                try:
                    os.read(primary, 4096)
                except OSError:
                    return

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    out, _ = process.communicate(timeout=60)
    stop.set()
    os.close(primary)
    assert process.returncode == 0
    assert store.cat(f"{out.strip()}/typed") == b"typed\n"


def test_ipfs_mkdir_composes_like_the_original(home: Path, store, kubo_env) -> None:
    folder = world_traversable_tmpdir("iex-mkdir-")
    (folder / "a.txt").write_text("A\n")
    file_cid = store.add_path(folder / "a.txt")
    dir_cid = store.add_path(folder)
    result = subprocess.run(
        [str(BIN / "ipfs-mkdir"), "a.txt", file_cid, "sub/dir", dir_cid],
        env=cli_env(home),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    cid = result.stdout.strip()
    assert store.cat(f"{cid}/a.txt") == b"A\n"
    assert store.cat(f"{cid}/sub/dir/a.txt") == b"A\n"
    odd = subprocess.run(
        [str(BIN / "ipfs-mkdir"), "a.txt"], env=cli_env(home), capture_output=True, text=True
    )
    assert odd.returncode == EXIT_USAGE


def test_help_is_complete() -> None:
    result = subprocess.run([str(BIN / "ipfs-execute"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for word in (
        "ROOTFS",
        "INPUT",
        "--timeout",
        "--api",
        "--json",
        "--memory",
        "124",
        "125",
        "node status",
    ):
        assert word in result.stdout
    mkdir_help = subprocess.run([str(BIN / "ipfs-mkdir"), "--help"], capture_output=True, text=True)
    assert mkdir_help.returncode == 0 and "NAME PATH" in mkdir_help.stdout


@pytest.mark.timeout(120)
def test_daemon_dying_mid_run_keeps_the_output(busybox_tarball: Path) -> None:
    # Its own embedded node, so killing it does not disturb the other tests.
    home = world_traversable_tmpdir("iex-dying-")
    env = cli_env(home)
    add = subprocess.run(
        [str(BIN / "ipfs-execute"), "add", str(busybox_tarball)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    busybox = add.stdout.strip()
    process = subprocess.Popen(
        [
            str(BIN / "ipfs-execute"),
            busybox,
            "/ipfs/bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354",
            "sh",
            "-c",
            "echo precious > /output/result; sleep 3",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    time.sleep(1.5)
    pid = int((home / "node.pid").read_text())
    os.kill(pid, 9)
    out, err = process.communicate(timeout=60)
    assert process.returncode == EXIT_TOOL_FAILURE, err
    assert out == ""
    kept = [line for line in err.split() if "kept-outputs" in line]
    assert kept, err
    kept_path = Path(kept[0].rstrip(";)"))
    assert (kept_path / "result").read_text() == "precious\n"
    # A retry adds it (the node restarts on demand).
    retry = subprocess.run(
        [str(BIN / "ipfs-execute"), "add", str(kept_path)], env=env, capture_output=True, text=True
    )
    assert retry.returncode == 0, retry.stderr
    subprocess.run(
        [str(BIN / "ipfs-execute"), "node", "stop"], env=env, check=True, capture_output=True
    )


def test_bwrap_missing_says_how_to_fix(
    home: Path, busybox_cid: str, empty_cid: str, tmp_path: Path
) -> None:
    # A PATH with everything the tool needs except bwrap.
    fake_bin = world_traversable_tmpdir("iex-nobwrap-")
    env = cli_env(home, PATH=f"{BIN}:{fake_bin}")
    result = ipfs_execute(home, busybox_cid, empty_cid, "true", env=env)
    assert result.returncode == EXIT_TOOL_FAILURE
    assert "bubblewrap" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_user_namespaces_disabled_says_how_to_fix(
    home: Path, busybox_cid: str, empty_cid: str
) -> None:
    """With user.max_user_namespaces=0, bwrap cannot start: the tool says which sysctl to set.

    The host's sysctl is not writable from here (nor should a test flip it for the whole
    machine), so the tool runs in a user namespace of its own, where root may set the limit
    for everything below it, and uid 65534 is mapped so the privilege drop still works.
    """
    # Once the uid map is written, exec again: the new program starts as uid 0 of the
    # namespace, with its capabilities (the first exec happened while still unmapped).
    inner = (
        f"echo 0 > /proc/sys/user/max_user_namespaces && "
        f"exec {BIN / 'ipfs-execute'} {busybox_cid} {empty_cid} true"
    )
    script = f'read go && exec sh -c "{inner}"'
    child = subprocess.Popen(
        ["unshare", "--user", "--", "sh", "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(home),
    )
    own_namespace = os.readlink("/proc/self/ns/user")
    deadline = time.monotonic() + 10
    while os.readlink(f"/proc/{child.pid}/ns/user") == own_namespace:
        assert time.monotonic() < deadline, "the child never entered its user namespace"
        time.sleep(0.01)
    for kind in ("uid", "gid"):
        Path(f"/proc/{child.pid}/{kind}_map").write_text("0 0 65536\n")
    out, err = child.communicate("go\n", timeout=60)
    assert child.returncode == EXIT_TOOL_FAILURE, err
    assert out == ""
    assert "max_user_namespaces" in err and len(err.strip().splitlines()) == 1, err


def test_rootfs_formats_tar_zst_and_directory(
    home: Path, busybox_tarball: Path, empty_cid: str, store
) -> None:
    scratch = world_traversable_tmpdir("iex-formats-")
    raw_tar = scratch / "busybox.tar"
    raw_tar.write_bytes(gzip.decompress(busybox_tarball.read_bytes()))
    subprocess.run(["zstd", "-q", "-o", str(scratch / "busybox.tar.zst"), str(raw_tar)], check=True)
    unpacked = scratch / "root"
    unpacked.mkdir()
    subprocess.run(["tar", "xf", str(raw_tar), "-C", str(unpacked)], check=True)
    rootfs_cids = {
        "tar": store.add_path(raw_tar),
        "zst": store.add_path(scratch / "busybox.tar.zst"),
        "dir": store.add_path(unpacked),  # a directory CID used as the root itself
    }
    for kind, rootfs in rootfs_cids.items():
        result = ipfs_execute(home, rootfs, empty_cid, "sh", "-c", f"echo {kind} > /output/kind")
        assert result.returncode == 0, (kind, result.stderr)
        assert store.cat(f"{result.stdout.strip()}/kind") == f"{kind}\n".encode()


def test_rootfs_with_a_symlinked_mount_point_is_refused(home: Path, empty_cid: str, store) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("sbin/", "input/", "output/"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        init = tarfile.TarInfo("sbin/init")
        init.size, init.mode = 10, 0o755
        tar.addfile(init, io.BytesIO(b"#!/bin/sh\n"))
        link = tarfile.TarInfo("tmp")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tar.addfile(link)
    rootfs = store.add_bytes(buffer.getvalue())
    result = ipfs_execute(home, rootfs, empty_cid, "true")
    assert result.returncode == EXIT_TOOL_FAILURE
    assert "/tmp is a symlink" in result.stderr
    assert leftovers(home) == []


def test_failed_payload_leaves_nothing_behind(home: Path, busybox_cid: str, empty_cid: str) -> None:
    result = ipfs_execute(
        home,
        busybox_cid,
        empty_cid,
        "sh",
        "-c",
        "mkdir -p /output/ro/sub && chmod 0500 /output/ro/sub /output/ro; exit 7",
    )
    assert result.returncode == 7
    assert leftovers(home) == []


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_unretrievable_cid_fails_within_the_fetch_timeout() -> None:
    # An online node (no bootstrap peers: nobody has the CID) waits for providers; the fetch
    # timeout bounds the wait and the error names the CID.
    home = world_traversable_tmpdir("iex-online-")
    from ipfs_execute_magic.node import EmbeddedNode
    from ipfs_execute_magic.settings import Settings

    node = EmbeddedNode(Settings(home=home, online=True))
    api = node.ensure_running()
    try:
        unknown = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
        started = time.monotonic()
        # The input is the empty directory: a raw CID is a file, refused as an input at once.
        result = ipfs_execute(
            home, "--api", api, "--fetch-timeout", "3", unknown, EMPTY_DIRECTORY_CID, "true"
        )
        elapsed = time.monotonic() - started
        assert result.returncode == EXIT_TOOL_FAILURE
        assert unknown in result.stderr and "3 s" in result.stderr, result.stderr
        assert elapsed < 20
    finally:
        node.stop()


def test_version_and_no_stdin(home: Path, busybox_cid: str, empty_cid: str) -> None:
    version = ipfs_execute(home, "--version")
    assert version.returncode == 0 and version.stdout.startswith("ipfs-execute ")
    # With a terminal on stdin a run is interactive, hence never cached; --no-stdin keeps it pure.
    primary, secondary = pty.openpty()
    try:
        results = [
            subprocess.run(
                [
                    str(BIN / "ipfs-execute"),
                    "--no-stdin",
                    busybox_cid,
                    empty_cid,
                    "sh",
                    "-c",
                    f"echo {os.getpid()} > /output/p",
                ],
                stdin=secondary,
                capture_output=True,
                text=True,
                env=cli_env(home),
                timeout=60,
            )
            for _ in range(2)
        ]
    finally:
        os.close(primary)
        os.close(secondary)
    assert [r.returncode for r in results] == [0, 0]
    assert "cache hit" in results[1].stderr


def test_an_unreadable_output_is_still_added(
    home: Path, busybox_cid: str, empty_cid: str, store
) -> None:
    result = ipfs_execute(
        home,
        busybox_cid,
        empty_cid,
        "sh",
        "-c",
        "mkdir /output/d && echo secret > /output/d/f && chmod 000 /output/d/f /output/d",
    )
    assert result.returncode == 0, result.stderr
    assert store.cat(f"{result.stdout.strip()}/d/f") == b"secret\n"


def test_make_readable_gives_the_owner_access_without_following_links() -> None:
    # As an ordinary user the tool cannot read a file the payload made mode 000; the runner
    # gives the owner read (and search) access before adding /output.
    from ipfs_execute_magic.runner import _make_readable

    root = world_traversable_tmpdir("iex-perms-")
    (root / "d").mkdir()
    (root / "d" / "f").write_text("x")
    outside = world_traversable_tmpdir("iex-outside-")
    (outside / "keep").write_text("y")
    (outside / "keep").chmod(0o000)
    os.symlink(outside / "keep", root / "link")
    (root / "d" / "f").chmod(0o000)
    (root / "d").chmod(0o000)
    _make_readable(root)
    assert (root / "d").stat().st_mode & 0o700 == 0o700
    assert (root / "d" / "f").stat().st_mode & 0o400
    assert (outside / "keep").stat().st_mode & 0o777 == 0  # the link was not followed


def test_concurrent_first_uses_share_one_embedded_daemon(busybox_tarball: Path) -> None:
    home = world_traversable_tmpdir("iex-share-")
    env = cli_env(home)
    starters = [
        subprocess.Popen(
            [str(BIN / "ipfs-execute"), "node", "start"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        apis = {process.communicate(timeout=90)[0].strip() for process in starters}
        assert all(process.returncode == 0 for process in starters)
        assert len(apis) == 1  # every process got the same daemon
        repo = str(home / "kubo")
        daemons = [
            pid
            for pid in os.listdir("/proc")
            if pid.isdigit() and _cmdline(pid)[:2] == ["ipfs", "daemon"] and _env_has(pid, repo)
        ]
        assert len(daemons) == 1, daemons
    finally:
        subprocess.run(
            [str(BIN / "ipfs-execute"), "node", "stop"], env=env, check=False, capture_output=True
        )


def _cmdline(pid: str) -> list[str]:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []
    return [Path(words[0].decode()).name, *(w.decode() for w in words[1:2])]


def _env_has(pid: str, repo: str) -> bool:
    try:
        return f"IPFS_PATH={repo}".encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def test_add_shows_progress_only_on_a_terminal(home: Path, scratch: Path) -> None:
    tree = scratch / "progress-add"
    for group in range(20):
        (tree / f"g{group:02d}").mkdir(parents=True)
        for index in range(100):
            (tree / f"g{group:02d}" / f"f{index:03d}").write_text(f"{group}-{index}\n")
    with open(tree / "big.bin", "wb") as handle:
        handle.truncate(300 * 1024 * 1024)  # sparse: cheap to make, seconds to add

    plain = ipfs_execute(home, "add", str(tree))
    assert plain.returncode == 0, plain.stderr
    assert plain.stderr == ""  # not a terminal: no progress line, nothing extra
    cid = plain.stdout.strip()

    primary, secondary = pty.openpty()
    # A terminal 200 columns wide, so that the line is not cut to its tail.
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    seen = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the last holder of the terminal's other end closed it
                return
            if not chunk:
                return
            seen.extend(chunk)

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    try:
        shown = subprocess.run(
            [str(BIN / "ipfs-execute"), "add", str(tree)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=secondary,
            env=cli_env(home),
            text=True,
            timeout=120,
        )
    finally:
        os.close(secondary)
        drainer.join(10)
        os.close(primary)
    assert shown.returncode == 0 and shown.stdout.strip() == cid  # stdout stays the CID alone
    terminal = seen.decode()
    assert f"adding {tree}: " in terminal and "of 2,001 files" in terminal, terminal
    assert "MB/s" in terminal
    assert terminal.endswith("\r\x1b[K")  # the line is cleared once the CID is known


def test_node_status_of_the_embedded_node_and_of_your_own_daemon(home: Path, store) -> None:
    from ipfs_execute_magic.node import stored_gateway_url

    gateway = stored_gateway_url(home)
    assert gateway is not None and gateway.startswith("http://127.0.0.1:")
    status = ipfs_execute(home, "node", "status")
    assert status.returncode == 0, status.stderr
    lines = dict(line.split(":", 1) for line in status.stdout.splitlines() if ":" in line)
    assert lines["node"].strip().startswith("embedded, running (pid ")
    assert lines["api"].strip() == store.api
    assert lines["gateway"].strip() == gateway
    assert lines["links"].strip().startswith(f"{gateway} ")
    assert lines["repo"].strip() == str(home / "kubo")
    assert lines["size"].strip().endswith(("KiB", "MiB", "GiB"))

    # The same node as "your own daemon": API and gateway from its config, size from the API.
    own = ipfs_execute(
        home,
        "node",
        "status",
        "--gateway",
        "https://dweb.link",
        "--gateway-style",
        "subdomain",
        env=cli_env(home, IPFS_EXECUTE_API=store.api),
    )
    assert own.returncode == 0, own.stderr
    lines = dict(line.split(":", 1) for line in own.stdout.splitlines() if ":" in line)
    assert lines["node"].strip() == "your own daemon (IPFS_EXECUTE_API / --api), answers"
    assert lines["api"].strip() == store.api
    assert lines["gateway"].strip() == gateway
    assert lines["links"].strip().startswith("https://dweb.link, subdomain style")
    assert "repo" not in lines and lines["size"].strip().endswith(("KiB", "MiB", "GiB"))

    # Nothing answers there: said, not an error.
    gone = ipfs_execute(
        home, "node", "status", env=cli_env(home, IPFS_EXECUTE_API="/ip4/127.0.0.1/tcp/9")
    )
    assert gone.returncode == 0, gone.stderr
    assert "does not answer" in gone.stdout


def test_a_closed_pipe_ends_cache_list_quietly(
    home: Path, busybox_cid: str, empty_cid: str
) -> None:
    # At least one cached run to list.
    run = ipfs_execute(home, busybox_cid, empty_cid, "sh", "-c", "echo piped > /output/p")
    assert run.returncode == 0, run.stderr
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written, as `| head` ends
    try:
        listed = subprocess.run(
            [str(BIN / "ipfs-execute"), "cache", "list"],
            env=cli_env(home),
            stdout=write_end,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert listed.stderr == ""
    assert listed.returncode == 128 + 13  # as a command SIGPIPE stopped
    # Through a shell pipeline too: `head` takes one line and the rest ends quietly.
    shell = subprocess.run(
        ["sh", "-c", "ipfs-execute cache list | head -n 1"],
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shell.returncode == 0 and shell.stderr == "" and len(shell.stdout.splitlines()) == 1


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["lst"], "unknown command 'lst' (one of: add, get, verify,"),
        (["nod", "status"], "unknown command 'nod' (did you mean node?)"),
        (["cache", "lst"], "unknown command 'lst' (did you mean list?)"),
        (["node", "stauts"], "unknown command 'stauts' (did you mean status?)"),
        (["node", "--gateway", "https://x.example", "statuss"], "(did you mean status?)"),
        (["frobnicate"], "unknown command 'frobnicate' (one of: add, get,"),
    ],
)
def test_a_mistyped_command_names_the_closest(
    tmp_path: Path, words: list[str], expected: str
) -> None:
    result = ipfs_execute(tmp_path, *words)
    assert result.returncode == EXIT_USAGE
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""
