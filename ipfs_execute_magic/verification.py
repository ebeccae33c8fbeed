"""Verification by re-execution: run a recorded computation again and compare outputs.

A mismatch is shown as the files that differ (added, removed, changed, with sizes), not just
two CIDs. With several runs the conditions are varied on purpose (another staging location, a
shuffled directory order, another start time) to expose what the output secretly depends on.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from .cid import is_cid
from .errors import IpfsExecuteError, UsageError
from .record import RunRecord, RunRequest
from .result_cache import StoredRecord
from .runner import RunConditions, Runner
from .settings import Limits
from .staging_cache import remove_tree
from .store import Store

# The verifier's "another start time": the payload's monotonic clock starts here instead of at
# sandbox.CLOCK_START_S (and the wall clock has moved on).
ANOTHER_CLOCK_START_S = 1000.0
CONDITIONS = (
    "same staging",
    "another staging location",
    "shuffled directory order",
    "another start time",
)


@dataclass(frozen=True)
class FileDiff:
    path: str
    change: str  # "added", "removed" or "changed"
    size_before: int | None
    size_after: int | None

    def describe(self) -> str:
        if self.change == "added":
            return f"+ {self.path} ({self.size_after} bytes)"
        if self.change == "removed":
            return f"- {self.path} ({self.size_before} bytes)"
        return f"~ {self.path} ({self.size_before} -> {self.size_after} bytes)"


@dataclass(frozen=True)
class RerunResult:
    condition: str
    output: str | None
    exit_status: int | None
    matches: bool
    diffs: tuple[FileDiff, ...] = ()


@dataclass(frozen=True)
class Verdict:
    record_cid: str
    record: RunRecord
    reruns: tuple[RerunResult, ...] = field(default_factory=tuple)
    trust: str | None = None  # who attests the recorded output, after this verification

    @property
    def reproducible(self) -> bool:
        return bool(self.reruns) and all(r.matches for r in self.reruns)

    def describe(self) -> str:
        lines = [f"record {self.record_cid}: output {self.record.output}"]
        for rerun in self.reruns:
            verdict = "same output" if rerun.matches else f"DIFFERENT output {rerun.output}"
            if rerun.exit_status not in (0, None) or rerun.exit_status != self.record.exit_status:
                verdict += f" (exit status {rerun.exit_status})"
            lines.append(f"  re-run, {rerun.condition}: {verdict}")
            lines.extend(f"    {diff.describe()}" for diff in rerun.diffs)
        if self.trust:
            lines.append(f"attestations: {self.trust}")
        lines.append(
            "verdict: reproducible"
            if self.reproducible
            else "verdict: NOT reproducible: the output depends on something outside "
            "(rootfs, input, arguments)"
        )
        return "\n".join(lines)


def diff_trees(store: Store, before: str, after: str) -> list[FileDiff]:
    """The files that differ between two directory CIDs (or two file CIDs)."""

    def listing(cid: str) -> dict[str, tuple[str, int, str]]:
        if store.stat(cid).kind != "directory":
            return {"": (cid, store.stat(cid).size, "file")}
        return {path: (entry.cid, entry.size, entry.kind) for path, entry in store.walk(cid)}

    old, new = listing(before), listing(after)
    diffs: list[FileDiff] = []
    for path in sorted(old.keys() | new.keys()):
        if path not in new:
            diffs.append(FileDiff(path, "removed", old[path][1], None))
        elif path not in old:
            diffs.append(FileDiff(path, "added", None, new[path][1]))
        elif old[path][0] != new[path][0] and old[path][2] != "directory":
            diffs.append(FileDiff(path, "changed", old[path][1], new[path][1]))
    return diffs


def request_of(record: RunRecord) -> RunRequest:
    """The request that repeats a recorded run exactly (its input already holds the script)."""
    limits = Limits(**{k: v for k, v in record.limits.items() if k in Limits.__dataclass_fields__})
    return RunRequest(
        rootfs=record.rootfs,
        input=record.input,
        args=tuple(record.args),
        limits=limits,
        params=tuple(sorted(record.params.items())),
    )


def verify(
    runner: Runner,
    stored: StoredRecord,
    *,
    runs: int = 1,
    on_rerun: Callable[[RerunResult], None] | None = None,
) -> Verdict:
    """Re-run a recorded computation `runs` times without the cache and compare outputs."""
    if runs < 1:
        raise UsageError("--runs must be at least 1")
    record = stored.record
    if record.output is None:
        raise UsageError(f"record {stored.cid} has no output to compare with")
    request = request_of(record)
    reruns: list[RerunResult] = []
    for index in range(runs):
        condition = CONDITIONS[index % len(CONDITIONS)] if runs > 1 else CONDITIONS[0]
        rerun_record = _rerun(runner, request, condition)
        matches = rerun_record.output == record.output
        diffs = (
            ()
            if matches or rerun_record.output is None
            else tuple(diff_trees(runner.store, record.output, rerun_record.output))
        )
        rerun = RerunResult(
            condition, rerun_record.output, rerun_record.exit_status, matches, diffs
        )
        reruns.append(rerun)
        if on_rerun is not None:
            on_rerun(rerun)
    trust = None
    if record.key is not None and record.key == record.recomputed_key():
        # What this node got, signed and kept beside the record: an agreeing verification
        # adds its key to those that attest the output, a disagreeing one records a conflict.
        for output in dict.fromkeys(r.output for r in reruns if r.output is not None):
            runner.results.attest(runner.signing_key.attest(record.key, output))
        summary = runner.trust_policy.summarize(
            record.output, runner.results.attestations(record.key)
        )
        trust = summary.describe()
    return Verdict(stored.cid, record, tuple(reruns), trust)


def _rerun(runner: Runner, request: RunRequest, condition: str) -> RunRecord:
    # index=False: a check must not change what the cache returns or what lineage shows (a
    # re-run's record has no script and names the input with the script in it).
    base = RunConditions(use_cache=False, index=False)
    if condition == "another staging location":
        scratch = Path(tempfile.mkdtemp(prefix="verify-", dir=runner.settings.home))
        scratch.chmod(0o755)  # the sandbox uid must traverse it
        try:
            return runner.run(request, replace(base, staging_dir=scratch)).record
        finally:
            remove_tree(scratch)
    if condition == "shuffled directory order":
        return runner.run(request, replace(base, shuffle_directories=True)).record
    if condition == "another start time":
        time.sleep(1.1)  # the wall clock, and anything derived from it, moves on
        return runner.run(request, replace(base, clock_start_s=ANOTHER_CLOCK_START_S)).record
    return runner.run(request, base).record


_RECORD_IN_TEXT = re.compile(r"record[:= ]+\s*(?:ipfs://)?(b[a-z2-7]{50,})")


def records_in_notebook(path: Path) -> list[tuple[int, str]]:
    """(cell index, record CID) of every recorded run in an executed notebook."""
    try:
        notebook = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: not a readable notebook ({error})") from None
    found: list[tuple[int, str]] = []
    for index, cell in enumerate(notebook.get("cells", [])):
        seen: set[str] = set()
        for output in cell.get("outputs", []):
            meta = (output.get("metadata") or {}).get("ipfs_execute")
            if isinstance(meta, dict):
                # Our displays say what they show: a run (its record), or a view such as a
                # verdict or a lineage that only mentions records of runs made elsewhere.
                candidates = [str(meta["record"])] if meta.get("record") else []
            else:
                text = (output.get("data") or {}).get("text/plain", "")
                text = "".join(text) if isinstance(text, list) else str(text)
                candidates = _RECORD_IN_TEXT.findall(text)
            for cid in candidates:
                if cid and is_cid(cid) and cid not in seen:
                    seen.add(cid)
                    found.append((index, cid))
    return found


@dataclass(frozen=True)
class StaleCell:
    """A saved result that read a variable since bound to another CID by an earlier cell."""

    cell: int  # index in the notebook's cells
    execution_count: int | None
    variable: str
    read: str  # the CID the variable held when the cell ran
    bound: str  # what the earlier cell's saved result binds it to
    bound_by: int  # that cell's index

    def describe(self) -> str:
        shown = f" (In [{self.execution_count}])" if self.execution_count is not None else ""
        return (
            f"cell {self.cell}{shown}: stale: ${self.variable} changed (it read {self.read}; "
            f"cell {self.bound_by} binds it to {self.bound} now): run it again"
        )


def stale_cells(path: Path) -> list[StaleCell]:
    """The cells of a saved notebook whose results are stale: each result's metadata names the
    variables its magic line read (with their CIDs) and the one it bound (-o NAME); a variable
    an earlier cell's saved result binds to another CID makes the reader stale."""
    try:
        cells = json.loads(path.read_text()).get("cells", [])
    except (OSError, ValueError, AttributeError) as error:
        raise UsageError(f"{path}: not a readable notebook ({error})") from None
    bound: dict[str, tuple[str, int]] = {}  # variable -> (output CID, cell index)
    found: list[StaleCell] = []
    for index, cell in enumerate(cells):
        if not isinstance(cell, dict):
            continue
        binds: dict[str, str] = {}
        for output in cell.get("outputs", []):
            meta = (output.get("metadata") or {}).get("ipfs_execute")
            if not isinstance(meta, dict):
                continue
            reads = meta.get("reads")
            for name, cid in reads.items() if isinstance(reads, dict) else ():
                if name in bound and bound[name][0] != cid:
                    found.append(
                        StaleCell(
                            index,
                            cell.get("execution_count"),
                            str(name),
                            str(cid),
                            bound[name][0],
                            bound[name][1],
                        )
                    )
            if isinstance(meta.get("binds"), str) and meta.get("output"):
                binds[meta["binds"]] = str(meta["output"])
        # Bound after the cell's own reads: a cell reading and rebinding a name is not stale.
        bound.update({name: (cid, index) for name, cid in binds.items()})
    return found


