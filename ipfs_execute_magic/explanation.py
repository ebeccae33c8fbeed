"""Why two runs differ: their records compared part by part, in the order of the cache key.

The cache key hashes the rootfs, the input (with the script), the argv, the environment (with
the parameters) and the sandbox profile; two runs with different keys differ in at least one
of them, and this says which, in terms a user acts on: the input files added, removed or
changed (with sizes), the script as a unified diff, the parameter that changed. Tool versions
are not in the key but explain a changed output of the same computation. Then the output files
that differ (verification.diff_trees).
"""

from __future__ import annotations

import difflib
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import IpfsExecuteError, UsageError
from .record import SCRIPT_DIR, RunRecord
from .result_cache import ResultCache, StoredRecord
from .store import Store
from .verification import FileDiff, diff_trees, records_in_notebook

MAX_LISTED = 50  # files (or diff lines) listed per part; the rest are counted
MAX_VALUE = 60  # characters of a value shown


@dataclass(frozen=True)
class Difference:
    part: str  # rootfs, input, script, arguments, parameters, environment, sandbox, versions
    summary: str  # one line: what changed
    details: tuple[str, ...] = ()  # files, diff lines, values
    in_key: bool = True  # False: cannot change the cache key (tool versions)


@dataclass(frozen=True)
class Explanation:
    a_cid: str
    b_cid: str
    a: RunRecord
    b: RunRecord
    differences: tuple[Difference, ...]
    output_diffs: tuple[FileDiff, ...] = ()

    @property
    def same_computation(self) -> bool:
        return self.a.key is not None and self.a.key == self.b.key

    def reason(self) -> str:
        """One line: the first part of the key that differs ("input file words.txt changed")."""
        for difference in self.differences:
            if difference.in_key:
                return difference.summary
        if self.same_computation:
            return "the same computation (same cache key)"
        return "the cache keys differ, but no recorded part does (records of another version?)"

    def describe(self) -> str:
        lines = [f"A: record {self.a_cid}", f"B: record {self.b_cid}"]
        if self.same_computation:
            lines.append(f"the same computation: cache key {self.a.key}")
        elif not self.differences:
            lines.append("the cache keys differ, but no recorded part does")
        for difference in self.differences:
            note = "" if difference.in_key else " (not in the cache key)"
            lines.append(f"{difference.part}: {difference.summary}{note}")
            lines.extend(f"  {line}" for line in difference.details)
        if self.a.output == self.b.output:
            lines.append(f"output: the same ({self.a.output})")
        else:
            lines.append(f"output: {self.a.output} -> {self.b.output}")
            lines.extend(f"  {diff.describe()}" for diff in self.output_diffs[:MAX_LISTED])
            if len(self.output_diffs) > MAX_LISTED:
                lines.append(f"  ... and {len(self.output_diffs) - MAX_LISTED} more files")
        return "\n".join(lines)


def explain(results: ResultCache, a: str, b: str) -> Explanation:
    """Compare two runs given as record CIDs, outputs of recorded runs, or NOTEBOOK.ipynb:N
    (the run shown by cell N of an executed notebook, as `verify` numbers cells)."""
    return compare(results.store, _stored(results, a), _stored(results, b))


def _stored(results: ResultCache, target: str) -> StoredRecord:
    path, colon, cell = target.rpartition(":")
    if colon and path.endswith(".ipynb") and cell.isdigit():
        for index, record_cid in records_in_notebook(Path(path).expanduser()):
            if index == int(cell):
                return results.find(record_cid)
        raise UsageError(f"{path}: cell {cell} shows no recorded run")
    return results.find(target)


def _parts(store: Store, a: RunRecord, b: RunRecord, *, rootfs_files: bool) -> Iterator[Difference]:
    """The differences, part by part in the key's order, each computed only when asked for."""
    yield from _rootfs(store, a, b, files=rootfs_files)
    yield from _input(store, a, b)
    yield from _script(store, a, b)
    yield from _values("arguments", _args(a), _args(b))
    yield from _mapping("parameters", a.params, b.params, what="parameter")
    yield from _mapping(
        "environment", _without(a.env, a.params), _without(b.env, b.params), what="variable"
    )
    yield from _mapping("sandbox", a.sandbox, b.sandbox, what="sandbox setting")
    yield from _mapping("versions", a.versions, b.versions, what="version", in_key=False)


def reason(store: Store, before: RunRecord, now: RunRecord) -> str | None:
    """Why `now` is another computation than `before`, in one line; None when it is not.
    Stops at the first part that differs (a rootfs's files are not compared)."""
    if before.key is not None and before.key == now.key:
        return None
    for difference in _parts(store, before, now, rootfs_files=False):
        if difference.in_key:
            return difference.summary
    return None


def compare(store: Store, first: StoredRecord, second: StoredRecord) -> Explanation:
    a, b = first.record, second.record
    differences = list(_parts(store, a, b, rootfs_files=True))
    output_diffs: list[FileDiff] = []
    if a.output and b.output and a.output != b.output:
        try:
            output_diffs = diff_trees(store, a.output, b.output)
        except IpfsExecuteError:
            pass  # an output not on this node: its CIDs are shown
    return Explanation(first.cid, second.cid, a, b, tuple(differences), tuple(output_diffs))


def _listed(lines: list[str]) -> tuple[str, ...]:
    if len(lines) <= MAX_LISTED:
        return tuple(lines)
    return (*lines[:MAX_LISTED], f"... and {len(lines) - MAX_LISTED} more")


