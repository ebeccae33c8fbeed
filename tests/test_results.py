"""Run records, the result cache, sharing it between nodes, verification and lineage."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import ClassVar

import pytest
from helpers import BIN, cli_env, ipfs_execute, world_traversable_tmpdir

from ipfs_execute_magic.record import RunRecord, RunRequest, cache_key
from ipfs_execute_magic.runner import Runner
from ipfs_execute_magic.settings import Limits, Settings


@pytest.fixture(scope="module")
def runner(settings) -> Runner:
    active = Runner(settings)
    yield active
    active.close()


def unique(text: str) -> str:
    """A payload that no other test runs, so the cache starts cold for it."""
    return f"{text} # {time.monotonic_ns()}"


def test_record_is_readable_json_in_ipfs(runner: Runner, busybox_cid: str, store) -> None:
    script = unique("echo hello; echo oops >&2; echo data > /output/f")
    result = runner.run(RunRequest(rootfs=busybox_cid, args=("sh", "-c", script)))
    assert result.record_cid and not result.cache_hit
    # The run did not wait for its record's round trip: its CID is computed, the record is
    # written in the background, and is in the node once the writes are flushed.
    runner.results.flush()
    document = json.loads(store.cat(result.record_cid))
    assert store.cat(result.record_cid) == result.record.to_json().encode()
    assert document["output"] == str(result) and document["rootfs"] == busybox_cid
    assert document["args"] == ["sh", "-c", script]
    assert document["exit_status"] == 0
    assert store.cat(document["stdout"]) == b"hello\n"
    assert store.cat(document["stderr"]) == b"oops\n"
    assert document["env"]["PATH"].startswith("/usr/local/sbin")
    assert set(document["versions"]) >= {"ipfs-execute", "bwrap", "kubo", "kernel", "machine"}
    assert "timeout" in document["limits_enforced"]
    assert document["key"] == RunRecord.from_json(store.cat(result.record_cid)).recomputed_key()


def test_a_record_that_cannot_be_stored_is_said_when_the_writes_are_flushed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The background write of a record failing (the daemon gone, say) loses no output but the
    record: that is said on stderr, with what to do. A store that refuses every add stands in
    for the daemon here: what is tested is the writer's handling, not Kubo."""
    from ipfs_execute_magic.cid import raw_leaf_cid
    from ipfs_execute_magic.errors import IpfsError
    from ipfs_execute_magic.result_cache import ResultCache

    class RefusingStore:
        api = "/ip4/127.0.0.1/tcp/1"
        linked: ClassVar[list[tuple[str, str]]] = []

        def add_bytes(self, data: bytes, *, name: str, pin: bool) -> str:
            raise IpfsError("the IPFS daemon is not running")

        def mfs_link(self, path: str, target: str) -> None:
            self.linked.append((path, target))

    record = RunRecord(
        rootfs="bafkreia",
        input="bafkreib",
        output="bafkreic",
        args=("true",),
        exit_status=0,
        timed_out=False,
        started_at="2026-12-01T00:00:00.000+00:00",
        durations={},
        limits={},
        limits_enforced={},
        versions={},
        staged_from_cache={},
    )
    cache = ResultCache(RefusingStore())  # type: ignore[arg-type]
    cid = cache.save(record)
    assert cid == raw_leaf_cid(record.to_json().encode())  # known before anything is written
    cache.flush()
    warning = capsys.readouterr().err
    assert f"the run record {cid} could not be stored" in warning
    assert "run it again to record it" in warning
    assert RefusingStore.linked == []  # no index entry names a record that is not there


def test_identical_run_is_a_hit_through_the_api(runner: Runner, busybox_cid: str) -> None:
    request = RunRequest(
        rootfs=busybox_cid, args=("sh", "-c", unique("echo once > /output/x; echo said"))
    )
    first = runner.run(request)
    again = runner.run(request)
    assert again.cache_hit and not first.cache_hit
    assert str(again) == str(first) and again.record_cid == first.record_cid
    assert again.stdout == b"said\n"  # replayed from the record
    assert again.record.started_at == first.record.started_at


def test_cli_hit_does_not_run_the_payload(home: Path, busybox_cid: str, empty_cid: str) -> None:
    script = unique("sleep 3; echo slow > /output/s")
    started = time.monotonic()
    first = ipfs_execute(home, busybox_cid, empty_cid, "sh", "-c", script)
    first_s = time.monotonic() - started
    started = time.monotonic()
    second = ipfs_execute(home, busybox_cid, empty_cid, "sh", "-c", script)
    second_s = time.monotonic() - started
    assert first.returncode == second.returncode == 0, second.stderr
    assert first.stdout == second.stdout
    assert first_s >= 3 and second_s < 2.5
    assert "cache hit" in second.stderr and "cache hit" not in first.stderr
    forced = ipfs_execute(home, "--no-cache", busybox_cid, empty_cid, "sh", "-c", script)
    assert forced.returncode == 0 and "cache hit" not in forced.stderr
    assert forced.stdout == first.stdout and "differs" not in forced.stderr