# -- a whole notebook --------------------------------------------------------------------------


@dataclass(frozen=True)
class CellVerdict:
    cell: int  # index in the notebook's cells
    execution_count: int | None
    record_cid: str
    verdict: Verdict | None = None
    error: str | None = None  # why the run could not be verified

    @property
    def label(self) -> str:
        shown = f" (In [{self.execution_count}])" if self.execution_count is not None else ""
        return f"cell {self.cell}{shown}"

    @property
    def reproducible(self) -> bool:
        return self.verdict is not None and self.verdict.reproducible

    def describe(self) -> str:
        if self.verdict is None:
            return f"{self.label}: record {self.record_cid} could not be verified: {self.error}"
        return f"{self.label}: {self.verdict.describe()}"


@dataclass(frozen=True)
class NotebookVerdict:
    """Every recorded run of an executed notebook, re-run and checked."""

    path: str
    cells: tuple[CellVerdict, ...]
    stale: tuple[StaleCell, ...] = ()  # results whose inputs were rebound (see stale_cells)

    @property
    def reproducible(self) -> bool:
        return bool(self.cells) and all(cell.reproducible for cell in self.cells)

    def __iter__(self) -> Iterator[CellVerdict]:
        return iter(self.cells)

    def __len__(self) -> int:
        return len(self.cells)

    def describe(self) -> str:
        return "\n".join([cell.describe() for cell in self.cells] + self.stale_lines())

    def stale_lines(self) -> list[str]:
        return [stale.describe() for stale in self.stale]


