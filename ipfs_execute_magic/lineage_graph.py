"""Lineage: from a result back through the runs that produced its input and rootfs.

Each recorded run is indexed by its output CID, so any CID that is (the root of) a run's output
leads to that run's record; its rootfs and input lead further back, until content that no
recorded run produced: data added by hand, or an image built elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .cid import EMPTY_DIRECTORY_CID, EMPTY_FILE_CID, IpfsPath
from .record import RunRecord
from .result_cache import ResultCache

# Content that countless runs (and people) produce: the output index names only the last run
# that did, which says nothing about where a given copy came from, so none is credited.
PRODUCED_BY_MANY = {
    EMPTY_DIRECTORY_CID: "the empty directory: produced by many runs, so no run is credited",
    EMPTY_FILE_CID: "the empty file: produced by many runs, so no run is credited",
}


@dataclass
class LineageNode:
    cid: str  # the content (for a run: its output)
    path: str  # how it was referred to (/ipfs/ROOT/sub for a file inside an output)
    record_cid: str | None = None  # set for content produced by a recorded run
    record: RunRecord | None = None
    parents: list[tuple[str, LineageNode]] = field(default_factory=list)  # (role, node)
    note: str | None = None  # what a leaf is, when known

    @property
    def is_run(self) -> bool:
        return self.record is not None

    def label(self) -> str:
        if self.record is None:
            return f"{self.path}  ({self.note or 'data: no recorded run produced it'})"
        command = " ".join(self.record.args)
        if len(command) > 60:
            command = command[:57] + "..."
        return (
            f"{self.path}  <- run {self.record.started_at[:19]}Z, exit "
            f"{self.record.exit_status}: {command}  [record {self.record_cid}]"
        )

    def walk(self) -> list[tuple[int, str, LineageNode]]:
        """(depth, role, node) depth first, for displays."""
        rows: list[tuple[int, str, LineageNode]] = [(0, "result", self)]

        def visit(node: LineageNode, depth: int) -> None:
            for role, parent in node.parents:
                rows.append((depth, role, parent))
                visit(parent, depth + 1)

        visit(self, 1)
        return rows

    def to_text(self) -> str:
        lines = []
        for depth, role, node in self.walk():
            indent = "    " * depth
            prefix = "" if depth == 0 else f"{role}: "
            lines.append(f"{indent}{prefix}{node.label()}")
        return "\n".join(lines)


def lineage(results: ResultCache, cid_or_path: str, *, max_depth: int = 64) -> LineageNode:
    """The lineage graph of a CID or IPFS path (a tree: shared ancestors appear again)."""
    parsed = IpfsPath.parse(cid_or_path)
    return _node(results, parsed, max_depth, seen=set())


def _node(results: ResultCache, path: IpfsPath, depth_left: int, seen: set[str]) -> LineageNode:
    store = results.store
    root = (
        store.resolve(IpfsPath(path.namespace, path.root, ""))
        if path.namespace == "ipns"
        else path.root
    )
    cid = store.resolve(path) if path.sub else root
    node = LineageNode(cid=cid, path=str(path))
    if root in PRODUCED_BY_MANY:
        node.note = PRODUCED_BY_MANY[root]
        return node
    if depth_left <= 0 or root in seen:
        return node
    stored = results.record_for_output(root)
    if stored is None:
        composed = results.composition(root) if not path.sub else None
        if composed:
            # A directory made with ipfs-mkdir: its entries have lineages of their own.
            node.note = "a directory composed with ipfs-mkdir"
            for name, source in sorted(composed.items()):
                role = name or "base"
                node.parents.append(
                    (role, _node(results, IpfsPath.parse(source), depth_left - 1, seen | {root}))
                )
        return node
    node.record, node.record_cid = stored.record, stored.cid
    record = stored.record
    seen = seen | {root}
    rootfs = IpfsPath.parse(record.rootfs_path or record.rootfs)
    node.parents.append(("rootfs", _node(results, rootfs, depth_left - 1, seen)))
    given = record.input_path or record.given_input or record.input
    node.parents.append(("input", _node(results, IpfsPath.parse(given), depth_left - 1, seen)))
    if record.script:
        node.parents.append(
            (
                "script",
                LineageNode(
                    cid=record.script, path=f"/ipfs/{record.script}", note="the cell's script"
                ),
            )
        )
    return node
