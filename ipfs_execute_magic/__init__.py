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

if TYPE_CHECKING:
    from .disk_space import DiskUsage, GcReport
    from .lineage_graph import LineageNode
    from .result import IpfsRef, RunResult
    from .runner import Runner
    from .settings import Settings
    from .store import AddProgress
    from .verification import NotebookVerdict, Verdict

_runner: Runner | None = None
_runner_lock = threading.Lock()


def configure(settings: Settings | None = None, **changes: Any) -> Settings:
    """Use these settings for later calls (fields of Settings, e.g. api=..., home=...)."""
    global _runner
    from .runner import Runner
    from .settings import Settings

    base = settings or Settings.from_env()
    if changes:
        base = base.with_changes(**changes)
    with _runner_lock:
        if _runner is not None:
            _runner.close()
        _runner = Runner(base)
    return base


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
    The result's `str()` is the output CID; `.record` has everything else. An identical
    earlier run is not repeated: its recorded result comes back with `.cache_hit` set, and
    what it printed is passed to the callbacks again (`use_cache=False` runs anyway).
    """
    from .record import RunRequest
    from .runner import RunConditions

    runner = default_runner()
    limits = runner.settings.limits.with_overrides(
        timeout=timeout,
        memory=memory,
        pids=pids,
        cpus=cpus,
        tmp_size=tmp_size,
        output_size=output_size,
        output_files=output_files,
    )
    request = RunRequest(
        rootfs=str(rootfs),
        input=str(input) if input is not None else None,
        args=tuple(str(a) for a in args),
        limits=limits,
        script=script,
        interpreter=interpreter,
    )
    return runner.run(
        request,
        RunConditions(use_cache=use_cache),
        on_stdout=on_stdout,
        on_stderr=on_stderr,
        on_progress=on_progress,
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
    """What the data directory holds: staging cache, node repo, kept outputs, runs (print it)."""
    from .disk_space import usage

    return usage(default_runner().settings)


def gc(staging_keep: int | str | None = None, *, kept_outputs: bool = False) -> GcReport:
    """Free disk: staging entries no run is using (all, or down to `staging_keep` bytes or
    "5G"), directories of runs whose process died, and the node's unpinned blocks. Outputs,
    records and the result index are pinned and stay. Kept outputs (not yet in IPFS) are
    deleted only with `kept_outputs=True`. Returns what was freed (print it)."""
    from .disk_space import collect
    from .settings import parse_size

    runner = default_runner()
    keep = 0 if staging_keep is None else parse_size(staging_keep)
    store = None if runner.settings.api else runner.store
    return collect(runner.settings, store, staging_keep_bytes=keep, kept_outputs=kept_outputs)


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext ipfs_execute_magic`: the Jupyter layer is imported only here."""
    from .jupyter.magics import load_ipython_extension as load

    load(ipython)


__all__ = [
    "__version__",
    "add",
    "configure",
    "default_runner",
    "du",
    "gc",
    "get",
    "lineage",
    "load_ipython_extension",
    "mkdir",
    "run",
    "verify",
]
