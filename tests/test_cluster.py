"""Runs on a real Dask cluster: a LocalCluster of two worker processes on loopback, each worker
with its own data directory and embedded node (IpfsNodePlugin); the data is added only on the
client's node and reaches the workers by bitswap."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import distributed
import pytest
from helpers import world_traversable_tmpdir

import ipfs_execute_magic as ie
from ipfs_execute_magic import cluster
from ipfs_execute_magic.errors import ClusterError
from ipfs_execute_magic.result import RunResult
from ipfs_execute_magic.runner import Runner
from ipfs_execute_magic.settings import Settings


class Env:
    def __init__(
        self,
        client: object,
        busybox: str,
        worker_nodes: set[str],
        client_node: str,
        home: Path,
    ):
        self.home = home
        self.client = client
        self.busybox = busybox
        self.worker_nodes = worker_nodes
        self.client_node = client_node


@pytest.fixture(scope="module")
def cluster_env(busybox_tarball: Path) -> Iterator[Env]:
    from ipfs_execute_magic.node import EmbeddedNode
    from ipfs_execute_magic.sandbox import release_stale_outputs

    client_home = world_traversable_tmpdir("iex-cluster-client-")
    workers_base = world_traversable_tmpdir("iex-cluster-workers-")
    local = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        local_directory=str(workers_base),
    )
    client = distributed.Client(local)
    try:
        ie.configure(Settings(home=client_home), dask=client)
        busybox = str(ie.add(busybox_tarball))
        runner = ie.default_runner()
        worker_nodes = set(client.run(cluster.worker_node).values())
        yield Env(client, busybox, worker_nodes, runner.store.peer_id(), client_home)
    finally:
        ie.configure(Settings.from_env(), dask=False)
        client.close()
        local.close()
        homes = [client_home, *workers_base.rglob("ipfs-execute-*")]
        for path in homes:
            if (path / "kubo").is_dir():
                EmbeddedNode(Settings(home=path)).stop()
                release_stale_outputs(path / "runs")
        shutil.rmtree(client_home, ignore_errors=True)
        shutil.rmtree(workers_base, ignore_errors=True)


def _data(tmp_path: Path, files: dict[str, str]) -> str:
    root = tmp_path / f"data-{time.monotonic_ns()}"
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    return str(ie.add(root))


def test_runs_execute_on_the_workers_from_data_only_on_the_client(
    cluster_env: Env, tmp_path: Path
) -> None:
    data = _data(tmp_path, {"words": "b\na\nc\n"})
    script = "sort /input/words > /output/sorted; echo n=$n"
    futures = [
        ie.submit(cluster_env.busybox, data, script=script, params={"n": n}) for n in range(4)
    ]
    # The same run submitted twice while in flight is one Dask task.
    again = ie.submit(cluster_env.busybox, data, script=script, params={"n": 0})
    assert again.dask is not None and futures[0].dask is not None
    assert again.dask.key == futures[0].dask.key
    results = [future.result() for future in futures]
    for n, result in enumerate(results):
        assert result.ok and not result.cache_hit
        assert result.stdout == f"n={n}\n".encode()
        # Ran on a worker's node, not on the client's; read back here through bitswap.
        assert result.record.node in cluster_env.worker_nodes
        assert result.record.node != cluster_env.client_node
        assert result.read_text("sorted") == "a\nb\nc\n"
    # The client's cache and lineage know the runs: a hit never goes to the cluster.
    hit = ie.submit(cluster_env.busybox, data, script=script, params={"n": 2})
    assert hit.dask is None and hit.result().cache_hit
    assert hit.result().output == results[2].output
    assert ie.run(cluster_env.busybox, data, script=script, params={"n": 3}).cache_hit
    assert ie.lineage(results[1].output).record is not None


def test_a_forced_run_that_disagrees_leaves_the_cached_result_as_a_local_one_does(
    cluster_env: Env,
) -> None:
    """Forced through the cluster, a non-deterministic run is settled against the client's
    cache like a local forced run: the first recorded output stays, the disagreement is said."""
    script = f"# {time.time_ns()}\nhead -c 16 /dev/urandom > /output/noise\n"
    first = ie.run(cluster_env.busybox, None, script=script)
    assert first.ok and first.record.node is None  # ran here, on the client
    forced = ie.submit(cluster_env.busybox, None, script=script, use_cache=False)
    assert forced.dask is not None
    on_worker = forced.result(timeout=120)
    assert on_worker.ok and on_worker.record.node in cluster_env.worker_nodes
    assert on_worker.output != first.output
    local = ie.run(cluster_env.busybox, None, script=script, use_cache=False)
    assert local.ok and local.output not in (first.output, on_worker.output)

    # The cached answer is still the first run's, on the client and for the cluster.
    again = ie.run(cluster_env.busybox, None, script=script)
    assert again.cache_hit and again.output == first.output
    hit = ie.submit(cluster_env.busybox, None, script=script)
    assert hit.dask is None and hit.result().output == first.output

    # Both forced runs report the same disagreement, each naming its own output and record.
    assert on_worker.disagreement is not None and local.disagreement is not None
    assert on_worker.disagreement.startswith(
        f"this run's output {on_worker.output} differs from the cached output {first.output}"
    )

    def general(result: RunResult) -> str:
        assert result.disagreement is not None and result.record_cid is not None
        text = result.disagreement.replace(str(result.output), "OUTPUT")
        return text.replace(result.record_cid, "RECORD")

    assert general(on_worker) == general(local)
    assert f"ipfs-execute verify {on_worker.record_cid}" in on_worker.disagreement
    assert on_worker.trust == local.trust == first.trust
    # Its record is stored and findable by output, though not the cache's answer.
    assert ie.lineage(on_worker.output).record == on_worker.record


def test_runs_of_a_rootfs_go_where_it_is_staged(cluster_env: Env, tmp_path: Path) -> None:
    data = _data(tmp_path, {"x": "1\n"})
    ran = ie.submit(cluster_env.busybox, data, script="cp /input/x /output/").result()
    cluster_now = ie.current_cluster()
    assert cluster_now is not None
    # The worker that ran it is remembered; the next run of the rootfs prefers it (loosely).
    staged_on = cluster_now._placement[ran.record.rootfs]
    future = ie.submit(cluster_env.busybox, data, script="sleep 1; cp /input/x /output/")
    assert future.dask is not None

    def restrictions(dask_scheduler: object, key: str) -> tuple[set[str], bool] | None:
        task = dask_scheduler.tasks.get(key)  # type: ignore[attr-defined]
        if task is None:  # the submission is still on its way
            return None
        return set(task.worker_restrictions or ()), bool(task.loose_restrictions)

    found = None
    while found is None:
        found = cluster_env.client.run_on_scheduler(restrictions, key=future.dask.key)
    preferred, loose = found
    assert preferred == staged_on and loose
    assert future.result().ok


def test_map_returns_results_in_order(cluster_env: Env, tmp_path: Path) -> None:
    inputs = [_data(tmp_path, {"x": f"{i}\n"}) for i in range(5)]
    results = ie.map(cluster_env.busybox, inputs, script="cp /input/x /output/x")
    assert [r.read_text("x") for r in results] == [f"{i}\n" for i in range(5)]
    scripts = [f"echo {i} > /output/x" for i in range(3)]
    by_script = ie.map(cluster_env.busybox, inputs[0], script=scripts)
    assert [r.read_text("x") for r in by_script] == ["0\n", "1\n", "2\n"]


def test_map_entries_reruns_only_the_changed_entry(cluster_env: Env, tmp_path: Path) -> None:
    files = {f"f{i:02d}.txt": f"line {i}\n" * (i + 1) for i in range(20)}
    script = "for f in /input/*; do wc -l < $f > /output/lines; done"
    first = ie.map_entries(cluster_env.busybox, _data(tmp_path, files), script=script)
    assert first.ok and sorted(first.executed) == sorted(files)
    assert sorted(e.name for e in first.output.ls()) == sorted(files)
    assert first.output.read_text("f04.txt/lines").strip() == "5"
    nodes = {r.record.node for r in first.results.values()}
    assert nodes <= cluster_env.worker_nodes

    files["f07.txt"] = "changed\n"
    second = ie.map_entries(cluster_env.busybox, _data(tmp_path, files), script=script)
    assert second.ok and second.executed == ["f07.txt"]  # one sandbox ran; 19 hits
    assert second.output.read_text("f07.txt/lines").strip() == "1"
    assert second.output.read_text("f04.txt/lines").strip() == "5"


def test_a_failed_entry_is_named_and_the_others_stay(cluster_env: Env, tmp_path: Path) -> None:
    data = _data(tmp_path, {"good1": "1\n", "bad": "x\n", "good2": "2\n"})
    script = "if [ -e /input/bad ]; then echo broken >&2; exit 3; fi; cp /input/* /output/"
    each = ie.map_entries(cluster_env.busybox, data, script=script)
    assert list(each.failed) == ["bad"] and "exit status 3: broken" in each.failed["bad"]
    assert sorted(e.name for e in each.output.ls()) == ["good1", "good2"]
    assert each.output.read_text("good2/good2") == "2\n"


def test_a_worker_killed_mid_run_still_gives_the_right_result(
    cluster_env: Env, tmp_path: Path
) -> None:
    data = _data(tmp_path, {"v": f"{time.time_ns()}\n"})
    future = ie.submit(cluster_env.busybox, data, script="sleep 3; cp /input/v /output/v")
    assert future.dask is not None
    client = cluster_env.client
    deadline = time.monotonic() + 60
    running_on = None
    while running_on is None and time.monotonic() < deadline:
        for worker, keys in client.processing().items():
            if future.dask.key in keys:
                running_on = worker
        time.sleep(0.05)
    assert running_on is not None
    time.sleep(1.0)  # staged and inside the sandbox
    pid = client.run(os.getpid, workers=[running_on])[running_on]
    os.kill(pid, signal.SIGKILL)
    killed_at = datetime.datetime.now(datetime.UTC)
    result = future.result(timeout=120)
    # Dask ran it again elsewhere (or on the restarted worker): one whole, correct run.
    assert datetime.datetime.fromisoformat(result.record.started_at) > killed_at
    assert result.ok and result.record.node in cluster_env.worker_nodes
    assert result.read_text("v") == ie.default_runner().store.cat(f"{data}/v").decode()


def test_a_cell_runs_on_a_worker_and_each_spreads_over_the_workers(
    cluster_env: Env, tmp_path: Path, capsys
) -> None:
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "ipfs_execute_magic")
    magics = shell.magics_manager.registry["IpfsExecuteMagics"]
    home_before = magics.home
    scheduler = cluster_env.client.scheduler.address
    try:
        shell.run_line_magic("config", f"IpfsExecuteMagics.home = {str(cluster_env.home)!r}")
        shell.run_line_magic("config", f"IpfsExecuteMagics.dask = {scheduler!r}")
        assert "Dask cluster:" in capsys.readouterr().out
        shell.user_ns.update(
            busybox=cluster_env.busybox,
            ds=_data(tmp_path, {"a": f"{time.time_ns()}\n", "b": "bee\n"}),
        )
        shell.run_cell_magic(
            "ipfs_execute", "$busybox $ds -o out", "cp /input/a /output/\necho hi\n"
        )
        out = shell.user_ns["out"]
        assert out.record.node in cluster_env.worker_nodes
        assert "hi" in capsys.readouterr().out
        shell.run_cell_magic(
            "ipfs_execute", "$busybox $ds --each -o each", "cp /input/* /output/\n"
        )
        each = shell.user_ns["each"]
        assert each.ok and each.output.read_text("b/b") == "bee\n"
        assert {r.record.node for r in each.results.values()} <= cluster_env.worker_nodes
    finally:
        magics.dask = ""
        magics.home = home_before
        ie.configure(Settings(home=cluster_env.home), dask=cluster_env.client)


def _occupy_both_workers(cluster_env: Env) -> list[cluster.RunFuture]:
    """Two runs of `sleep 3`, one on each worker, executing when this returns."""
    on = ie.current_cluster()
    assert on is not None
    tag = time.time_ns()
    blockers = [
        ie.submit(cluster_env.busybox, None, script=f"# {tag} {n}\nsleep 3\n") for n in range(2)
    ]
    keys = [future.dask.key for future in blockers]  # type: ignore[union-attr]
    deadline = time.monotonic() + 60
    where = on.where(keys)
    while None in where.values() and time.monotonic() < deadline:
        time.sleep(0.1)
        where = on.where(keys)
    assert None not in where.values(), where
    return blockers  # type: ignore[return-value]


def test_where_names_the_worker_executing_each_task(cluster_env: Env) -> None:
    on = ie.current_cluster()
    assert on is not None
    blockers = _occupy_both_workers(cluster_env)
    waiting = ie.submit(cluster_env.busybox, None, script=f"# {time.time_ns()}\ntrue\n")
    assert waiting.dask is not None
    keys = [*(future.dask.key for future in blockers), waiting.dask.key]
    where = on.where(keys)
    workers = set(cluster_env.client.scheduler_info()["workers"])
    # One worker thread each: the two sleepers run, one on each; the third waits its turn.
    assert {where[keys[0]], where[keys[1]]} == workers
    assert where[waiting.dask.key] is None
    for future in [*blockers, waiting]:
        assert future.result(timeout=120).ok
    assert set(on.where(keys).values()) == {None}  # ended: on no worker
    assert on.where([]) == {} and on.where(["ipfs-execute-unknown"]) == {
        "ipfs-execute-unknown": None
    }


def _kernel_texts(messages: list[dict[str, object]]) -> list[str]:
    """The plain text of every display and display update a kernel sent, in order."""
    texts = []
    for message in messages:
        if message["msg_type"] in ("display_data", "update_display_data", "execute_result"):
            content = message["content"]
            assert isinstance(content, dict)
            texts.append(content["data"].get("text/plain", ""))
    return texts


def test_a_pending_cell_shows_where_it_runs_in_a_kernel(cluster_env: Env, tmp_path: Path) -> None:
    """In a real kernel on the cluster: a single run's status line says "queued", then which
    worker runs it; an --each cell's says how many entries are done and which run where."""
    from jupyter_client.manager import start_new_kernel

    env = {k: v for k, v in os.environ.items() if not k.startswith("IPFS_EXECUTE_")}
    env["IPFS_EXECUTE_HOME"] = str(cluster_env.home)
    names = [f"e{i}" for i in range(4)]
    first = _data(tmp_path, {name: f"{name} {time.time_ns()}\n" for name in names})
    manager, client = start_new_kernel(kernel_name="python3", env=env)

    def execute(code: str) -> list[dict[str, object]]:
        messages: list[dict[str, object]] = []
        reply = client.execute_interactive(code, timeout=180, output_hook=messages.append)
        assert reply["content"]["status"] == "ok", reply["content"]
        return messages

    try:
        execute(
            "%load_ext ipfs_execute_magic\n"
            "from ipfs_execute_magic.jupyter import magics\n"
            "magics.PROGRESS_DELAY = 0\n"
            f"busybox = {cluster_env.busybox!r}\nds = {first!r}\n"
            f"%config IpfsExecuteMagics.dask = {cluster_env.client.scheduler.address!r}"
        )
        workers = "|".join(re.escape(w) for w in cluster_env.client.scheduler_info()["workers"])
        on_worker = re.compile(rf"^running · [\d.]+ s · on worker ({workers})$")

        blockers = _occupy_both_workers(cluster_env)
        texts = _kernel_texts(
            execute(f"%%ipfs_execute $busybox -o one\n# {time.time_ns()}\nsleep 1\n")
        )
        assert any(re.fullmatch(r"running · [\d.]+ s · queued", text) for text in texts), texts
        queued_at = next(i for i, text in enumerate(texts) if text.endswith(" · queued"))
        assert any(on_worker.match(text) for text in texts[queued_at:]), texts
        assert any(text.startswith("finished after ") for text in texts), texts
        for future in blockers:
            future.result(timeout=120)

        script = f"# {time.time_ns()}\nsleep 1; cp /input/* /output/\n"
        texts = _kernel_texts(execute(f"%%ipfs_execute $busybox $ds --each -o each\n{script}"))
        running = re.compile(
            rf"^\d of 4 entries done \(\d cached, \d ran\) · running: "
            rf"e\d on ({workers})(, e\d on ({workers}))?( · \d queued)? · [\d.]+ s$"
        )
        assert any(running.match(text) for text in texts), texts
        assert any(
            text.startswith("finished after ")
            and text.endswith(" · 4 of 4 entries (0 cached, 4 ran)")
            for text in texts
        ), texts
        assert any(text.startswith("EntryResults(") for text in texts)  # the listing, as before

        # One entry changed: three come from the cache at once, one runs on a worker.
        second = _data(tmp_path, {name: f"{name} {time.time_ns()}\n" for name in names[:1]})
        changed = str(
            ie.mkdir({name: f"{first}/{name}" for name in names[1:]} | {"e0": f"{second}/e0"})
        )
        execute(f"ds = {changed!r}")
        texts = _kernel_texts(execute(f"%%ipfs_execute $busybox $ds --each -o each\n{script}"))
        assert any(
            re.match(
                rf"^3 of 4 entries done \(3 cached, 0 ran\) · running: e0 on ({workers})", text
            )
            for text in texts
        ), texts
        assert any(text.endswith(" · 4 of 4 entries (3 cached, 1 ran)") for text in texts), texts
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_an_unreachable_scheduler_is_one_clear_error(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(
        ClusterError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:9 "
    ):
        cluster.connect("tcp://127.0.0.1:9", Runner(Settings(home=tmp_path)), timeout=2)
    assert time.monotonic() - started < 30


def test_a_node_listens_on_the_swarm_addresses_it_is_given() -> None:
    """A worker on another machine's address gets its node listening there (Settings.swarm)."""
    from ipfs_execute_magic.node import EmbeddedNode
    from ipfs_execute_magic.store import Store

    home = world_traversable_tmpdir("iex-swarm-")
    settings = Settings(home=home, online=True, swarm=("/ip4/127.0.0.2/tcp/0",))
    try:
        with Store.connect(settings) as store:
            addresses = store.peer_addresses()
        assert addresses and all(a.startswith("/ip4/127.0.0.2/tcp/") for a in addresses)
    finally:
        EmbeddedNode(settings).stop()
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def _dask_processes(
    tmp_path: Path, *worker_options: str, worker_env: dict[str, str] | None = None
) -> Iterator[tuple[str, Runner]]:
    """`dask scheduler` and one `dask worker` as processes on loopback; yields the scheduler's
    address and a runner on a client node of its own (online)."""
    import json
    import subprocess

    from ipfs_execute_magic.node import EmbeddedNode

    dask = str(Path(sys.executable).parent / "dask")
    client_home = world_traversable_tmpdir("iex-processes-client-")
    workers_base = world_traversable_tmpdir("iex-processes-workers-")
    scheduler_file = tmp_path / "scheduler.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPFS_EXECUTE_")}
    env["IPFS_EXECUTE_WORKER_HOME"] = str(workers_base)
    common = ["--scheduler-file", str(scheduler_file), "--no-dashboard"]
    scheduler = subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", *common],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    worker = None
    runner = Runner(Settings(home=client_home, online=True))
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        worker = subprocess.Popen(
            [
                *(dask, "worker", *common, "--nthreads", "1", "--host", "127.0.0.1"),
                *("--local-directory", str(tmp_path / "scratch"), *worker_options),
            ],
            env={**env, **(worker_env or {})},
            stderr=subprocess.DEVNULL,
        )
        with distributed.Client(address) as client:
            client.wait_for_workers(1, timeout=60)
        yield address, runner
    finally:
        for process in (worker, scheduler):
            if process is not None:
                process.terminate()
                process.wait(timeout=60)
        runner.close()
        for home in [client_home, *workers_base.glob("ipfs-execute-*")]:
            if (home / "kubo").is_dir():
                EmbeddedNode(Settings(home=home)).stop()
        shutil.rmtree(client_home, ignore_errors=True)
        shutil.rmtree(workers_base, ignore_errors=True)