def _tree_diffs(store: Store, old: str, new: str) -> list[FileDiff] | None:
    """The files that differ, or None when either side is not a listable directory here.

    As verification.diff_trees, but a sub directory with the same CID on both sides is not
    listed: one changed file in a big input costs a listing per level, not a walk of all.
    """
    try:
        if store.stat(old).kind != "directory" or store.stat(new).kind != "directory":
            return None
        diffs: list[FileDiff] = []
        _diff_level(store, old, new, "", diffs)
    except IpfsExecuteError:
        return None
    return sorted(diffs, key=lambda diff: diff.path)


def _diff_level(store: Store, old: str, new: str, prefix: str, diffs: list[FileDiff]) -> None:
    before = {entry.name: entry for entry in store.ls(old)}
    after = {entry.name: entry for entry in store.ls(new)}
    for name in sorted(before.keys() | after.keys()):
        path = f"{prefix}{name}"
        a, b = before.get(name), after.get(name)
        if a is not None and b is not None:
            if a.cid == b.cid:
                continue
            if a.kind == b.kind == "directory":
                _diff_level(store, a.cid, b.cid, path + "/", diffs)
            else:
                diffs.append(FileDiff(path, "changed", a.size, b.size))
            continue
        entry, change = (a, "removed") if a is not None else (b, "added")
        assert entry is not None
        sized = (entry.size, None) if change == "removed" else (None, entry.size)
        diffs.append(FileDiff(path, change, *sized))
        if entry.kind == "directory":
            for sub, inner in store.walk(entry.cid, path + "/"):
                inner_sized = (inner.size, None) if change == "removed" else (None, inner.size)
                diffs.append(FileDiff(sub, change, *inner_sized))


def _rootfs(store: Store, a: RunRecord, b: RunRecord, *, files: bool) -> list[Difference]:
    if a.rootfs == b.rootfs:
        return []
    diffs = _tree_diffs(store, a.rootfs, b.rootfs) if files else None
    details = [f"{a.rootfs} -> {b.rootfs}"]
    if diffs is None:
        details.append("(not both directories on this node: their files are not compared)")
        return [Difference("rootfs", "the rootfs changed", tuple(details))]
    details += [diff.describe() for diff in diffs]
    return [Difference("rootfs", f"the rootfs changed ({_count(diffs)})", _listed(details))]


def _input(store: Store, a: RunRecord, b: RunRecord) -> list[Difference]:
    old, new = a.given_input or a.input, b.given_input or b.input
    if old == new:
        return []
    diffs = _tree_diffs(store, old, new)
    if diffs is None:
        return [Difference("input", "the input changed", (f"{old} -> {new}",))]
    # The script is compared on its own (as a diff), not as a file of the input.
    diffs = [diff for diff in diffs if diff.path.split("/")[0] != SCRIPT_DIR]
    if not diffs:
        return []
    if len(diffs) == 1:
        diff = diffs[0]
        sizes = (
            f" ({diff.size_before} -> {diff.size_after} bytes)" if diff.change == "changed" else ""
        )
        summary = f"input file {diff.path} {diff.change}{sizes}"
    else:
        summary = f"the input changed ({_count(diffs)})"
    return [Difference("input", summary, _listed([diff.describe() for diff in diffs]))]


def _script(store: Store, a: RunRecord, b: RunRecord) -> list[Difference]:
    if a.script == b.script:
        return []
    if a.script is None or b.script is None:
        change = "added" if a.script is None else "removed"
        return [Difference("script", f"a script was {change}")]
    try:
        old = store.cat(a.script).decode("utf-8", "replace").splitlines()
        new = store.cat(b.script).decode("utf-8", "replace").splitlines()
    except IpfsExecuteError:
        return [Difference("script", "the script changed", (f"{a.script} -> {b.script}",))]
    diff = list(
        difflib.unified_diff(old, new, f"script {a.script}", f"script {b.script}", lineterm="")
    )
    added = sum(1 for line in diff if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in diff if line.startswith("-") and not line.startswith("---"))
    return [Difference("script", f"the script changed (+{added} -{removed} lines)", _listed(diff))]


def _args(record: RunRecord) -> str:
    return shlex.join(record.args)


def _values(part: str, old: str, new: str) -> list[Difference]:
    if old == new:
        return []
    return [Difference(part, f"{part} changed", (f"- {_short(old)}", f"+ {_short(new)}"))]


def _without(env: Mapping[str, str], params: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in env.items() if name not in params}


def _mapping(
    part: str,
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    *,
    what: str,
    in_key: bool = True,
) -> list[Difference]:
    lines = []
    for name in sorted(old.keys() | new.keys()):
        if name not in new:
            lines.append(f"- {name}={_short(old[name])}")
        elif name not in old:
            lines.append(f"+ {name}={_short(new[name])}")
        elif old[name] != new[name]:
            lines.append(f"~ {name}: {_short(old[name])} -> {_short(new[name])}")
    if not lines:
        return []
    if len(lines) == 1:
        name = lines[0][2:].split("=")[0].split(":")[0]
        if lines[0].startswith("~"):
            summary = f"{what} {name} changed ({lines[0].split(': ', 1)[1]})"
        else:
            summary = f"{what} {name} {'added' if lines[0].startswith('+') else 'removed'}"
    else:
        summary = f"{len(lines)} {what}s differ"
    return [Difference(part, summary, _listed(lines), in_key)]


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "…"


def _count(diffs: list[FileDiff]) -> str:
    """ "3 files: 2 changed, 1 added" """
    counts = [
        f"{n} {change}"
        for change in ("changed", "added", "removed")
        if (n := sum(1 for diff in diffs if diff.change == change))
    ]
    return f"{len(diffs)} file{'s' if len(diffs) != 1 else ''}: " + ", ".join(counts)
