"""One run per top-level entry of an input directory (`ie.map_entries`, `--each`).

The run of entry NAME sees an input directory holding just that entry, under its own name
(/input/NAME), so its cache key depends on that entry alone: after one entry of a big data set
changes, one sandbox runs and every other entry's result comes from the cache. The outputs of
the runs that succeeded are composed into one directory, one entry NAME per input entry;
a failed entry is named in `failed` and leaves the others' results whole.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .errors import IpfsExecuteError, UsageError
from .result import IpfsRef, RunResult

if TYPE_CHECKING:
    from .runner import Runner


COMPOSE_THREADS = 8
WAIT_SLICE_S = 0.5  # the wait for the next entry to end is interruptible this often

# Where each Dask task key is being executed: {key: worker address, or None when it is not}.
WhereFunction = Callable[[Iterable[str]], dict[str, str | None]]


class _ResultFuture(Protocol):
    def result(self, timeout: float | None = None) -> RunResult: ...

    def done(self) -> bool: ...

    def add_done_callback(self, fn: Callable[[Any], Any]) -> None: ...


@dataclass(frozen=True)
class EntriesSnapshot:
    """How far a `map_entries` has come, at one moment (for a status line)."""

    total: int
    done: int  # ended, one way or another
    cached: int  # of those, answered by a result cache
    ran: int  # of those, whose sandbox ran (failed or not)
    failed: int  # of those, failed: the payload, or the run without a result
    running: tuple[tuple[str, str | None], ...]  # (entry, worker; None off a cluster)
    waiting: int  # neither ended nor running: queued


class EntriesProgress:
    """The entries of a `map_entries` in flight, fed by it as they are submitted and end;
    `snapshot()` says how far it has come and which entries are running where."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: dict[str, _ResultFuture | Future[RunResult]] = {}
        self._ended: dict[str, RunResult | None] = {}  # None: failed without a result

    def submitted(self, futures: dict[str, _ResultFuture | Future[RunResult]]) -> None:
        with self._lock:
            self._futures = dict(futures)

    def ended(self, name: str, result: RunResult | None) -> None:
        with self._lock:
            self._ended[name] = result

    def snapshot(self, where: WhereFunction | None = None) -> EntriesSnapshot:
        """Counts of what has ended; what runs where: `where` (`Cluster.where`) for runs on
        a Dask cluster, else the thread-pool runs that have started."""
        with self._lock:
            futures = dict(self._futures)
            ended = dict(self._ended)
        cached = sum(1 for r in ended.values() if r is not None and r.cache_hit)
        ran = sum(1 for r in ended.values() if r is not None and not r.cache_hit)
        failed = sum(1 for r in ended.values() if r is None or not r.ok)
        pending = {name: f for name, f in futures.items() if name not in ended}
        keyed: dict[str, str] = {}
        running: list[tuple[str, str | None]] = []
        for name, future in pending.items():
            dask_future = getattr(future, "dask", None)
            if dask_future is not None:
                keyed[name] = str(dask_future.key)
            elif isinstance(future, Future) and future.running():
                running.append((name, None))
        if keyed and where is not None:
            workers = where(keyed.values())
            running += [
                (name, workers[key]) for name, key in keyed.items() if workers.get(key) is not None
            ]
        return EntriesSnapshot(
            total=len(futures),
            done=len(ended),
            cached=cached,
            ran=ran,
            failed=failed,
            running=tuple(running),
            waiting=len(pending) - len(running),
        )


@dataclass(repr=False)
class EntryResults:
    """The runs of `map_entries`: `str()` is the composed output directory's CID."""

    output: IpfsRef  # NAME -> that entry's /output, for each run that succeeded
    results: dict[str, RunResult] = field(default_factory=dict)  # every run that ended
    failed: dict[str, str] = field(default_factory=dict)  # NAME -> why, in one line

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def executed(self) -> list[str]:
        """The entries whose sandbox ran (not answered by the cache)."""
        return [name for name, result in self.results.items() if not result.cache_hit]

    def __str__(self) -> str:
        return str(self.output)

    def __repr__(self) -> str:
        ran = len(self.executed)
        cached = len(self.results) - ran
        failed = f"; failed: {', '.join(self.failed)}" if self.failed else ""
        return (
            f"EntryResults({str(self.output)!r}: {len(self.results)} entries, {ran} ran, "
            f"{cached} from the cache{failed})"
        )

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __truediv__(self, sub: str) -> IpfsRef:
        return self.output / sub


