"""Stale results: which bound variables each `%%ipfs_execute` cell read, and the CIDs they held.

Cells chain by variables: cell B reads `$counts`, bound by cell A. When `counts` later holds
another CID, B's displayed result no longer follows from what is bound: it is stale. The magics
keep one ledger per kernel (a CellRun per run of the magic), refresh it after each cell, and
the display marks stale results and updates their live headers. Plain Python, no IPython: the
magics feed it the namespace.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..cid import IpfsPath
from ..errors import UsageError
from ..per_entry import EntryResults
from ..result import IpfsRef, RunResult

# `$name` (not `$$`, IPython's literal dollar) and `{name...}` (not `{{`) as IPython expands them
# in a magic line.
_DOLLAR_NAME = re.compile(r"(?<!\$)\$([A-Za-z_]\w*)")
_BRACE_NAME = re.compile(r"(?<!\{)\{\s*([A-Za-z_]\w*)")


def names_read(line: str) -> list[str]:
    """The variables a magic line, as written, reads through `$name` or `{name...}`."""
    found = _DOLLAR_NAME.findall(line) + _BRACE_NAME.findall(line)
    return list(dict.fromkeys(found))


def cid_of(value: Any) -> str | None:
    """The CID or IPFS path a bound value stands for (a result: its output; the runs of
    `--each`: their composed output directory), else None."""
    if isinstance(value, RunResult):
        return value.record.output
    if isinstance(value, EntryResults):
        return str(value.output)
    if isinstance(value, IpfsRef):
        return str(value)
    if isinstance(value, str):
        try:
            IpfsPath.parse(value)
        except UsageError:
            return None
        return value
    return None


@dataclass(eq=False)
class CellRun:
    """One run of the magic in this kernel: what it read, what it bound, how to run it again."""

    number: int  # order of the runs in this kernel
    line: str  # the magic line as written: `$name` and `{expr}` unexpanded
    cell: str | None  # the cell's script (None: the line magic)
    reads: dict[str, str]  # variable -> the CID it held when the cell ran
    binds: str | None = None  # -o NAME
    cell_id: str | None = None  # the front end's id of the cell, when it sends one
    execution_count: int | None = None
    result: RunResult | EntryResults | None = None  # EntryResults: an --each cell
    superseded: bool = False  # the same cell (or its -o NAME) ran again since
    changed: dict[str, str | None] = field(default_factory=dict)  # variable -> its value now
    listeners: list[Callable[[str | None], None]] = field(default_factory=list)

    @property
    def stale(self) -> bool:
        return bool(self.changed)

    def stale_text(self) -> str | None:
        """ "stale: $counts changed", or None while every input is still bound as it was."""
        if not self.changed:
            return None
        names = ", ".join(f"${name}" for name in self.changed)
        return f"stale: {names} changed"

    def source(self) -> str:
        if self.cell is None:
            return f"%ipfs_execute {self.line}"
        return f"%%ipfs_execute {self.line}\n{self.cell}"


class StaleLedger:
    """The runs of this kernel, in order; which of them read variables since rebound."""

    def __init__(self) -> None:
        self.runs: list[CellRun] = []

    def add(
        self,
        line: str,
        cell: str | None,
        namespace: Mapping[str, Any],
        *,
        binds: str | None = None,
        cell_id: str | None = None,
        execution_count: int | None = None,
    ) -> CellRun:
        """A run starting now: the variables its line reads, and the CIDs they hold."""
        reads: dict[str, str] = {}
        for name in names_read(line):
            # A cell that reads and rebinds one name moved it on itself: never stale for it.
            if name != binds and name in namespace:
                cid = cid_of(namespace[name])
                if cid is not None:
                    reads[name] = cid
        run = CellRun(
            len(self.runs) + 1,
            line,
            cell,
            reads,
            binds=binds,
            cell_id=cell_id,
            execution_count=execution_count,
        )
        for earlier in self.runs:
            same_cell = (
                earlier.cell_id == cell_id
                if cell_id is not None and earlier.cell_id is not None
                else (earlier.line, earlier.cell) == (line, cell)
            )
            if same_cell or (binds is not None and earlier.binds == binds):
                earlier.superseded = True
        self.runs.append(run)
        return run

    def find(self, result: object) -> CellRun | None:
        """The latest run that gave this result (the object, not an equal one)."""
        for run in reversed(self.runs):
            if run.result is result:
                return run
        return None

    def refresh(self, namespace: Mapping[str, Any]) -> list[CellRun]:
        """Compare every run's inputs with what the variables hold now; the runs whose
        staleness changed are returned, after their listeners heard the new text."""
        moved = []
        for run in self.runs:
            changed: dict[str, str | None] = {}
            for name, cid in run.reads.items():
                now = cid_of(namespace[name]) if name in namespace else None
                if now != cid:
                    changed[name] = now
            if changed != run.changed:
                run.changed = changed
                moved.append(run)
                for listener in run.listeners:
                    listener(run.stale_text())
        return moved

    def stale_runs(self) -> list[CellRun]:
        """The runs still current (not re-run since) whose inputs changed, in order."""
        return [run for run in self.runs if run.stale and not run.superseded]


__all__ = ["CellRun", "StaleLedger", "cid_of", "names_read"]
