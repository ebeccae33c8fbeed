"""ipfs_execute_magic: pure, shareable computations on IPFS content in a bubblewrap sandbox.

The Python API (the CLI and the notebook magic call the same core):

    import ipfs_execute_magic as ie
    data = ie.add("words/")                      # CID of a local folder
    result = ie.run(BUSYBOX, data, "sh", "-c", "sort /input/words.txt > /output/sorted")
    print(result)                                # CID of /output; result.record has the rest

One `Runner` (daemon connection and staging cache) is kept per process, so repeated runs pay
only for the sandbox. `configure(...)` changes its settings.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# `ie.images.busybox()` ...: the example images; a light module (its builders load on use).
from . import images

if TYPE_CHECKING:
    from concurrent.futures import Future

    from .bundle import BundleImport, Shared
    from .cluster import Cluster, RunFuture
    from .disk_space import DiskUsage, GcReport
    from .explanation import Explanation
    from .lineage_graph import LineageNode
    from .node_info import NodeInfo
    from .per_entry import EntriesProgress, EntryResults
    from .record import RunRequest
    from .result import IpfsRef, RunResult
    from .runner import Runner
    from .settings import Settings
    from .store import AddProgress
    from .verification import NotebookVerdict, Verdict

_runner: Runner | None = None
_runner_lock = threading.Lock()
_cluster: Cluster | None = None


def configure(settings: Settings | None = None, *, dask: object = None, **changes: Any) -> Settings:
    """Use these settings for later calls (fields of Settings, e.g. api=..., home=...).

    `dask`: run `submit`, `map` and `map_entries` on a Dask cluster: a scheduler address
    ("tcp://HOST:8786"), "local" (a cluster of worker processes on this machine) or a
    `distributed.Client`; False leaves the cluster. The embedded node then listens for the
    workers' nodes (docs/cluster.md). None keeps the cluster there is.
    """
    global _runner, _cluster
    from .runner import Runner
    from .settings import Settings

    if (dask is not None and dask is not False) or (dask is None and _cluster is not None):
        changes.setdefault("online", True)  # the workers fetch from this node
    base = settings or Settings.from_env()
    if changes:
        base = base.with_changes(**changes)
    with _runner_lock:
        if _runner is not None:
            _runner.close()
        _runner = Runner(base)
        if dask is not None and _cluster is not None:
            _cluster.close()
            _cluster = None
        if dask is not None and dask is not False:
            from .cluster import connect

            _cluster = connect(dask, _runner)
        elif _cluster is not None:
            _cluster.attach(_runner)
    return base


def current_cluster() -> Cluster | None:
    """The Dask cluster `configure(dask=...)` connected (`.client`, `.dashboard_link`), or None."""
    return _cluster


def default_runner() -> Runner:
    global _runner
    with _runner_lock:
        if _runner is None:
            from .runner import Runner

            _runner = Runner()
        return _runner


def run(
    rootfs: str,
    input: str | None = None,
    *args: str,
    script: str | None = None,
    interpreter: str = "sh",
    timeout: float | str | None = None,
    memory: int | str | None = None,
    pids: int | None = None,
    cpus: float | str | None = None,
    tmp_size: int | str | None = None,
    output_size: int | str | None = None,
    output_files: int | str | None = None,
    params: Mapping[str, object] | None = None,
    use_cache: bool = True,
    on_stdout: Callable[[bytes], None] | None = None,
    on_stderr: Callable[[bytes], None] | None = None,
    on_progress: Callable[[str, int, int | None], None] | None = None,
) -> RunResult:
    """Run `/sbin/init ARGS...` of ROOTFS on INPUT (a CID, IPFS path, or a previous result).

    With `script`, the text is written into the input tree and run as
    `/sbin/init INTERPRETER /input/.ipfs-execute/script ARGS...`. Limits override the
    configured ones: `timeout` in seconds, `memory`, `tmp_size` and `output_size` (the disk
    space /output may take) in bytes or as "512M", `output_files` a count, `cpus` the CPU
    time per second of wall clock in CPUs (0.5: half of its one CPU).
    `params` ({"n": 10}) become environment variables of the payload (`$n` in a shell
    script, `os.environ["n"]` in Python): strings as they are, other values as JSON; they
    are part of what identifies the run, like the script.
    The result's `str()` is the output CID; `.record` has everything else. An identical
    earlier run is not repeated: its recorded result comes back with `.cache_hit` set, and
    what it printed is passed to the callbacks again (`use_cache=False` runs anyway).
    """
    from .runner import RunConditions

    runner = default_runner()
    request = _request(
        runner,
        rootfs,
        input,
        args,
        script=script,
        interpreter=interpreter,
        params=params,
        limits=dict(
            timeout=timeout,
            memory=memory,
            pids=pids,
            cpus=cpus,
            tmp_size=tmp_size,
            output_size=output_size,
            output_files=output_files,
        ),
    )
    return runner.run(
        request,
        RunConditions(use_cache=use_cache),
        on_stdout=on_stdout,
        on_stderr=on_stderr,
        on_progress=on_progress,
    )


def submit(
    rootfs: str,
    input: str | None = None,
    *args: str,
    script: str | None = None,
    interpreter: str = "sh",
    timeout: float | str | None = None,
    memory: int | str | None = None,
    pids: int | None = None,
    cpus: float | str | None = None,
    tmp_size: int | str | None = None,
    output_size: int | str | None = None,
    output_files: int | str | None = None,
    params: Mapping[str, object] | None = None,
    use_cache: bool = True,
    on_stdout: Callable[[bytes], None] | None = None,
    on_stderr: Callable[[bytes], None] | None = None,
    on_progress: Callable[[str, int, int | None], None] | None = None,
) -> RunFuture | Future[RunResult]:
    """`run`'s arguments; returns at once a future whose `.result()` is `run`'s RunResult.

    On the Dask cluster of `configure(dask=...)` (a `cluster.RunFuture`: `.dask` is the Dask
    future, None when this machine's result cache answered); without one, in a thread of this
    process, at most one run a core. On a cluster the callbacks get what the run printed when
    it has ended, and `on_progress` is not called.
    """
    runner = default_runner()
    request = _request(
        runner,
        rootfs,
        input,
        args,
        script=script,
        interpreter=interpreter,
        params=params,
        limits=dict(
            timeout=timeout,
            memory=memory,
            pids=pids,
            cpus=cpus,
            tmp_size=tmp_size,
            output_size=output_size,
            output_files=output_files,
        ),
    )
    return _submit_request(
        runner,
        request,
        use_cache,
        on_stdout=on_stdout,
        on_stderr=on_stderr,
        on_progress=on_progress,
    )


_local_pool: Any = None


def _submit_request(
    runner: Runner,
    request: RunRequest,
    use_cache: bool = True,
    *,
    on_stdout: Callable[[bytes], None] | None = None,
    on_stderr: Callable[[bytes], None] | None = None,
    on_progress: Callable[[str, int, int | None], None] | None = None,
) -> RunFuture | Future[RunResult]:
    global _local_pool
    cluster = _cluster
    if cluster is not None:
        return cluster.submit(
            request, use_cache=use_cache, on_stdout=on_stdout, on_stderr=on_stderr
        )
    from concurrent.futures import ThreadPoolExecutor

    from .runner import RunConditions

    with _runner_lock:
        if _local_pool is None:
            _local_pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="ie-run")
    future: Future[RunResult] = _local_pool.submit(
        runner.run,
        request,
        RunConditions(use_cache=use_cache),
        on_stdout=on_stdout,
        on_stderr=on_stderr,
        on_progress=on_progress,
    )
    return future


def map(
    rootfs: str,
    inputs: object,
    *args: str,
    script: str | list[str] | tuple[str, ...] | None = None,
    **options: Any,
) -> list[RunResult]:
    """Runs of ROOTFS over each of INPUTS (a list), or each of a list of scripts on one
    input, in parallel (see `submit`); the results in their order. Other keywords are
    `run`'s."""
    many_inputs = isinstance(inputs, (list, tuple))
    many_scripts = isinstance(script, (list, tuple))
    input_list: list[Any] = list(inputs) if many_inputs else []  # type: ignore[call-overload]
    script_list: list[Any] = list(script) if many_scripts else []  # type: ignore[arg-type]
    if many_inputs and many_scripts and len(input_list) != len(script_list):
        from .errors import UsageError

        raise UsageError(
            f"map: {len(input_list)} inputs but {len(script_list)} scripts: give as many of "
            "each, or one of either"
        )
    count = max(len(input_list), len(script_list)) if many_inputs or many_scripts else 1
    futures = [
        submit(
            rootfs,
            input_list[i] if many_inputs else inputs,  # type: ignore[arg-type]
            *args,
            script=script_list[i] if many_scripts else script,  # type: ignore[arg-type]
            **options,
        )
        for i in range(count)
    ]
    return [future.result() for future in futures]


def map_entries(
    rootfs: str,
    input: str,
    *args: str,
    script: str | None = None,
    on_entry: Callable[[str, RunResult | None, str | None], None] | None = None,
    progress: EntriesProgress | None = None,
    **options: Any,
) -> EntryResults:
    """One run per top-level entry of the INPUT directory, in parallel (see `submit`): the run
    of entry NAME sees an input holding just that entry, at /input/NAME. Each run is cached on
    its own: after one entry changes, one sandbox runs. Returns `EntryResults`: `.output` a
    directory with one entry NAME per successful run (its /output), `.results` by name,
    `.failed` {NAME: why}. `on_entry(name, result, error)` is called as each one ends;
    `progress` (a `per_entry.EntriesProgress`) is kept up to date, for a status line that
    asks it how far the runs have come and where they run. Other keywords are `run`'s."""
    from .per_entry import map_entries as run_entries

    runner = default_runner()

    def submit_one(entry_input: str) -> RunFuture | Future[RunResult]:
        return submit(rootfs, entry_input, *args, script=script, **options)

    return run_entries(runner, str(input), submit_one, on_entry=on_entry, progress=progress)


def _request(
    runner: Runner,
    rootfs: object,
    input: object | None,
    args: tuple[object, ...],
    *,
    script: str | None,
    interpreter: str,
    params: Mapping[str, object] | None,
    limits: Mapping[str, Any],
) -> RunRequest:
    """The RunRequest of `run`'s arguments (also `submit`'s and `map`'s)."""
    from .params import params_from
    from .record import RunRequest

    return RunRequest(
        rootfs=str(rootfs),
        input=str(input) if input is not None else None,
        args=tuple(str(a) for a in args),
        limits=runner.settings.limits.with_overrides(**limits),
        script=script,
        interpreter=interpreter,
        params=params_from(params),
    )


def verify(target: object, runs: int = 1) -> Verdict | NotebookVerdict:
    """Re-run recorded runs without the cache and compare outputs.

    `target` is a RunResult, a record CID or an output CID (-> Verdict), or the path of an
    executed notebook, `.ipynb` (-> NotebookVerdict: every run recorded in it).
    """
    from .verification import verify as verify_stored
    from .verification import verify_notebook

    runner = default_runner()
    if isinstance(target, Path) or str(target).endswith(".ipynb"):
        return verify_notebook(runner, Path(str(target)).expanduser(), runs=runs)
    record_cid = getattr(target, "record_cid", None) or str(target)
    return verify_stored(runner, runner.results.find(record_cid), runs=runs)


def lineage(target: object) -> LineageNode:
    """How a result came to be: the recorded runs behind it, back to data added by hand."""
    from .lineage_graph import lineage as lineage_of

    return lineage_of(default_runner().results, str(target))


def share(
    notebook: str | Path,
    output: str | Path | None = None,
    *,
    pin_remote: str | None = None,
) -> Shared:
    """Bundle everything an executed notebook names (rootfs, inputs, scripts, outputs, run
    records with their attestations, compositions) and write it as one CAR file: `output`,
    by default NOTEBOOK.car beside it. `pin_remote` asks that remote pinning service
    (configured in the node) to pin it instead (with `output`: as well). Print the result."""
    from .bundle import share as share_notebook

    return share_notebook(
        default_runner(),
        Path(notebook),
        out=Path(output) if output is not None else None,
        pin_remote=pin_remote,
    )


def import_bundle(car: str | Path) -> BundleImport:
    """Import a notebook's bundle (a CAR file from `share`): its blocks pinned, its records
    and attestations merged into the result cache with the checks of a cache import (what
    was rejected is in `.report.problems`). Hits still need a trusted key. `car` may be the
    bundle's root CID instead (pinned to a remote service): the node fetches it."""
    from .bundle import import_bundle as import_car

    return import_car(default_runner(), car)


def explain(a: object, b: object) -> Explanation:
    """Why two runs differ (results, record CIDs or output CIDs): the parts of the cache key
    that differ (input files, the script as a diff, parameters ...), then the output files."""
    from .explanation import explain as explain_runs

    def cid_of(target: object) -> str:
        return str(getattr(target, "record_cid", None) or target)

    return explain_runs(default_runner().results, cid_of(a), cid_of(b))


def add(path: str | Path, *, on_progress: Callable[[AddProgress], None] | None = None) -> IpfsRef:
    """Add a local file or directory to IPFS (pinned); return its CID.

    `on_progress(AddProgress)` is called about every 0.15 s while the tree is sent (files,
    bytes, their totals, seconds, `.rate`), and once more with `finished` set at the end.
    """
    import warnings

    from .result import IpfsRef

    store = default_runner().store
    added = store.add_tree(Path(path), on_progress=on_progress)
    for entry in added.left_out:  # FIFOs, sockets, devices: shown, not silently dropped
        warnings.warn(f"{path}/{entry}", stacklevel=2)
    return IpfsRef(added.cid, store)


def get(
    path: object,
    dest: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    on_progress: Callable[[str, int, int | None], None] | None = None,
) -> Path:
    """Write the file or directory at PATH (a CID, IPFS path or result) to DEST; return where.

    A directory becomes DEST itself (which must not exist, or be empty); a file becomes DEST,
    or DEST/NAME when DEST is a directory. An existing DEST is replaced only with
    `overwrite=True`. Written through the safe extractor, atomically: on an error nothing is
    left. `on_progress(what, bytes_so_far, total_or_None)` is called as data arrives.
    """
    from .errors import UsageError
    from .retrieval import retrieve

    target = str(path)
    if not target:  # a RunResult without output
        raise UsageError("nothing to get: that run has no output CID")
    store = default_runner().store
    return retrieve(store, target, dest, overwrite=overwrite, on_progress=on_progress).path


def mkdir(entries: Mapping[str, str]) -> IpfsRef:
    """CID of a new directory with each NAME set to a CID or IPFS path (NAME may be a/b)."""
    from .result import IpfsRef

    runner = default_runner()
    cid = runner.results.compose({name: str(path) for name, path in entries.items()})
    return IpfsRef(cid, runner.store)


def du() -> DiskUsage:
    """What the data directory holds: staging cache, node repo, kept outputs, runs, /output
    templates, the example images' tarballs (print it)."""
    from .disk_space import usage

    return usage(default_runner().settings)


def node_status() -> NodeInfo:
    """The IPFS node in use: embedded or your own daemon, running, its API and gateway, the
    gateway links point to, the repo's size (print it). Never starts the embedded node."""
    from .node_info import node_status as status

    return status(default_runner().settings)


def gc(
    staging_keep: int | str | None = None, *, kept_outputs: bool = False, images: bool = False
) -> GcReport:
    """Free disk: staging entries no run is using (all, or down to `staging_keep` bytes or
    "5G"), directories of runs whose process died, the node's unpinned blocks and the /output
    templates (unless a run is taking one). Outputs, records and the result index are pinned
    and stay. Kept outputs (not yet in IPFS) are deleted only with `kept_outputs=True`; the
    example images' built tarballs only with `images=True` (the next `ie.images.NAME()`
    builds again, to the same CID: from the cached Debian packages, else with apt-get, which
    needs the network). Returns what was freed (print it)."""
    from .disk_space import collect
    from .settings import parse_size

    runner = default_runner()
    keep = 0 if staging_keep is None else parse_size(staging_keep)
    store = None if runner.settings.api else runner.store
    return collect(
        runner.settings, store, staging_keep_bytes=keep, kept_outputs=kept_outputs, images=images
    )


def signing_key() -> str:
    """This data directory's public signing key (`ed25519:...`): give it to whoever should
    trust your results (docs/trust.md)."""
    from .trust import SigningKey

    return SigningKey.public_id_at(default_runner().settings.signing_key_path)


def trusted_keys() -> dict[str, str]:
    """The keys trusted besides this data directory's own: {key: name}."""
    from .trust import TrustedKeys

    return TrustedKeys(default_runner().settings.trusted_keys_path).load()


def trust_key(key: str, name: str = "") -> None:
    """Trust `key`: cached results it attests become hits here (`ipfs-execute trust add`)."""
    from .trust import TrustedKeys

    runner = default_runner()
    TrustedKeys(runner.settings.trusted_keys_path).add(key, name)
    runner.reload_trust()


def untrust_key(key_or_name: str) -> str:
    """Stop trusting a key (given by itself or its name); returns the key."""
    from .trust import TrustedKeys

    runner = default_runner()
    removed = TrustedKeys(runner.settings.trusted_keys_path).remove(key_or_name)
    runner.reload_trust()
    return removed


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext ipfs_execute_magic`: the Jupyter layer is imported only here."""
    from .jupyter.magics import load_ipython_extension as load

    load(ipython)


__all__ = [
    "__version__",
    "add",
    "configure",
    "current_cluster",
    "default_runner",
    "du",
    "explain",
    "gc",
    "get",
    "images",
    "import_bundle",
    "lineage",
    "load_ipython_extension",
    "map",
    "map_entries",
    "mkdir",
    "node_status",
    "run",
    "share",
    "signing_key",
    "submit",
    "trust_key",
    "trusted_keys",
    "untrust_key",
    "verify",
]
