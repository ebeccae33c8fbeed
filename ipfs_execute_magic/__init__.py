"""ipfs_execute_magic: pure, shareable computations on IPFS content in a bubblewrap sandbox.

The Python API (the CLI and the notebook magic call the same core):

    import ipfs_execute_magic as ie
    data = ie.add("words/")                      # CID of a local folder
    record = ie.run(BUSYBOX, data, "sh", "-c", "sort /input/words.txt > /output/sorted")
    print(record.output)                         # CID of /output

One `Runner` (daemon connection and staging cache) is kept per process, so repeated runs pay
only for the sandbox. `configure(...)` changes its settings.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .lineage import LineageNode
    from .result import IpfsRef, RunResult
    from .runner import Runner
    from .settings import Settings
    from .verify import Verdict

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


def run(rootfs: str, input: str | None = None, *args: str, script: str | None = None,
        interpreter: str = "sh", timeout: float | None = None,
        memory: int | None = None, pids: int | None = None, tmp_bytes: int | None = None,
        use_cache: bool = True, on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        on_progress: Callable[[str, int, int | None], None] | None = None) -> RunResult:
    """Run `/sbin/init ARGS...` of ROOTFS on INPUT (a CID, IPFS path, or a previous result).

    With `script`, the text is written into the input tree and run as
    `/sbin/init INTERPRETER /input/.ipfs-execute/script ARGS...`. The result's `str()` is the
    output CID; `.record` has everything else. An identical earlier run is not repeated:
    its recorded result comes back with `.cache_hit` set (`use_cache=False` runs anyway).
    """
    from dataclasses import replace

    from .record import RunRequest

    runner = default_runner()
    limits = runner.settings.limits
    changes = {k: v for k, v in (("timeout", timeout), ("memory_bytes", memory), ("pids", pids),
                                 ("tmp_bytes", tmp_bytes)) if v is not None}
    if changes:
        limits = replace(limits, **changes)
    request = RunRequest(rootfs=str(rootfs), input=str(input) if input is not None else None,
                         args=tuple(str(a) for a in args), limits=limits, script=script,
                         interpreter=interpreter)
    return runner.execute(request, on_stdout=on_stdout, on_stderr=on_stderr,
                          on_progress=on_progress, use_cache=use_cache)


def verify(target: object, runs: int = 1) -> Verdict:
    """Re-run a recorded run (a RunResult, a record CID or an output CID) and compare outputs."""
    from .verify import verify as verify_stored

    runner = default_runner()
    record_cid = getattr(target, "record_cid", None) or str(target)
    return verify_stored(runner, runner.results.find(record_cid), runs=runs)


def lineage(target: object) -> LineageNode:
    """How a result came to be: the recorded runs behind it, back to data added by hand."""
    from .lineage import lineage as lineage_of

    return lineage_of(default_runner().results, str(target))


def add(path: str | Path) -> IpfsRef:
    """Add a local file or directory to IPFS (pinned); return its CID."""
    from .result import IpfsRef

    store = default_runner().store
    return IpfsRef(store.add_path(Path(path)), store)


def mkdir(entries: Mapping[str, str]) -> IpfsRef:
    """CID of a new directory with each NAME set to a CID or IPFS path (NAME may be a/b)."""
    from .result import IpfsRef

    runner = default_runner()
    cid = runner.results.compose({name: str(path) for name, path in entries.items()})
    return IpfsRef(cid, runner.store)


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext ipfs_execute_magic`: the Jupyter layer is imported only here."""
    from .jupyter.magics import load_ipython_extension as load

    load(ipython)


__all__ = ["__version__", "add", "configure", "default_runner", "lineage",
           "load_ipython_extension", "mkdir", "run", "verify"]
