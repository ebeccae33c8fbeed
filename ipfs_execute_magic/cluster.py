"""Runs on a Dask cluster: every worker with its own data directory and embedded IPFS node.

The client (the notebook or script that calls `ie.submit`) resolves a request and computes its
cache key on its own node; a result its cache already has is answered there and never goes to
the cluster. Otherwise the run becomes a Dask task keyed by the cache key (identical runs in
flight are one task). The worker fetches rootfs and input from the client's node (bitswap),
stages and runs them as a local run would, pins the output on its own node and sends back the
record; the client stores that record in its own result cache and index (so later hits and
lineage see it), signed with its own key beside the worker's attestation. The output stays on
the worker's node until something reads it.

Workers get their node from `IpfsNodePlugin`, registered by `connect` or loaded with
`dask worker --preload ipfs_execute_magic.cluster`. Imported only when a cluster is used:
it loads distributed.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed import Client, WorkerPlugin, get_worker

from .errors import ClusterError, IpfsError
from .record import RunRecord, RunRequest
from .result import RunResult
from .runner import ORDINARY, RunConditions, Runner, _lineage_path
from .settings import Settings
from .trust import Attestation

if TYPE_CHECKING:
    from distributed import Future, Worker

PLUGIN_NAME = "ipfs-execute-node"
# Where workers keep their data directories, when the plugin is given none.
WORKER_HOME_ENV = "IPFS_EXECUTE_WORKER_HOME"
# Where workers' nodes listen for peers, comma-separated multiaddrs (a fixed port for a
# firewall): else the worker's own address, on a random port.
WORKER_SWARM_ENV = "IPFS_EXECUTE_WORKER_SWARM"
CONNECT_TIMEOUT_S = 10.0

# -- the worker side ----------------------------------------------------------------------

# Worker address -> its runner (one per worker; several workers may share a process).
_worker_runners: dict[str, Runner] = {}
_worker_lock = threading.Lock()
_connected: set[tuple[str, str]] = set()  # (worker, peer address) already connected


class IpfsNodePlugin(WorkerPlugin):
    """Gives a worker its own data directory and embedded Kubo node, listening for peers.

    The data directory is `BASE/SCHEDULER-NAME` (BASE: the plugin's `base`, else
    $IPFS_EXECUTE_WORKER_HOME, else the parent of the worker's local directory): a worker the
    nanny restarts under the same name finds its node, staging cache and records again.
    """

    name = PLUGIN_NAME

    def __init__(self, base: str | os.PathLike[str] | None = None) -> None:
        self.base = None if base is None else str(base)

    def setup(self, worker: Worker) -> None:
        start_worker_node(worker, self.base)

    def teardown(self, worker: Worker) -> None:
        stop_worker_node(worker)


def worker_home(worker: Worker, base: str | None = None) -> Path:
    root = Path(
        base or os.environ.get(WORKER_HOME_ENV) or Path(worker.local_directory).parent
    ).absolute()
    scheduler = str(worker.scheduler.address or "")
    label = f"{scheduler}-{worker.name}"
    return root / ("ipfs-execute-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_"))


def start_worker_node(worker: Worker, base: str | None = None) -> Runner:
    """The worker's runner, its node started (once per worker); checks the sandbox too, so a
    worker without bwrap fails here, in one line, not at its first run."""
    from . import sandbox

    with _worker_lock:
        runner = _worker_runners.get(worker.address)
        if runner is not None:
            return runner
        home = worker_home(worker, base)
        home.mkdir(parents=True, exist_ok=True)
        runner = Runner(Settings.from_env(home=home, online=True, swarm=_swarm_of(worker)))
        try:
            runner.node = runner.store.peer_id()
            sandbox.check_available(home)
        except Exception as error:
            runner.close()
            raise ClusterError(f"worker {worker.address} ({home}): {error}") from None
        _worker_runners[worker.address] = runner
        return runner


def _swarm_of(worker: Worker) -> tuple[str, ...] | None:
    """The node listens for peers where the worker listens for Dask: another machine's nodes
    reach it there. None (the repo's loopback port) for a worker on loopback."""
    import ipaddress

    from distributed.comm.addressing import get_address_host

    chosen = os.environ.get(WORKER_SWARM_ENV, "")
    if chosen:
        return tuple(address.strip() for address in chosen.split(",") if address.strip())
    host = get_address_host(worker.address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return ("/ip4/0.0.0.0/tcp/0",)  # a host name: every interface
    if ip.is_loopback:
        return None
    return (f"/ip{ip.version}/{ip}/tcp/0",)


def stop_worker_node(worker: Worker) -> None:
    from .node import EmbeddedNode

    with _worker_lock:
        runner = _worker_runners.pop(worker.address, None)
        # A node started again listens on another port and knows no peer: connect anew.
        _connected.difference_update({pair for pair in _connected if pair[0] == worker.address})
    if runner is not None:
        runner.close()
        EmbeddedNode(runner.settings).stop()


def dask_setup(worker: Worker) -> None:
    """`dask worker --preload ipfs_execute_magic.cluster`: the node starts with the worker."""
    start_worker_node(worker)


def dask_teardown(worker: Worker) -> None:
    stop_worker_node(worker)


def _worker_runner(worker: Worker | None = None) -> tuple[Worker, Runner]:
    worker = worker or get_worker()
    runner = _worker_runners.get(worker.address)
    if runner is None:  # a worker that joined without the plugin
        runner = start_worker_node(worker)
    return worker, runner


def _connect_peers(runner: Runner, worker: str, peers: list[str]) -> None:
    """Connect the worker's node to peers (once each); a peer that cannot be reached is
    skipped: bitswap fetches from whichever connected node has the blocks."""
    own = runner.node or ""
    for address in peers:
        if (worker, address) in _connected or address.endswith(f"/p2p/{own}"):
            continue
        try:
            runner.store.swarm_connect(address)
        except IpfsError:
            continue
        _connected.add((worker, address))


# Run on every worker with `Client.run`, which passes the worker as `dask_worker`.


def worker_peers(dask_worker: Worker) -> list[str]:
    """This worker's node addresses."""
    _worker, runner = _worker_runner(dask_worker)
    return runner.store.peer_addresses()


def worker_data_directory(dask_worker: Worker) -> str:
    return str(_worker_runner(dask_worker)[1].settings.home)


def _remove_worker_home(home: Path) -> None:
    from .node import EmbeddedNode
    from .sandbox import release_stale_outputs
    from .staging_cache import remove_tree

    EmbeddedNode(Settings(home=home)).stop()
    release_stale_outputs(home / "runs")
    remove_tree(home)


def _has_plugin(dask_worker: Worker) -> bool:
    return PLUGIN_NAME in dask_worker.plugins


def worker_node(dask_worker: Worker) -> str | None:
    """This worker's node's peer ID."""
    return _worker_runner(dask_worker)[1].node


def worker_connect(peers: list[str], dask_worker: Worker) -> None:
    worker, runner = _worker_runner(dask_worker)
    _connect_peers(runner, worker.address, peers)


@dataclass(frozen=True)
class WorkerAnswer:
    """What a worker sends back for a run: its record and what it printed."""

    record_json: str
    record_cid: str | None
    stdout: bytes
    stderr: bytes
    cache_hit: bool
    worker: str


def run_on_worker(request: RunRequest, key: str, peers: list[str], use_cache: bool) -> WorkerAnswer:
    """The Dask task: one run on this worker's node."""
    worker, runner = _worker_runner()
    _connect_peers(runner, worker.address, peers)
    result = runner.run(request, RunConditions(use_cache=use_cache))
    if result.record.key != key:
        raise ClusterError(
            f"worker {worker.address} computed cache key {result.record.key} for the run the "
            f"client keyed {key}: its sandbox profile or versions differ (ipfs-execute "
            f"{result.record.versions.get('ipfs-execute')}); install the same version there"
        )
    return WorkerAnswer(
        result.record.to_json(),
        result.record_cid,
        result.stdout,
        result.stderr,
        result.cache_hit,
        worker.address,
    )


# -- the client side ----------------------------------------------------------------------


class RunFuture:
    """A run in flight on the cluster (or already answered by the client's cache).

    `result()` is the `RunResult` an `ie.run` of the same arguments gives; `.dask` is the
    Dask future (None for a cache hit, which never went to the cluster).
    """

    def __init__(
        self,
        cluster: Cluster,
        key: str,
        future: Future[Any] | None = None,
        result: RunResult | None = None,
        printed: tuple[Callable[[bytes], None] | None, ...] = (),
        conditions: RunConditions = ORDINARY,
    ) -> None:
        self.cluster = cluster
        self.key = key
        self.conditions = conditions
        self.dask = future
        self._result = result
        self._printed = printed  # callbacks that get stdout and stderr once it has ended
        self._lock = threading.Lock()

    def done(self) -> bool:
        return self._result is not None or (self.dask is not None and self.dask.done())

    def result(self, timeout: float | None = None) -> RunResult:
        with self._lock:
            if self._result is None:
                assert self.dask is not None
                answer = self.dask.result(timeout=timeout)
                self._result = self.cluster.adopt(answer, self.conditions)
                streams = (self._result.stdout, self._result.stderr)
                for forward, data in zip(self._printed, streams, strict=False):
                    if forward is not None and data:
                        forward(data)
            return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self.result(timeout)
        except Exception as error:
            return error
        return None

    def add_done_callback(self, callback: Callable[[RunFuture], Any]) -> None:
        if self.dask is None:
            callback(self)
        else:
            self.dask.add_done_callback(lambda _future: callback(self))

    def cancel(self) -> None:
        if self.dask is not None:
            self.dask.cancel()

    def __repr__(self) -> str:
        state = "cached" if self.dask is None else self.dask.status
        return f"<RunFuture {self.key[:12]} {state}>"


class Cluster:
    """The client's view of a Dask cluster whose workers run with `IpfsNodePlugin`."""

    def __init__(self, client: Client, runner: Runner, *, owns_client: bool) -> None:
        self.client = client
        self._owns_client = owns_client
        self.throwaway = False  # a LocalCluster of ours: its workers' directories go with it
        # rootfs CID -> workers that ran it (so have it staged): where its next runs go.
        self._placement: dict[str, set[str]] = {}
        self._in_flight: dict[str, int] = {}  # rootfs CID -> its runs submitted, not ended
        self._lock = threading.Lock()
        try:
            self.attach(runner)
        except BaseException:
            self.close()
            raise

    def attach(self, runner: Runner) -> None:
        """Use this client-side runner (its node is the one workers fetch from)."""
        self.runner = runner
        self.peers = runner.store.peer_addresses()
        if not self.peers:
            raise ClusterError(
                f"this machine's IPFS node ({runner.settings.home}) does not listen for peers, "
                "so workers cannot fetch from it: stop it (`ipfs-execute node stop`) and "
                "configure again (dask= starts it online)"
            )
        self.connect_workers()

    @property
    def dashboard_link(self) -> str | None:
        link = getattr(self.client, "dashboard_link", None)
        return str(link) if link else None

    def connect_workers(self) -> None:
        """Connect every worker's node to the client's and to each other's."""
        try:
            # Registering it again would stop and start every worker's node: only when one
            # lacks it (the scheduler gives it to workers that join later).
            found = self.client.run(_has_plugin)
            if not found or not all(found.values()):
                self.client.register_plugin(IpfsNodePlugin(), name=PLUGIN_NAME)
            addresses = self.client.run(worker_peers)
        except ClusterError:
            raise
        except Exception as error:
            raise ClusterError(f"starting the workers' IPFS nodes failed: {error}") from None
        peers = [*self.peers, *(a for found in addresses.values() for a in found)]
        self.client.run(worker_connect, peers)

    def where(self, keys: Iterable[str]) -> dict[str, str | None]:
        """The worker executing each of these Dask task keys now; None for one that is not
        (queued on the scheduler, waiting in a worker's queue, or ended).

        Two round trips: the scheduler says which workers hold any of the keys, and only
        those workers say which they are executing (the scheduler's own view of that lags
        by a heartbeat). A status is a courtesy: a cluster that does not answer gives None.
        """
        found: dict[str, str | None] = dict.fromkeys(keys)
        wanted = set(found)
        if not wanted:
            return found
        try:
            holders = [
                worker
                for worker, held in self.client.processing().items()
                if not wanted.isdisjoint(held)
            ]
            executing = (
                self.client.run(_executing, sorted(wanted), workers=holders) if holders else {}
            )
        except Exception:
            return found
        for worker, running in executing.items():
            for key in running:
                found[key] = worker
        return found

    def submit(
        self,
        request: RunRequest,
        *,
        use_cache: bool = True,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
    ) -> RunFuture:
        runner = self.runner
        resolved = runner.resolve(request)
        if use_cache and not request.interactive:
            cached = runner.results.lookup(resolved.key)
            if cached is not None and runner._trust_of(cached).trusted:
                hit = runner.run(request, on_stdout=on_stdout, on_stderr=on_stderr)
                return RunFuture(self, resolved.key, result=hit)
        # Paths the worker can resolve itself (IPNS names become the CIDs they named here).
        request = replace(
            request,
            rootfs=_lineage_path(resolved.rootfs_path, resolved.rootfs),
            input=(
                _lineage_path(resolved.input_path, resolved.given_input)
                if resolved.input_path
                else None
            ),
        )
        task_key = f"ipfs-execute-{resolved.key}"
        if not use_cache:  # a forced run is its own task
            task_key += f"-{secrets.token_hex(4)}"
        rootfs = resolved.rootfs
        with self._lock:
            staged = sorted(self._placement.get(rootfs, ()))
            # Preferred as long as they have a thread for it (one a worker): the runs beyond
            # go wherever the scheduler likes, so a sweep spreads over every worker.
            workers = staged if self._in_flight.get(rootfs, 0) < len(staged) else []
            self._in_flight[rootfs] = self._in_flight.get(rootfs, 0) + 1
        future = self.client.submit(
            run_on_worker,
            request,
            resolved.key,
            self.peers,
            use_cache,
            key=task_key,
            workers=workers or None,
            allow_other_workers=bool(workers),
        )
        future.add_done_callback(lambda _future: self._ended(rootfs))
        return RunFuture(
            self,
            resolved.key,
            future,
            printed=(on_stdout, on_stderr),
            conditions=RunConditions(use_cache=use_cache),
        )

    def _ended(self, rootfs: str) -> None:
        with self._lock:
            self._in_flight[rootfs] -= 1

    def adopt(self, answer: WorkerAnswer, conditions: RunConditions = ORDINARY) -> RunResult:
        """A worker's answer as this client's result: its record signed, stored and indexed
        here, settled against the client's cached record of its key exactly as a local run
        is (a forced run that disagrees leaves a trusted cached result in place and says so).
        """
        runner = self.runner
        record = RunRecord.from_json(answer.record_json)
        with self._lock:
            self._placement.setdefault(record.rootfs, set()).add(answer.worker)
        # Looked up now, when the run has ended: what the cache holds is what it is weighed
        # against (another run of the key may have been recorded meanwhile).
        cached = runner.results.lookup(record.key) if record.pure and record.key else None
        cached_trust = runner._trust_of(cached) if cached is not None else None
        theirs = record.attestation
        settled = runner._settle(record, cached, cached_trust, conditions)
        if settled.record_cid and theirs and theirs != settled.record.attestation:
            # The worker's word is kept beside it, off the caller's path: the record stands
            # on the client's own.
            threading.Thread(target=_keep_attestation, args=(runner, theirs)).start()
        return RunResult(
            settled.record,
            answer.stdout,
            answer.stderr,
            store=runner.store,
            record_cid=settled.record_cid,
            cache_hit=answer.cache_hit,
            disagreement=settled.disagreement,
            trust=settled.trust,
        )

    def close(self) -> None:
        if not self._owns_client:
            return
        cluster = getattr(self.client, "cluster", None)
        homes: list[str] = []
        if self.throwaway:
            try:
                homes = list(self.client.run(worker_data_directory).values())
            except Exception:
                homes = []  # a cluster already gone: nothing to ask
        self.client.close()
        if cluster is not None:
            cluster.close()
        # A local cluster's workers are named by its scheduler's port: their directories
        # would never be used again (the plugin's teardown has stopped their nodes).
        for home in homes:
            _remove_worker_home(Path(home))


def _executing(keys: list[str], dask_worker: Worker) -> list[str]:
    """Which of these task keys this worker is executing (run with `Client.run`)."""
    wanted = set(keys)
    state = dask_worker.state
    return [task.key for task in (*state.executing, *state.long_running) if task.key in wanted]


def _keep_attestation(runner: Runner, attestation: dict[str, str]) -> None:
    try:
        runner.results.attest(Attestation.from_dict(attestation))
    except (ValueError, IpfsError):
        pass  # one that does not verify is worth nothing to keep


def connect(
    target: object,
    runner: Runner,
    *,
    n_workers: int | None = None,
    timeout: float = CONNECT_TIMEOUT_S,
) -> Cluster:
    """A Cluster for `target`: "tcp://HOST:PORT" (a scheduler), "local" (a LocalCluster of
    processes on this machine) or a `distributed.Client`."""
    if isinstance(target, Client):
        return Cluster(target, runner, owns_client=False)
    if not isinstance(target, str):
        raise ClusterError(
            f"dask={target!r}: give a scheduler address (tcp://HOST:8786), 'local' or a "
            "distributed.Client"
        )
    if target == "local":
        from distributed import LocalCluster

        local = LocalCluster(
            n_workers=n_workers or os.cpu_count() or 1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            local_directory=tempfile.gettempdir(),
        )
        on = Cluster(Client(local), runner, owns_client=True)
        on.throwaway = True
        return on
    try:
        client = Client(target, timeout=timeout)
    except (OSError, TimeoutError) as error:
        raise ClusterError(
            f"cannot reach the Dask scheduler at {target} ({error}): is `dask scheduler` "
            "running there, and the port open?"
        ) from None
    return Cluster(client, runner, owns_client=True)


__all__ = [
    "Cluster",
    "IpfsNodePlugin",
    "RunFuture",
    "WorkerAnswer",
    "connect",
    "dask_setup",
    "dask_teardown",
    "run_on_worker",
]
