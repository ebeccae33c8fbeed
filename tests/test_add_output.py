"""Adding trees and run outputs: many files, a daemon that stops moving, odd names, entries IPFS
cannot hold, and an add that is interrupted or fails (the output is kept, and added later)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BIN, cli_env, ipfs_execute, recursive_pins
from IPython.utils.capture import capture_output

from ipfs_execute_magic.cid import EMPTY_FILE_CID
from ipfs_execute_magic.errors import IpfsError, OutputNotSavedError
from ipfs_execute_magic.node import EmbeddedNode
from ipfs_execute_magic.record import RunRequest
from ipfs_execute_magic.runner import RunConditions, Runner
from ipfs_execute_magic.store import LeftOut, Store

CLI_IMPORT_FLAGS = ["--cid-version=1", "--raw-leaves", "--chunker=size-1048576"]


def cli_cid(kubo_env: dict[str, str], tree: Path) -> str:
    """What `ipfs add -r --hidden` says the tree's CID is (nothing stored)."""
    return (
        subprocess.run(
            ["ipfs", "add", "-r", "--hidden", "-Q", "--only-hash", *CLI_IMPORT_FLAGS, str(tree)],
            env=kubo_env,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .strip()
    )


@contextlib.contextmanager
def daemon_stopped(settings) -> Iterator[None]:
    """The real node frozen (SIGSTOP): it neither reads nor answers until the block ends."""
    pid = EmbeddedNode(settings).status().pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    backstop = threading.Timer(90, os.kill, (pid, signal.SIGCONT))  # whatever happens
    backstop.start()
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
        backstop.cancel()


@pytest.fixture()
def fast_scratch() -> Iterator[Path]:
    """A directory in memory when there is one: making 100,000 files on disk here can take
    longer than adding them."""
    shm = Path("/dev/shm")
    path = Path(tempfile.mkdtemp(prefix="iex-many-", dir=shm if shm.is_dir() else None))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(120)
def test_a_hundred_thousand_files_are_added(store: Store, fast_scratch: Path) -> None:
    tree = fast_scratch / "many"
    for group in range(100):
        folder = tree / f"g{group:03d}"
        folder.mkdir(parents=True)
        for index in range(1000):
            os.close(os.open(folder / f"f{index:04d}", os.O_CREAT | os.O_WRONLY, 0o644))
    started = time.monotonic()
    cid = store.add_path(tree, pin=False)
    seconds = time.monotonic() - started
    groups = store.ls(cid)
    assert [entry.name for entry in groups] == [f"g{group:03d}" for group in range(100)]
    files = store.ls(groups[-1].cid)
    assert len(files) == 1000 and {entry.cid for entry in files} == {EMPTY_FILE_CID}
    assert seconds < 90, f"adding 100,000 empty files took {seconds:.0f} s"


@pytest.mark.timeout(60)
def test_a_daemon_that_stops_moving_ends_the_add_with_a_clear_error(
    settings, scratch: Path
) -> None:
    tree = scratch / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(8 * 1024 * 1024))  # more than the socket buffers
    with Store.connect(settings) as stalled:
        stalled.add_stall_timeout = 2.0
        with daemon_stopped(settings):
            started = time.monotonic()
            with pytest.raises(IpfsError) as caught:
                stalled.add_path(tree)
            waited = time.monotonic() - started
    assert 2.0 <= waited < 15
    message = str(caught.value)
    assert str(tree) in message and "neither took nor sent a byte for 2 s" in message


def test_names_that_are_not_utf8_are_added_as_they_are(
    store: Store, kubo_env, scratch: Path
) -> None:
    tree = scratch / "names"
    tree.mkdir()
    raw = os.fsencode(tree)
    (Path(os.fsdecode(raw + b"/caf\xe9.txt"))).write_bytes(b"latin-1 name\n")
    os.mkdir(raw + b"/dir-\xff")
    Path(os.fsdecode(raw + b"/dir-\xff/inner")).write_bytes(b"inner\n")
    (tree / "caf\u00e9-utf8.txt").write_bytes(b"utf-8 name\n")
    cid = store.add_path(tree)
    assert cid == cli_cid(kubo_env, tree)
    assert len(store.ls(cid)) == 3


