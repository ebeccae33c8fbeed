"""One run per top-level entry of an input directory (`ie.map_entries`, `--each`).

The run of entry NAME sees an input directory holding just that entry, under its own name
(/input/NAME), so its cache key depends on that entry alone: after one entry of a big data set
changes, one sandbox runs and every other entry's result comes from the cache. The outputs of
the runs that succeeded are composed into one directory, one entry NAME per input entry;
a failed entry is named in `failed` and leaves the others' results whole.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .errors import IpfsExecuteError, UsageError
from .result import IpfsRef, RunResult

if TYPE_CHECKING:
    from .runner import Runner


COMPOSE_THREADS = 8


class _ResultFuture(Protocol):
    def result(self, timeout: float | None = None) -> RunResult: ...


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
) -> EntryResults:
    """Submit one run per entry of `input` (`submit(entry_input)` gives its future), wait for
    them all, and compose the outputs of those that succeeded."""
    inputs = entry_inputs(runner, input)
    futures = {name: submit(entry_input) for name, entry_input in inputs.items()}
    results: dict[str, RunResult] = {}
    failed: dict[str, str] = {}
    for name, future in futures.items():
        try:
            result = future.result()
        except Exception as error:  # the tool's, or the cluster's (a task lost with workers)
            failed[name] = (
                str(error)
                if isinstance(error, IpfsExecuteError)
                else f"{type(error).__name__}: {error}"
            )
            if on_entry is not None:
                on_entry(name, None, failed[name])
            continue
        results[name] = result
        if not result.ok:
            failed[name] = _why(result)
        if on_entry is not None:
            on_entry(name, result, failed.get(name))
    outputs = {
        name: str(result.output)
        for name, result in results.items()
        if name not in failed and result.record.output
    }
    composed = runner.results.compose(outputs) if outputs else runner.store.empty_directory()
    return EntryResults(IpfsRef(composed, runner.store), results, failed)


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
