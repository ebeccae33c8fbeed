"""Verification by re-execution: run a recorded computation again and compare outputs.

A mismatch is shown as the files that differ (added, removed, changed, with sizes), not just
two CIDs. With several runs the conditions are varied on purpose (another staging location, a
shuffled directory order, another start time) to expose what the output secretly depends on.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .cache import remove_tree
from .errors import UsageError
from .record import RunRecord, RunRequest
from .result_cache import StoredRecord
from .runner import Runner
from .settings import Limits
from .store import Store, is_cid

CONDITIONS = ("same staging", "another staging location", "shuffled directory order",
              "another start time")


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
        lines.append("verdict: reproducible" if self.reproducible else
                     "verdict: NOT reproducible: the output depends on something outside "
                     "(rootfs, input, arguments)")
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
    return RunRequest(rootfs=record.rootfs, input=record.input, args=tuple(record.args),
                      limits=limits)


@contextlib.contextmanager
def _another_staging(runner: Runner) -> Iterator[Runner]:
    scratch = Path(tempfile.mkdtemp(prefix="verify-", dir=runner.settings.home))
    scratch.chmod(0o755)
    other = Runner(runner.settings.with_changes(home=scratch), store=runner.store)
    try:
        yield other
    finally:
        remove_tree(scratch)


def verify(runner: Runner, stored: StoredRecord, *, runs: int = 1,
           on_rerun: Callable[[RerunResult], None] | None = None) -> Verdict:
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
        outcome_record = _rerun(runner, request, condition)
        matches = outcome_record.output == record.output
        diffs = () if matches or outcome_record.output is None else tuple(
            diff_trees(runner.store, record.output, outcome_record.output))
        rerun = RerunResult(condition, outcome_record.output, outcome_record.exit_status,
                            matches, diffs)
        reruns.append(rerun)
        if on_rerun is not None:
            on_rerun(rerun)
    return Verdict(stored.cid, record, tuple(reruns))


def _rerun(runner: Runner, request: RunRequest, condition: str) -> RunRecord:
    # index=False: a check must not change what the cache returns or what lineage shows (a
    # re-run's record has no script and names the input with the script in it).
    if condition == "another staging location":
        with _another_staging(runner) as other:
            return other.run(request, use_cache=False, index=False).record
    if condition == "shuffled directory order":
        return runner.run(request, use_cache=False, shuffle_directories=True,
                          index=False).record
    if condition == "another start time":
        time.sleep(1.1)  # the wall clock, and anything derived from it, moves on
    return runner.run(request, use_cache=False, index=False).record


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