def test_a_worker_started_with_the_preload_runs_from_a_scheduler_address(
    busybox_tarball: Path, tmp_path: Path
) -> None:
    """`dask worker --preload ipfs_execute_magic.cluster`, the client connected by address."""
    from ipfs_execute_magic.record import RunRequest

    preload = ("--preload", "ipfs_execute_magic.cluster")
    with _dask_processes(tmp_path, *preload) as (address, runner):
        busybox = runner.store.add_path(busybox_tarball)
        on = cluster.connect(address, runner)
        try:
            (node,) = on.client.run(cluster.worker_node).values()
            request = RunRequest(rootfs=busybox, script="echo preloaded > /output/p\n")
            result = on.submit(request).result(timeout=120)
            assert result.ok and result.record.node == node != runner.store.peer_id()
            assert result.read_text("p") == "preloaded\n"
        finally:
            on.close()


@pytest.mark.slow
def test_a_worker_without_bwrap_is_one_clear_error(tmp_path: Path) -> None:
    bin_only = {"PATH": str(Path(sys.executable).parent)}  # Kubo and dask, no bwrap
    with (
        _dask_processes(tmp_path, worker_env=bin_only) as (address, runner),
        pytest.raises(ClusterError, match=r"worker tcp://127\.0\.0\.1:\d+ .*bwrap"),
    ):
        cluster.connect(address, runner)


def test_a_local_cluster_runs_and_leaves_no_worker_directory(
    busybox_tarball: Path, tmp_path: Path
) -> None:
    """dask="local": a LocalCluster of ours; closing it removes its workers' directories."""
    from ipfs_execute_magic.node import EmbeddedNode
    from ipfs_execute_magic.record import RunRequest

    home = world_traversable_tmpdir("iex-local-client-")
    runner = Runner(Settings(home=home, online=True))
    try:
        busybox = runner.store.add_path(busybox_tarball)
        on = cluster.connect("local", runner, n_workers=1)
        try:
            homes = [Path(h) for h in on.client.run(cluster.worker_data_directory).values()]
            request = RunRequest(rootfs=busybox, script="echo local > /output/l\n")
            result = on.submit(request).result(timeout=120)
            assert result.ok and result.record.node not in (None, runner.store.peer_id())
            assert result.read_text("l") == "local\n"
        finally:
            on.close()
        assert homes and not any(h.exists() for h in homes)
    finally:
        runner.close()
        EmbeddedNode(Settings(home=home)).stop()
        shutil.rmtree(home, ignore_errors=True)