def execution_counts(path: Path) -> dict[int, int | None]:
    try:
        cells = json.loads(path.read_text()).get("cells", [])
    except (OSError, ValueError, AttributeError):
        return {}
    return {
        index: cell.get("execution_count")
        for index, cell in enumerate(cells)
        if isinstance(cell, dict)
    }


def verify_notebook(
    runner: Runner,
    path: Path,
    *,
    runs: int = 1,
    on_progress: Callable[[str], None] | None = None,
    on_cell: Callable[[CellVerdict], None] | None = None,
) -> NotebookVerdict:
    """Re-run every run recorded in an executed notebook; a record shown twice runs once.

    A run that cannot be verified (its record is not on this node, ...) is reported in its
    cell and the others go on. `on_cell` hears of each cell as soon as it is decided.
    """
    found = records_in_notebook(path)  # raises UsageError for a bad file
    if not found:
        raise UsageError(f"{path}: no recorded runs in it (was it executed and saved?)")
    stale = tuple(stale_cells(path))
    counts = execution_counts(path)
    done: dict[str, CellVerdict] = {}
    cells: list[CellVerdict] = []
    for number, (index, record_cid) in enumerate(found, 1):
        if on_progress is not None:
            on_progress(
                f"verifying cell {index} ({number} of {len(found)} recorded runs): "
                f"record {record_cid}"
            )
        if record_cid in done:
            earlier = done[record_cid]
            outcome = CellVerdict(
                index, counts.get(index), record_cid, earlier.verdict, earlier.error
            )
        else:
            try:
                verdict = verify(runner, runner.results.find(record_cid), runs=runs)
                outcome = CellVerdict(index, counts.get(index), record_cid, verdict)
            except IpfsExecuteError as error:
                outcome = CellVerdict(index, counts.get(index), record_cid, error=str(error))
            done[record_cid] = outcome
        cells.append(outcome)
        if on_cell is not None:
            on_cell(outcome)
    return NotebookVerdict(str(path), tuple(cells), stale)