def test_forced_run_that_disagrees_is_reported(
    home: Path, busybox_cid: str, empty_cid: str
) -> None:
    script = unique("head -c 16 /dev/urandom > /output/noise")
    first = ipfs_execute(home, busybox_cid, empty_cid, "sh", "-c", script)
    forced = ipfs_execute(home, "--no-cache", busybox_cid, empty_cid, "sh", "-c", script)
    assert first.returncode == forced.returncode == 0
    assert first.stdout != forced.stdout
    assert "differs from the cached output" in forced.stderr
    assert first.stdout.strip() in forced.stderr
    again = ipfs_execute(home, busybox_cid, empty_cid, "sh", "-c", script)
    assert again.stdout == first.stdout and "cache hit" in again.stderr  # the first one stays


@pytest.mark.parametrize(
    "payload, limits",
    [
        ("exit 3", Limits()),
        ("sleep 30", Limits(timeout=1)),
    ],
)
def test_failed_and_timed_out_runs_are_never_cached(
    runner: Runner, busybox_cid: str, payload: str, limits: Limits
) -> None:
    request = RunRequest(rootfs=busybox_cid, args=("sh", "-c", unique(payload)), limits=limits)
    first = runner.run(request)
    assert not first.ok
    again = runner.run(request)
    assert not again.cache_hit


def test_interactive_runs_are_impure_and_never_cached(runner: Runner, busybox_cid: str) -> None:
    request = RunRequest(rootfs=busybox_cid, args=("sh", "-c", unique("true")), interactive=True)
    first = runner.run(request)
    assert first.ok and first.record.pure is False
    assert not runner.run(request).cache_hit


def test_the_cache_survives_a_daemon_restart(busybox_tarball: Path) -> None:
    home = world_traversable_tmpdir("iex-restart-")
    settings = Settings(home=home)
    first_runner = Runner(settings)
    rootfs = first_runner.store.add_path(busybox_tarball)
    request = RunRequest(rootfs=rootfs, args=("sh", "-c", "echo kept > /output/k"))
    first = first_runner.run(request)
    first_runner.close()
    from ipfs_execute_magic.node import EmbeddedNode

    assert EmbeddedNode(settings).stop()
    second_runner = Runner(settings)  # starts the node again
    try:
        again = second_runner.run(request)
        assert again.cache_hit and str(again) == str(first)
    finally:
        second_runner.close()
        EmbeddedNode(settings).stop()


def test_cache_key_covers_what_matters_and_nothing_else() -> None:
    base = dict(
        rootfs="bafyroot",
        input="bafyinput",
        argv=("/sbin/init", "true"),
        env={"PATH": "/bin"},
        sandbox={"hostname": "sandbox"},
    )
    key = cache_key(**base)
    assert cache_key(**base) == key
    for change in (
        {"rootfs": "bafyother"},
        {"input": "bafyother"},
        {"argv": ("/sbin/init", "false")},
        {"env": {"PATH": "/usr/bin"}},
        {"sandbox": {"hostname": "other"}},
    ):
        assert cache_key(**{**base, **change}) != key
    request = RunRequest(rootfs="x", limits=Limits(timeout=5))
    longer = RunRequest(rootfs="x", limits=Limits(timeout=500))
    from ipfs_execute_magic.runner import sandbox_profile

    assert sandbox_profile(request) == sandbox_profile(longer)  # timeouts are not in the key