def test_fifos_sockets_and_devices_are_named_not_dropped_silently(
    home: Path, store: Store, scratch: Path
) -> None:
    tree = scratch / "special"
    (tree / "sub").mkdir(parents=True)
    (tree / "data.txt").write_text("kept\n")
    os.mkfifo(tree / "sub" / "pipe")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tree / "sock"))
    expected = {
        LeftOut("sub/pipe", "a named pipe (FIFO)"),
        LeftOut("sock", "a socket"),
    }
    if os.geteuid() == 0:
        os.mknod(tree / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        expected.add(LeftOut("null", "a character device"))
    try:
        added = store.add_tree(tree)
        by_cli = ipfs_execute(home, "add", str(tree))
    finally:
        listener.close()
    assert set(added.left_out) == expected
    assert by_cli.returncode == 0 and by_cli.stdout.strip() == added.cid
    assert f"ipfs-execute add: warning: {tree}/sock: a socket, left out" in by_cli.stderr
    plain = tree.with_name("plain")
    (plain / "sub").mkdir(parents=True)
    (plain / "data.txt").write_text("kept\n")
    assert added.cid == store.add_path(plain)


def test_a_run_warns_of_what_its_output_could_not_hold(
    home: Path, busybox_cid: str, empty_cid: str, kubo_env
) -> None:
    script = "mkfifo /output/pipe; touch \"/output/$(printf 'caf\\351')\"; echo x > /output/x"
    result = ipfs_execute(home, "--json", busybox_cid, empty_cid, "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["output_warnings"] == [
        "/output/pipe: a named pipe (FIFO), left out (IPFS has no form for it)"
    ]
    assert "ipfs-execute: warning: /output/pipe: a named pipe (FIFO), left out" in result.stderr
    listed = subprocess.run(
        ["ipfs", "ls", record["output"]], env=kubo_env, capture_output=True, check=True
    ).stdout
    assert b"caf\xef\xbf\xbd" in listed and b" x\n" in listed  # the odd name, as JSON shows it


def sandbox_processes(marker: str, cli_pid: int) -> list[str]:
    """The payload's processes (the CLI's own command line names the marker too)."""
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [
        line
        for line in listing.splitlines()
        if marker in line and "ps -eo" not in line and int(line.split()[0]) != cli_pid
    ]


def _kept_path(stderr: str) -> Path:
    match = re.search(r"kept at (\S+) \(add it later with: ipfs-execute add \1\)", stderr)
    assert match, stderr
    return Path(match.group(1))


def _add_later(home: Path, kept: Path, kubo_env) -> None:
    """The kept output is whole, and `ipfs-execute add` saves it."""
    assert (kept / "x").read_text() == "made\n"
    added = ipfs_execute(home, "add", str(kept))
    assert added.returncode == 0, added.stderr
    cid = added.stdout.strip()
    cat = subprocess.run(
        ["ipfs", "cat", f"{cid}/x"], env=kubo_env, capture_output=True, text=True, check=True
    )
    assert cat.stdout == "made\n"


@pytest.mark.timeout(120)
def test_ctrl_c_during_the_add_keeps_the_output_and_says_where(
    home: Path, settings, busybox_cid: str, empty_cid: str, kubo_env
) -> None:
    marker = f"interrupt-me-{os.getpid()}"
    script = f"echo made > /output/x; echo ready; sleep 1; : {marker}"
    process = subprocess.Popen(
        [str(BIN / "ipfs-execute"), "--no-cache", busybox_cid, empty_cid, "sh", "-c", script],
        env=cli_env(home),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As a terminal's shell starts it: a suite run in the background by a shell without
        # job control ignores SIGINT, and its children would inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stderr is not None
    printed = ""
    try:
        while "ready" not in printed:  # the payload's stdout comes out on the CLI's stderr
            line = process.stderr.readline()
            assert line, f"the run ended early: {printed}"
            printed += line
        with daemon_stopped(settings):
            # The payload ends; its output is then added.
            while sandbox_processes(marker, process.pid):
                time.sleep(0.1)
            time.sleep(2)  # well into the add, which cannot end: the daemon is frozen
            assert process.poll() is None
            process.send_signal(signal.SIGINT)
            _, rest = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    printed += rest
    assert process.returncode == 130, printed
    kept = _kept_path(printed)
    runs = home / "runs"
    assert not runs.exists() or kept.name not in os.listdir(runs)  # moved, not left behind
    _add_later(home, kept, kubo_env)


@pytest.mark.timeout(120)
def test_a_failed_add_keeps_the_output(
    home: Path, settings, busybox_cid: str, empty_cid: str, kubo_env
) -> None:
    stopped = contextlib.ExitStack()

    def on_stdout(chunk: bytes) -> None:
        if b"ready" in chunk:  # the payload is done with the daemon's help; freeze it
            stopped.enter_context(daemon_stopped(settings))

    with Runner(settings) as runner, stopped:
        runner.store.add_stall_timeout = 2.0
        request = RunRequest(
            rootfs=busybox_cid,
            input=empty_cid,
            args=("sh", "-c", "echo made > /output/x; echo ready; sleep 1"),
        )
        with pytest.raises(OutputNotSavedError) as caught:
            runner.run(request, RunConditions(use_cache=False), on_stdout=on_stdout)
    assert "neither took nor sent a byte for 2 s" in str(caught.value)
    kept = Path(caught.value.kept_path)
    _add_later(home, kept, kubo_env)


def test_a_script_the_node_did_not_store_keeps_the_output_and_is_composed_again(
    home: Path, settings, busybox_cid: str, empty_cid: str, kubo_env, monkeypatch
) -> None:
    """The cell's script is stored while the run starts (Store.add_file_behind): when that
    fails, the run's output is kept as when its own add fails, and the next run of the same
    script stores it again rather than trust a composition the node never got."""
    request = RunRequest(rootfs=busybox_cid, input=empty_cid, script="echo made > /output/x\n")
    with Runner(settings) as runner:
        # Staged (the rootfs, the scripted base): nothing but the script's write is left to
        # fail before the sandbox has run.
        runner.run(RunRequest(rootfs=busybox_cid, input=empty_cid, script="true\n"))
        pin = runner.store.pin

        def refused(cid: str, **kwargs) -> None:
            raise IpfsError(f"IPFS pin/update {cid} failed: the test says no")

        monkeypatch.setattr(runner.store, "pin", refused)
        with pytest.raises(OutputNotSavedError, match="the test says no") as caught:
            runner.run(request, RunConditions(use_cache=False))
        monkeypatch.setattr(runner.store, "pin", pin)
        result = runner.run(request, RunConditions(use_cache=False))
    assert result.record.input in recursive_pins(kubo_env)
    _add_later(home, Path(caught.value.kept_path), kubo_env)


def test_the_magic_and_the_api_name_what_could_not_be_held(ip, scratch: Path) -> None:
    pipe = f"pipe-{os.getpid()}-{time.monotonic_ns()}"  # a new script: no cache hit
    with capture_output():
        cell = ip.run_cell(
            f"%%ipfs_execute $busybox -o held\nmkfifo /output/{pipe}; echo x > /output/x"
        )
    assert cell.error_in_exec is None, cell.error_in_exec
    warning = f"warning: /output/{pipe}: a named pipe (FIFO), left out (IPFS has no form for it)"
    plain, html = (
        ip.display_formatter.format(ip.user_ns["held"])[0][kind]
        for kind in ("text/plain", "text/html")
    )
    assert warning in plain and warning in html

    tree = scratch / "with-a-fifo"
    tree.mkdir()
    (tree / "data").write_text("kept\n")
    os.mkfifo(tree / "pipe")
    left_out = r"with-a-fifo/pipe: a named pipe \(FIFO\), left out"
    with pytest.warns(UserWarning, match=left_out), capture_output():
        ip.run_line_magic("ipfs_add", str(tree))


@pytest.mark.timeout(240)
def test_a_run_that_leaves_a_hundred_thousand_files_is_saved(
    home: Path, store: Store, busybox_cid: str, empty_cid: str
) -> None:
    script = (
        "cd /output && for d in $(seq 100 199); do "
        "mkdir $d && cd $d && seq 1000 1999 | xargs touch && cd ..; done"
    )
    started = time.monotonic()
    result = ipfs_execute(
        home,
        "--no-cache",
        "--timeout",
        "200",
        busybox_cid,
        empty_cid,
        "sh",
        "-c",
        script,
        timeout=230,
    )
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    groups = store.ls(result.stdout.strip())
    assert len(groups) == 100 and len(store.ls(groups[0].cid)) == 1000
    print(f"a run leaving 100,000 files: {seconds:.1f} s")