def entry_inputs(runner: Runner, input: str) -> dict[str, str]:
    """{NAME: CID of a directory holding just INPUT's entry NAME}, in the input's order."""
    store = runner.store
    root = store.resolve(input)
    if store.stat(root).kind != "directory":
        raise UsageError(f"{input} is not a directory: one run per entry needs a directory")
    entries = store.ls(root)
    if not entries:
        raise UsageError(f"{input} is an empty directory: there is no entry to run on")
    # A few round trips each, independent: in parallel (a 1,000-entry re-run is mostly this).
    with ThreadPoolExecutor(COMPOSE_THREADS, thread_name_prefix="ie-entry") as pool:
        composed = pool.map(lambda entry: runner.results.compose({entry.name: entry.cid}), entries)
        return {entry.name: cid for entry, cid in zip(entries, composed, strict=True)}


def map_entries(
    runner: Runner,
    input: str,
    submit: Callable[[str], _ResultFuture | Future[RunResult]],
    *,
    on_entry: Callable[[str, RunResult | None, str | None], None] | None = None,
    progress: EntriesProgress | None = None,
) -> EntryResults:
    """Submit one run per entry of `input` (`submit(entry_input)` gives its future), wait for
    them all, and compose the outputs of those that succeeded. `on_entry` hears of each run
    as it ends (in the order they end); `progress` is kept up to date for a status line."""
    inputs = entry_inputs(runner, input)
    futures = {name: submit(entry_input) for name, entry_input in inputs.items()}
    if progress is not None:
        progress.submitted(futures)
    # Taken in the order they end: a slow first entry holds up neither the count nor the
    # lines of the others.
    ended: queue.SimpleQueue[str] = queue.SimpleQueue()
    for name, future in futures.items():
        future.add_done_callback(functools.partial(_put_name, ended, name))
    ended_results: dict[str, RunResult] = {}
    ended_failed: dict[str, str] = {}
    for _ in futures:
        name = _next_ended(ended)
        try:
            result = futures[name].result()
        except Exception as error:  # the tool's, or the cluster's (a task lost with workers)
            ended_failed[name] = (
                str(error)
                if isinstance(error, IpfsExecuteError)
                else f"{type(error).__name__}: {error}"
            )
            if progress is not None:
                progress.ended(name, None)
            if on_entry is not None:
                on_entry(name, None, ended_failed[name])
            continue
        ended_results[name] = result
        if not result.ok:
            ended_failed[name] = _why(result)
        if progress is not None:
            progress.ended(name, result)
        if on_entry is not None:
            on_entry(name, result, ended_failed.get(name))
    # In the input's order, whatever order they ended in.
    results = {name: ended_results[name] for name in futures if name in ended_results}
    failed = {name: ended_failed[name] for name in futures if name in ended_failed}
    outputs = {
        name: str(result.output)
        for name, result in results.items()
        if name not in failed and result.record.output
    }
    composed = runner.results.compose(outputs) if outputs else runner.store.empty_directory()
    return EntryResults(IpfsRef(composed, runner.store), results, failed)


def _put_name(ended: queue.SimpleQueue[str], name: str, _future: object) -> None:
    ended.put(name)


def _next_ended(ended: queue.SimpleQueue[str]) -> str:
    # In slices: a plain get() would hold off Ctrl-C until the next entry ends.
    while True:
        try:
            return ended.get(timeout=WAIT_SLICE_S)
        except queue.Empty:
            continue


def _why(result: RunResult) -> str:
    record = result.record
    killed = record.killed_text()
    if killed:
        return killed
    if record.timed_out:
        return "timed out"
    tail = result.stderr_text.strip().splitlines()[-1:] if result.stderr else []
    said = f": {tail[0][:200]}" if tail else ""
    return f"exit status {record.exit_status}{said}"
