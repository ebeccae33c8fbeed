"""Only the owner reaches the embedded node; a user's own daemon gets its credentials.

The intrusion tests run as root and act as another local user (a real account, `setpriv`),
against the session's real node.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BIN, cli_env, world_traversable_tmpdir

from ipfs_execute_magic.cid import raw_leaf_cid
from ipfs_execute_magic.errors import DaemonAuthError, NodeError, UsageError
from ipfs_execute_magic.node import GATEWAY_PORT_NAME, LOCK_NAME, EmbeddedNode, daemon_answers
from ipfs_execute_magic.record import RunRequest
from ipfs_execute_magic.result_cache import CACHE_DIR, OUTPUTS_DIR, ResultCache
from ipfs_execute_magic.runner import Runner
from ipfs_execute_magic.settings import Settings
from ipfs_execute_magic.store import Store, authorization_header

OUTSIDER = "iex-outsider"
KUBO = str(BIN / "ipfs")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acts as another user: needs root")


@pytest.fixture(scope="module")
def outsider() -> tuple[int, int]:
    """A real unprivileged account on this machine: (uid, gid)."""
    try:
        entry = pwd.getpwnam(OUTSIDER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OUTSIDER],
            check=True,
        )
        entry = pwd.getpwnam(OUTSIDER)
    return entry.pw_uid, entry.pw_gid


def as_outsider(ids: tuple[int, int], script: str, plan: str) -> dict:
    """Run a stdlib-only Python script as the outsider, `plan` on its stdin (a node's repo
    lists more files than one argument may hold); it prints one JSON document."""
    uid, gid = ids
    drop = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    completed = subprocess.run(
        [*drop, "/usr/bin/python3", "-c", textwrap.dedent(script)],
        input=plan,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


INTRUDER = """\
    import errno, http.client, json, os, socket, sys

    RPC = ["/api/v0/id", "/api/v0/shutdown", "/api/v0/config?arg=Addresses.API",
           "/api/v0/files/write?arg=/ipfs-execute/cache/forged&create=true"]
    plan = json.loads(sys.stdin.read())

    def outcome(attempt):
        try:
            return attempt()
        except OSError as error:
            return "refused:" + errno.errorcode.get(error.errno, str(error.errno))

    class Unix(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(plan["socket"])

    def post(connection, path):
        connection.request("POST", path, body=b"")
        return "status:%d" % connection.getresponse().status

    def read(path):
        with open(path, "rb") as file:
            file.read(1)
        return "read"

    def open_for_writing(path):
        with open(path, "r+b"):
            return "opened"

    def list_directory(path):
        os.listdir(path)
        return "listed"

    report = {"socket": {}, "tcp": {}, "files": {}}
    for path in RPC:
        report["socket"][path] = outcome(lambda: post(Unix("localhost", timeout=5), path))
        for port in plan["ports"]:
            report["tcp"]["%d%s" % (port, path)] = outcome(
                lambda: post(http.client.HTTPConnection("127.0.0.1", port, timeout=5), path))
    for path in plan["files"]:
        report["files"][path] = outcome(lambda: read(path))
    report["lock_for_writing"] = outcome(lambda: open_for_writing(plan["lock"]))
    report["list_repo"] = outcome(lambda: list_directory(plan["repo"]))
    print(json.dumps(report))
    """


def listening_tcp_ports(pid: int) -> list[int]:
    """The TCP ports process `pid` listens on (from its socket fds and /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(set(ports))


@needs_root
def test_another_user_cannot_reach_the_node_or_read_its_files(
    home: Path, store: Store, outsider: tuple[int, int]
) -> None:
    node = EmbeddedNode(Settings(home=home))
    pid = node.status().pid
    assert pid is not None
    repo = home / "kubo"
    # The fixture makes the data directory world-traversable; the repo inside is private
    # by the tool's own doing.
    assert stat.S_IMODE(repo.stat().st_mode) == 0o700
    lock = repo / LOCK_NAME
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    files = [str(home / "node.log"), str(home / "node.pid")]
    files += [str(Path(top) / name) for top, _, names in os.walk(repo) for name in names]
    socket_path = node.socket_path()
    assert store.api == f"/unix{socket_path}"
    ports = listening_tcp_ports(pid)
    assert ports, "the gateway listens on a loopback port"

    plan = {"socket": str(socket_path), "ports": ports, "files": files}
    report = as_outsider(
        outsider, INTRUDER, json.dumps(plan | {"lock": str(lock), "repo": str(repo)})
    )

    assert set(report["socket"].values()) == {"refused:EACCES"}, report["socket"]
    # The only TCP port is the gateway's: it has no RPC endpoints at all.
    for attempt, result in report["tcp"].items():
        assert result.startswith("status:4"), (attempt, result)
    assert set(report["files"].values()) == {"refused:EACCES"}, report["files"]
    assert report["lock_for_writing"] == "refused:EACCES"
    assert report["list_repo"] == "refused:EACCES"
    # Nothing the outsider tried changed the node: same daemon, same API, nothing written.
    assert node.status().pid == pid and daemon_answers(store.api)
    assert store.mfs_read(f"{CACHE_DIR}/forged") is None


@pytest.mark.slow
def test_a_repo_with_a_tcp_api_is_migrated_to_the_private_socket() -> None:
    home = world_traversable_tmpdir("iex-migrate-")
    repo = home / "kubo"
    env = dict(os.environ, IPFS_PATH=str(repo))
    try:
        # A repo and a running daemon as an older version left them: API on loopback TCP, the
        # gateway on every interface, a world-readable repo.
        subprocess.run(
            [KUBO, "init", "--profile=test,unixfs-v1-2025", "--empty-repo"],
            env=env,
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [KUBO, "config", "--json", "Addresses.Gateway", '"/ip4/0.0.0.0/tcp/0"'],
            env=env,
            check=True,
        )
        repo.chmod(0o755)
        daemon = subprocess.Popen(
            [KUBO, "daemon", "--offline"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        (home / "node.pid").write_text(f"{daemon.pid}\n")
        deadline = time.monotonic() + 30
        while not (repo / "api").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        old_api = (repo / "api").read_text().strip()
        assert old_api.startswith("/ip4/127.0.0.1/tcp/") and daemon_answers(old_api)

        node = EmbeddedNode(Settings(home=home))
        api = node.ensure_running()

        assert api == f"/unix{repo / 'api.sock'}" and daemon_answers(api)
        assert daemon.wait(timeout=30) is not None  # the old daemon was stopped
        assert not daemon_answers(old_api)
        config = json.loads((repo / "config").read_text())
        assert config["Addresses"]["API"] == [api]
        # The gateway on loopback only, on the port kept for this data directory.
        port = (home / GATEWAY_PORT_NAME).read_text().strip()
        assert config["Addresses"]["Gateway"] == [f"/ip4/127.0.0.1/tcp/{port}"]
        assert "Authorizations" not in config["API"]
        assert "Writable" not in config["Gateway"]
        assert stat.S_IMODE(repo.stat().st_mode) == 0o700
        assert stat.S_IMODE((repo / "config").stat().st_mode) == 0o600
        assert stat.S_IMODE((repo / LOCK_NAME).stat().st_mode) == 0o600
        gateway = (repo / "gateway").read_text().strip()
        assert gateway == f"http://127.0.0.1:{port}"
        with Store(api) as store:
            assert store.version() == "0.43.1"
    finally:
        EmbeddedNode(Settings(home=home)).stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_node_files_are_private_whatever_the_umask() -> None:
    home = world_traversable_tmpdir("iex-umask-")
    env = cli_env(home)
    try:
        started = subprocess.run(
            ["sh", "-c", f"umask 000; exec {BIN / 'ipfs-execute'} node start"],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert started.returncode == 0, started.stderr
        repo = home / "kubo"
        assert stat.S_IMODE(repo.stat().st_mode) == 0o700
        for name in ("node.log", "node.pid", f"kubo/{LOCK_NAME}", "kubo/config"):
            assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name
    finally:
        EmbeddedNode(Settings(home=home)).stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("data_dir", ["d" * 90, "My Data"], ids=["too-long", "capitals-space"])
def test_a_socket_path_the_client_cannot_reach_moves_to_a_private_runtime_dir(
    data_dir: str,
) -> None:
    home = world_traversable_tmpdir("iex-socket-") / data_dir
    node = EmbeddedNode(Settings(home=home))
    try:
        with Store.connect(Settings(home=home)) as store:
            assert store.add_bytes(b"reached\n") == raw_leaf_cid(b"reached\n")
        socket_path = node.socket_path()
        assert store.api == f"/unix{socket_path}" and not socket_path.is_relative_to(home)
        assert socket_path.parent.stat().st_uid == os.geteuid()
        assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
    finally:
        node.stop()
        shutil.rmtree(home.parent, ignore_errors=True)


def test_a_socket_path_the_client_would_mangle_is_refused_with_a_way_out() -> None:
    with pytest.raises(UsageError) as error:
        Store("/unix/tmp/My Daemon/api.sock")
    assert "/tmp/My Daemon/api.sock" in str(error.value) and "ln -s" in str(error.value)


HOLD_THE_LOCK = """\
    import sys, time
    from ipfs_execute_magic.node import EmbeddedNode
    from ipfs_execute_magic.settings import Settings

    with EmbeddedNode(Settings(home=sys.argv[1]))._locked():
        print("held", flush=True)
        time.sleep(60)
    """


@pytest.mark.slow
def test_a_held_lock_fails_within_its_deadline_and_names_the_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD_THE_LOCK), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        node = EmbeddedNode(Settings(home=tmp_path), lock_timeout=1.0)
        for attempt in (node.ensure_running, node.stop):
            started = time.monotonic()
            with pytest.raises(NodeError) as error:
                attempt()
            assert time.monotonic() - started < 5
            message = str(error.value)
            assert f"pid {holder.pid} (" in message and "python" in message
            assert str(tmp_path / "kubo" / LOCK_NAME) in message and "kill" in message
    finally:
        holder.kill()
        holder.wait()


# -- the result cache trusts only entries that match --------------------------------------


def test_an_index_entry_naming_another_runs_record_is_not_a_hit(
    settings: Settings, busybox_cid: str
) -> None:
    marker = time.monotonic_ns()
    wanted = RunRequest(rootfs=busybox_cid, args=("sh", "-c", f"echo mine > /output/a #{marker}"))
    other = RunRequest(rootfs=busybox_cid, args=("sh", "-c", f"echo forged > /output/a #{marker}"))
    with Runner(settings) as runner:
        first = runner.run(wanted)
        forged = runner.run(other)
        runner.results.flush()
        key = first.record.key
        assert key and first.record.output and forged.record.output
        # Someone re-links the key, and the first output's lineage, to the other run's record.
        runner.store.mfs_link(f"{CACHE_DIR}/{key}", forged.record_cid)
        runner.store.mfs_link(f"{OUTPUTS_DIR}/{first.record.output}", forged.record_cid)
    with Runner(settings) as runner:  # a fresh process's view: nothing remembered
        assert runner.results.lookup(key) is None
        assert runner.results.record_for_output(first.record.output) is None
        again = runner.run(wanted)
        assert not again.cache_hit and str(again) == str(first)
    with Store.connect(settings) as store, ResultCache(store) as results:  # index repaired
        stored = results.lookup(key)
        assert stored is not None and stored.record.output == first.record.output
        by_output = results.record_for_output(first.record.output)
        assert by_output is not None and by_output.record.key == key


# -- credentials for a user's own daemon ---------------------------------------------------

TOKEN = "t0ken-for-tests"
USER, PASSWORD = "alice", "pass:word"


@pytest.fixture(scope="module")
def guarded_daemon() -> Iterator[str]:
    """A Kubo daemon of the user's own, on loopback TCP, that requires credentials."""
    repo = world_traversable_tmpdir("iex-guarded-")
    env = dict(os.environ, IPFS_PATH=str(repo))
    subprocess.run(
        [KUBO, "init", "--profile=test,unixfs-v1-2025", "--empty-repo"],
        env=env,
        check=True,
        capture_output=True,
    )
    authorizations = {
        "token": {"AuthSecret": f"bearer:{TOKEN}", "AllowedPaths": ["/api/v0"]},
        "alice": {"AuthSecret": f"basic:{USER}:{PASSWORD}", "AllowedPaths": ["/api/v0"]},
    }
    subprocess.run(
        [KUBO, "config", "--json", "API.Authorizations", json.dumps(authorizations)],
        env=env,
        check=True,
    )
    daemon = subprocess.Popen(
        [KUBO, "daemon", "--offline"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (repo / "api").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield (repo / "api").read_text().strip()
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        shutil.rmtree(repo, ignore_errors=True)


def test_kubo_auth_secrets_become_authorization_headers() -> None:
    assert authorization_header("bearer:abc") == "Bearer abc"
    assert authorization_header("abc:def") == "Bearer abc:def"  # no known prefix: bearer
    assert authorization_header("basic:alice:pass:word") == "Basic YWxpY2U6cGFzczp3b3Jk"
    assert authorization_header("basic:YWxpY2U6cGFzczp3b3Jk") == "Basic YWxpY2U6cGFzczp3b3Jk"
    assert "secret" not in repr(Settings(api="/ip4/127.0.0.1/tcp/5001", api_auth="bearer:secret"))


@pytest.mark.slow
def test_a_daemon_that_requires_credentials_gets_them(guarded_daemon: str, tmp_path: Path) -> None:
    with pytest.raises(DaemonAuthError) as refused, Store(guarded_daemon) as store:
        store.version()
    assert "--api-auth" in str(refused.value) and "403" in str(refused.value)
    with Store(guarded_daemon, auth=f"basic:{USER}:{PASSWORD}") as store:
        assert store.version() == "0.43.1"
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "f").write_text("guarded\n")
    with Store(guarded_daemon, auth=f"bearer:{TOKEN}") as store:
        cid = store.add_path(tmp_path / "tree")
        assert store.cat(f"/ipfs/{cid}/f") == b"guarded\n"


@pytest.mark.slow
def test_the_cli_sends_credentials_from_the_option_or_the_environment(
    guarded_daemon: str, tmp_path: Path
) -> None:
    (tmp_path / "f").write_text("guarded\n")
    env = cli_env(tmp_path / "home")
    add = [str(BIN / "ipfs-execute"), "--api", guarded_daemon]
    refused = subprocess.run(
        [*add, "add", str(tmp_path / "f")], env=env, capture_output=True, text=True
    )
    assert refused.returncode == 125 and "--api-auth" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    by_option = subprocess.run(
        [*add, "--api-auth", f"bearer:{TOKEN}", "add", str(tmp_path / "f")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert by_option.returncode == 0, by_option.stderr
    by_env = subprocess.run(
        [*add, "add", str(tmp_path / "f")],
        env=env | {"IPFS_EXECUTE_API_AUTH": f"basic:{USER}:{PASSWORD}"},
        capture_output=True,
        text=True,
    )
    assert by_env.returncode == 0 and by_env.stdout == by_option.stdout
    credentials = ["--api", guarded_daemon, "--api-auth", f"bearer:{TOKEN}"]
    mkdir = subprocess.run(
        [str(BIN / "ipfs-mkdir"), *credentials, "f", by_option.stdout.strip()],
        env=env,
        capture_output=True,
        text=True,
    )
    assert mkdir.returncode == 0, mkdir.stderr


def test_the_magic_sends_configured_credentials(ip, guarded_daemon: str, tmp_path: Path) -> None:
    import ipfs_execute_magic as ie

    (tmp_path / "f").write_text("guarded\n")
    try:
        ip.run_cell(f"%config IpfsExecuteMagics.api = {guarded_daemon!r}")
        ip.run_cell(f"%config IpfsExecuteMagics.api_auth = 'bearer:{TOKEN}'")
        assert ie.default_runner().settings.api_auth == f"bearer:{TOKEN}"
        result = ip.run_cell(f"%ipfs_add {tmp_path / 'f'} -o guarded_file")
        assert result.error_in_exec is None, result.error_in_exec
        assert str(ip.user_ns["guarded_file"]).startswith("bafk")
    finally:
        ip.run_cell("%config IpfsExecuteMagics.api_auth = ''")
        ip.run_cell("%config IpfsExecuteMagics.api = ''")
    assert ie.default_runner().settings.api is None