def test_verify_reproducible_and_not(home: Path, busybox_cid: str, empty_cid: str, store) -> None:
    stable = ipfs_execute(
        home,
        "--json",
        busybox_cid,
        empty_cid,
        "sh",
        "-c",
        unique("mkdir /output/d; echo same > /output/d/f"),
    )
    record = json.loads(stable.stdout)["record_cid"]
    verified = subprocess.run(
        [str(BIN / "ipfs-execute"), "verify", record, "--runs", "3"],
        env=cli_env(home),
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "verdict: reproducible" in verified.stdout
    assert "another staging location" in verified.stdout

    noisy = ipfs_execute(
        home,
        busybox_cid,
        empty_cid,
        "sh",
        "-c",
        unique(
            "echo fixed > /output/same; head -c 16 /dev/urandom > /output/rand;"
            " touch /output/extra-$(head -c 4 /dev/urandom | od -An -tx1 |"
            " tr -d ' \\n')"
        ),
    )
    output = noisy.stdout.strip()
    checked = subprocess.run(
        [str(BIN / "ipfs-execute"), "verify", output],  # by output CID
        env=cli_env(home),
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "NOT reproducible" in checked.stdout
    assert "~ rand (16 -> 16 bytes)" in checked.stdout
    assert "+ extra-" in checked.stdout and "- extra-" in checked.stdout
    diff_lines = [line.strip() for line in checked.stdout.splitlines()]
    assert not any(
        line[:2] in ("~ ", "+ ", "- ") and line[2:].startswith("same ") for line in diff_lines
    )  # the unchanged file is not listed


def test_verify_an_executed_notebook(home: Path, busybox_cid: str, empty_cid: str, store) -> None:
    """Every recorded run is checked; a record shown twice runs once and is reported for both
    cells; a record this node does not know is reported in its cell and the others go on."""
    runs = [
        json.loads(
            ipfs_execute(
                home, "--json", busybox_cid, empty_cid, "sh", "-c", unique(f"echo {n} > /output/n")
            ).stdout
        )["record_cid"]
        for n in range(2)
    ]
    not_a_record = store.add_bytes(unique("not a record").encode())

    def shown(count: int, output: dict) -> dict:
        return {
            "cell_type": "code",
            "source": "",
            "metadata": {},
            "execution_count": count,
            "outputs": [output],
        }

    notebook = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {},
        "cells": [
            shown(
                1,
                {
                    "output_type": "display_data",
                    "data": {"text/plain": "result"},
                    "metadata": {"ipfs_execute": {"record": runs[0]}},
                },
            ),
            {"cell_type": "markdown", "source": "text", "metadata": {}},
            shown(
                2,
                {
                    "output_type": "execute_result",
                    "execution_count": 2,
                    "metadata": {},
                    "data": {"text/plain": f"exit 0, record: {runs[1]}"},
                },
            ),
            shown(
                3,
                {
                    "output_type": "display_data",
                    "data": {"text/plain": "unknown"},
                    "metadata": {"ipfs_execute": {"record": not_a_record}},
                },
            ),
            shown(
                4,
                {
                    "output_type": "display_data",
                    "data": {"text/plain": "again"},
                    "metadata": {"ipfs_execute": {"record": runs[0]}},
                },
            ),
        ],
    }
    path = world_traversable_tmpdir("iex-nb-") / "done.ipynb"
    path.write_text(json.dumps(notebook))
    checked = subprocess.run(
        [str(BIN / "ipfs-execute"), "verify", str(path)],
        env=cli_env(home),
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 1, checked.stdout + checked.stderr  # one could not be verified
    assert f"cell 0 (In [1]): record {runs[0]}" in checked.stdout
    assert f"cell 2 (In [2]): record {runs[1]}" in checked.stdout
    assert f"cell 3 (In [3]): record {not_a_record} could not be verified" in checked.stdout
    assert f"cell 4 (In [4]): record {runs[0]}" in checked.stdout  # after the unknown one
    assert checked.stdout.count("verdict: reproducible") == 3
    assert checked.stdout.count("re-run, same staging") == 3  # each cell's copy of its verdict


def test_lineage_walks_back_to_the_data(
    home: Path, busybox_cid: str, busybox_tarball: Path, store
) -> None:
    data = world_traversable_tmpdir("iex-lineage-")
    (data / "words.txt").write_text(unique("b\na\nb") + "\n")
    data_cid = store.add_path(data)
    counted = ipfs_execute(
        home,
        busybox_cid,
        data_cid,
        "sh",
        "-c",
        "sort /input/words.txt | uniq -c > /output/counts.txt",
    ).stdout.strip()
    top = ipfs_execute(
        home, busybox_cid, f"{counted}", "sh", "-c", "head -n 1 /input/counts.txt > /output/top.txt"
    ).stdout.strip()
    shown = subprocess.run(
        [str(BIN / "ipfs-execute"), "lineage", top],
        env=cli_env(home),
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"/ipfs/{top}  <- run")
    assert any(line.strip().startswith(f"input: /ipfs/{counted}  <- run") for line in lines)
    assert any(line.strip().startswith(f"input: /ipfs/{data_cid}  (data") for line in lines)
    assert any(f"rootfs: /ipfs/{busybox_cid}  (data" in line for line in lines)


@pytest.mark.timeout(240)
def test_a_second_node_gets_a_hit_from_an_imported_cache(busybox_tarball: Path) -> None:
    """Two embedded nodes on loopback: B imports A's cache export and reuses A's result,
    fetching the output from A, without running the payload."""
    from ipfs_execute_magic.node import EmbeddedNode
    from ipfs_execute_magic.store import Store

    homes = [world_traversable_tmpdir(f"iex-node{name}-") for name in "AB"]
    nodes = [EmbeddedNode(Settings(home=h, online=True)) for h in homes]
    try:
        for node in nodes:
            node.ensure_running()
        env_a, env_b = (cli_env(h, IPFS_EXECUTE_ONLINE="1") for h in homes)
        add = subprocess.run(
            [str(BIN / "ipfs-execute"), "add", str(busybox_tarball)],
            env=env_a,
            capture_output=True,
            text=True,
            check=True,
        )
        busybox = add.stdout.strip()
        run_a = subprocess.run(
            [
                str(BIN / "ipfs-execute"),
                busybox,
                "bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354",
                "sh",
                "-c",
                "echo computed on A > /output/result",
            ],
            env=env_a,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        assert run_a.returncode == 0, run_a.stderr
        output = run_a.stdout.strip()
        export = subprocess.run(
            [str(BIN / "ipfs-execute"), "cache", "export"],
            env=env_a,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

        with (
            Store.connect(Settings(home=homes[0])) as store_a,
            Store.connect(Settings(home=homes[1])) as store_b,
        ):
            store_b.swarm_connect(store_a.peer_addresses()[0])
        imported = subprocess.run(
            [str(BIN / "ipfs-execute"), "cache", "import", export],
            env=env_b,
            capture_output=True,
            text=True,
        )
        assert imported.returncode == 0, imported.stderr
        assert "imported 1 cached runs" in imported.stdout

        # B trusts A's key: A's attested result is a hit on B.
        key_a = subprocess.run(
            [str(BIN / "ipfs-execute"), "trust", "key"],
            env=env_a,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        subprocess.run(
            [str(BIN / "ipfs-execute"), "trust", "add", key_a, "--name", "A"],
            env=env_b,
            check=True,
            capture_output=True,
        )
        run_b = subprocess.run(
            [
                str(BIN / "ipfs-execute"),
                busybox,
                "bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354",
                "sh",
                "-c",
                "echo computed on A > /output/result",
            ],
            env=env_b,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        assert run_b.returncode == 0, run_b.stderr
        assert run_b.stdout.strip() == output and "cache hit" in run_b.stderr
        assert "attested by 1 key (trusted)" in run_b.stderr
        assert not (homes[1] / "cache" / "rootfs").exists()  # B never staged, so never ran
        with Store.connect(Settings(home=homes[1])) as store_b:
            assert store_b.cat(f"{output}/result") == b"computed on A\n"  # fetched from A
    finally:
        for node in nodes:
            node.stop()


def test_lineage_sees_through_compositions_and_output_sub_paths(
    home: Path, busybox_cid: str, busybox_tarball: Path, store
) -> None:
    first = ipfs_execute(
        home, busybox_cid, store.empty_directory(), "sh", "-c", unique("echo one > /output/one.txt")
    ).stdout.strip()
    # An image built by a run, then used as a rootfs through a sub path of that run's output.
    holder = world_traversable_tmpdir("iex-img-")
    (holder / "rootfs.tar.gz").write_bytes(busybox_tarball.read_bytes())
    image = ipfs_execute(
        home,
        busybox_cid,
        store.add_path(holder),
        "sh",
        "-c",
        unique("cp /input/rootfs.tar.gz /output/"),
    ).stdout.strip()
    composed = subprocess.run(
        [str(BIN / "ipfs-mkdir"), "a", first, "b/one.txt", f"{first}/one.txt"],
        env=cli_env(home),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    last = ipfs_execute(
        home,
        f"{image}/rootfs.tar.gz",
        composed,
        "sh",
        "-c",
        "cat /input/a/one.txt /input/b/one.txt > /output/both.txt",
    )
    assert last.returncode == 0, last.stderr
    shown = subprocess.run(
        [str(BIN / "ipfs-execute"), "lineage", last.stdout.strip()],
        env=cli_env(home),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = [line.strip() for line in shown.splitlines()]
    assert any(line.startswith(f"rootfs: /ipfs/{image}/rootfs.tar.gz  <- run") for line in lines)
    assert any(line.startswith(f"input: /ipfs/{composed}  (a directory composed") for line in lines)
    assert any(line.startswith(f"a: /ipfs/{first}  <- run") for line in lines)
    assert any(line.startswith(f"b/one.txt: /ipfs/{first}/one.txt  <- run") for line in lines)
