"""The CLI starts fast: a run loads only what it needs, and the RPC goes over bare sockets.

The figures are the benchmark's (`./run bench`: "warm run through the CLI", "result-cache hit
through the CLI"); these tests hold what they depend on, the modules a process imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import cli_env

from ipfs_execute_magic import rpc_http
from ipfs_execute_magic.errors import IpfsError, UsageError
from ipfs_execute_magic.store import Store

# Runs the CLI on argv[2:], then writes the modules it loaded, as JSON, to the file argv[1].
PROBE = """\
import json, sys
from ipfs_execute_magic.cli import main
status = main(sys.argv[2:])
with open(sys.argv[1], "w") as out:
    json.dump(sorted(sys.modules), out)
sys.exit(status)
"""
# Never on a run's path: the RPC client packages the store does without, and the notebook.
NEVER = ("ipfshttpclient", "requests", "urllib3", "IPython", "ipywidgets", "traitlets")
# Not on a cache hit's path: what only running, staging or a big add needs.
NOT_ON_A_HIT = (
    "h11",
    "http.client",
    "concurrent.futures",
    "pyseccomp",
    "ipfs_execute_magic.duplex_http",
    "ipfs_execute_magic.archive",
    "ipfs_execute_magic.staging",
    "ipfs_execute_magic.staging_cache",
    "ipfs_execute_magic.sandbox.run",
    "ipfs_execute_magic.sandbox.cgroups",
    "ipfs_execute_magic.sandbox.child",
    "ipfs_execute_magic.sandbox.output_area",
)


def modules_of_a_cli_run(home: Path, scratch: Path, *args: str) -> tuple[set[str], str]:
    listing = scratch / f"modules-{len(os.listdir(scratch))}.json"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(listing), *args],
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(listing.read_text())), done.stderr


def loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in names or m in names)


def test_a_cache_hit_loads_neither_the_sandbox_runner_nor_an_http_library(
    home: Path, busybox_cid: str, empty_cid: str, scratch: Path
) -> None:
    args = (busybox_cid, empty_cid, "echo", f"start-up-{os.getpid()}")
    modules_of_a_cli_run(home, scratch, *args)  # recorded
    modules, stderr = modules_of_a_cli_run(home, scratch, *args)
    assert "cache hit" in stderr
    assert loaded(modules, NEVER) == []
    assert loaded(modules, NOT_ON_A_HIT) == []


def test_a_warm_run_loads_no_http_library(
    home: Path, busybox_cid: str, empty_cid: str, scratch: Path
) -> None:
    args = ("--no-cache", busybox_cid, empty_cid, "sh", "-c", "echo x > /output/x")
    modules_of_a_cli_run(home, scratch, *args)  # the first run here compiles the filter
    modules, stderr = modules_of_a_cli_run(home, scratch, *args)
    assert "cache hit" not in stderr
    assert "ipfs_execute_magic.sandbox.run" in modules  # it did run
    # A small /output goes in one plain request: no sender thread, no h11. The seccomp
    # filter is the one an earlier process compiled: no pyseccomp.
    assert loaded(modules, (*NEVER, "h11", "http.client", "ipfs_execute_magic.archive")) == []
    assert "pyseccomp" not in modules


def test_help_loads_no_core_beyond_settings(home: Path, scratch: Path) -> None:
    modules, _ = modules_of_a_cli_run(home, scratch, "--help")
    assert loaded(modules, NEVER) == []
    assert "ipfs_execute_magic.store" not in modules
    assert "ipfs_execute_magic.sandbox.view" not in modules


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (
            "/unix/run/api.sock",
            rpc_http.Endpoint("/run/api.sock", "localhost", 0, False, "localhost"),
        ),
        (
            "/ip4/127.0.0.1/tcp/5001",
            rpc_http.Endpoint(None, "127.0.0.1", 5001, False, "127.0.0.1:5001"),
        ),
        ("/ip6/::1/tcp/5001/http", rpc_http.Endpoint(None, "::1", 5001, False, "[::1]:5001")),
        (
            "/dns/node.example/tcp/443/https",
            rpc_http.Endpoint(None, "node.example", 443, True, "node.example:443"),
        ),
    ],
)
def test_api_multiaddrs(address: str, expected: rpc_http.Endpoint) -> None:
    assert rpc_http.parse_multiaddr(address) == expected


@pytest.mark.parametrize(
    "address", ["http://127.0.0.1:5001", "/ip4/127.0.0.1/udp/5001", "/ip4/127.0.0.1/tcp/x", ""]
)
def test_an_unusable_api_address_is_a_usage_error(address: str) -> None:
    with pytest.raises(UsageError) as error:
        Store(address)
    assert "multiaddr" in str(error.value)


def test_connections_are_kept_alive_and_shared_between_threads(store: Store) -> None:
    versions: list[str] = []

    def ask() -> None:
        for _ in range(20):
            versions.append(str(store._call("/version")["Version"]))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(versions) == 80 and len(set(versions)) == 1
    # One connection per request in flight, never one per request.
    assert 1 <= len(store._rpc._idle) <= 4


def test_a_connection_the_daemon_closed_is_replaced(store: Store) -> None:
    store.version()
    for connection in store._rpc._idle:
        connection.sock.shutdown(2)  # as a daemon closing an idle connection leaves it
    assert store._call("/version")["Version"]


def test_a_streamed_answer_and_an_error_answer(store: Store) -> None:
    cid = store.add_bytes(b"streamed\n" * 100_000, name="big")
    with store.cat_stream(cid) as stream:
        assert stream.read() == b"streamed\n" * 100_000
    with pytest.raises(IpfsError) as error:
        store._call("/files/stat", "/no-such-entry-here", what="/no-such-entry-here")
    assert "/no-such-entry-here" in str(error.value)


@pytest.mark.slow  # starts bwrap
def test_a_bwrap_probe_is_remembered_for_this_binary_uid_namespace_and_boot(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ipfs_execute_magic.sandbox import probe

    monkeypatch.setattr(probe, "_available", False)
    probe.check_available(scratch)
    facts = json.loads((scratch / probe.FACTS_NAME).read_text())
    bwrap = probe.find_bwrap()
    from ipfs_execute_magic.sandbox.child import time_namespace_problem

    assert facts == {
        "key": probe._facts_key(bwrap),
        "version": probe.bwrap_version(),
        "time_namespace": time_namespace_problem() or "",
    }
    assert str(os.geteuid()) in facts["key"] and os.readlink("/proc/self/ns/user") in facts["key"]

    def no_process(*args: object, **kwargs: object) -> None:
        raise AssertionError("the probe ran again")

    # A later process (the flag reset) takes the remembered success: no bwrap is started.
    monkeypatch.setattr(probe, "_available", False)
    monkeypatch.setattr(probe.subprocess, "run", no_process)
    probe.check_available(scratch)
    # The time namespace's probe is remembered too: a run starts no `bwrap --version`.
    assert probe.known_time_namespace[bwrap] == facts["time_namespace"]
    time_namespace_problem.cache_clear()
    monkeypatch.setattr("ipfs_execute_magic.sandbox.child.subprocess.run", no_process)
    assert (time_namespace_problem() or "") == facts["time_namespace"]
    # Remembered for another bwrap, uid, namespace, boot or sysctl: probed again.
    (scratch / probe.FACTS_NAME).write_text(json.dumps({**facts, "key": "elsewhere"}))
    monkeypatch.setattr(probe, "_available", False)
    with pytest.raises(AssertionError, match="the probe ran again"):
        probe.check_available(scratch)


def test_every_sandbox_name_loads_from_its_module() -> None:
    import importlib

    from ipfs_execute_magic import sandbox

    assert set(sandbox._SOURCES) == set(sandbox.__all__)
    for name, (module, attribute) in sandbox._SOURCES.items():
        source = importlib.import_module(f"ipfs_execute_magic.sandbox.{module}")
        assert getattr(sandbox, name) is getattr(source, attribute), name
    with pytest.raises(AttributeError):
        sandbox.no_such_name  # noqa: B018
