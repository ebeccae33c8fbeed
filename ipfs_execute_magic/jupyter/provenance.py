"""How verdicts and lineage look in a notebook.

Each view is static HTML plus a text/plain fallback with the same information, for the same
reason as the result view: a shared notebook is often read where scripts and widgets do not run
(untrusted, on GitHub), so links are http(s) gateway links and the layout is plain HTML with
inline styles.

Each bundle carries output metadata `{"ipfs_execute": {"view": ...}}` without a "record" key:
`ipfs-execute verify NOTEBOOK` then knows that the records these views mention are not runs
of the cell that shows them, and does not verify them a second time.
"""

from __future__ import annotations

import shlex
import time
from typing import Any

from ..explanation import Explanation
from ..lineage_graph import LineageNode
from ..links import Gateway, as_gateway
from ..record import RunRecord
from ..verification import CellVerdict, FileDiff, NotebookVerdict, RerunResult, Verdict
from .display import _e, _link, gateway_href, human_size, record_status, static_line

MAX_DIFF_ROWS = 200  # files listed per differing re-run; the rest are counted
COMMAND_CHARS = 160  # of a command shown in HTML (the title has all of it)
GOOD, BAD = "#1a7f37", "#cf222e"
MUTED = "color:#57606a"
CELL = "padding:0 0.8em 0 0;text-align:left;vertical-align:top"


# -- pieces ------------------------------------------------------------------------------------


def command_of(record: RunRecord) -> str:
    """The run's /sbin/init arguments as a shell would read them back."""
    return shlex.join(record.args)


def started_text(record: RunRecord) -> str:
    return record.started_at[:19].replace("T", " ") + " UTC"


def path_link(gateway: Gateway | str, path: str) -> str:
    """`/ipfs/CID/sub` (or /ipns/...) as `ipfs://CID/sub` linked through the gateway."""
    href = as_gateway(gateway).path_url(path)
    namespace, _, rest = path.lstrip("/").partition("/")
    return _link(href, f"{namespace}://{rest}")


def cid_link(gateway: Gateway | str, cid: str | None) -> str:
    if not cid:
        return "—"
    return f"<code>{_link(gateway_href(gateway, cid), f'ipfs://{cid}')}</code>"


def _size(size: int | None) -> str:
    return "—" if size is None else human_size(size)


def _kv_table(rows: list[tuple[str, str]]) -> str:
    body = "".join(
        f'<tr><td style="{CELL}">{_e(label)}</td><td style="{CELL}">{value}</td></tr>'
        for label, value in rows
    )
    return f'<table style="border-collapse:collapse">{body}</table>'


def _command_html(record: RunRecord) -> str:
    command = command_of(record)
    shown = command if len(command) <= COMMAND_CHARS else command[: COMMAND_CHARS - 1] + "…"
    return f'<code title="{_e(command)}">{_e(shown)}</code>'


def view_metadata(view: str, **extra: Any) -> dict[str, Any]:
    return {"ipfs_execute": {"view": view, **extra}}


# -- a verdict ---------------------------------------------------------------------------------


def verdict_headline(verdict: Verdict) -> str:
    count = len(verdict.reruns)
    runs = f"{count} re-run{'s' if count != 1 else ''}"
    if verdict.reproducible:
        return f"✓ reproducible: {runs} without the cache gave the recorded output"
    differing = sum(not rerun.matches for rerun in verdict.reruns)
    return (
        f"✗ NOT reproducible: {differing} of {runs} gave another output; it depends on "
        "something besides rootfs, input and arguments"
    )


def rerun_outcome(verdict: Verdict, rerun: RerunResult) -> str:
    if rerun.matches:
        text = "same output"
    elif rerun.output is None:
        text = "DIFFERENT: no output was saved"
    else:
        text = f"DIFFERENT output ipfs://{rerun.output}"
    if rerun.exit_status != verdict.record.exit_status:
        text += f" (exit status {rerun.exit_status}, recorded {verdict.record.exit_status})"
    return text


def _no_file_differs(rerun: RerunResult) -> bool:
    return not rerun.matches and rerun.output is not None and not rerun.diffs


NO_FILE_DIFFERS = "no file differs: the trees differ only in metadata (modes or empty entries)"


class VerdictView:
    def __init__(self, verdict: Verdict, gateway: Gateway | str) -> None:
        self.verdict = verdict
        self.gateway = as_gateway(gateway)

    def to_plain(self, indent: str = "") -> str:
        verdict, record = self.verdict, self.verdict.record
        lines = [
            f"Verdict {verdict_headline(verdict)}",
            f"record   ipfs://{verdict.record_cid}",
            f"output   ipfs://{record.output}",
            f"command  {command_of(record)}",
            f"ran      {started_text(record)}, {record_status(record)}",
        ]
        for number, rerun in enumerate(verdict.reruns, 1):
            lines.append(f"re-run {number}, {rerun.condition}: {rerun_outcome(verdict, rerun)}")
            lines += [f"    {diff.describe()}" for diff in rerun.diffs[:MAX_DIFF_ROWS]]
            if len(rerun.diffs) > MAX_DIFF_ROWS:
                lines.append(f"    … and {len(rerun.diffs) - MAX_DIFF_ROWS} more files")
            if _no_file_differs(rerun):
                lines.append(f"    ({NO_FILE_DIFFERS})")
        return "\n".join(indent + line for line in lines)

    def body_html(self) -> str:
        """Everything but the headline (the notebook view puts that in its own row)."""
        verdict, record = self.verdict, self.verdict.record
        parts = [
            _kv_table(
                [
                    ("record", cid_link(self.gateway, verdict.record_cid)),
                    ("output", cid_link(self.gateway, record.output)),
                    ("command", _command_html(record)),
                    ("ran", _e(f"{started_text(record)}, {record_status(record)}")),
                ]
            )
        ]
        rows = []
        for number, rerun in enumerate(verdict.reruns, 1):
            colour = GOOD if rerun.matches else BAD
            mark = "✓ same output" if rerun.matches else "✗ different"
            exit_note = (
                ""
                if rerun.exit_status == record.exit_status
                else f" (exit status {rerun.exit_status}, recorded {record.exit_status})"
            )
            output = "" if rerun.matches else cid_link(self.gateway, rerun.output)
            rows.append(
                f'<tr><td style="{CELL}">{number}</td>'
                f'<td style="{CELL}">{_e(rerun.condition)}</td>'
                f'<td style="{CELL};color:{colour}"><b>{mark}</b>{_e(exit_note)}</td>'
                f'<td style="{CELL}">{output}</td></tr>'
            )
        parts.append(
            '<table style="border-collapse:collapse;margin-top:0.4em"><thead><tr>'
            f'<th style="{CELL}">re-run</th><th style="{CELL}">condition</th>'
            f'<th style="{CELL}">output</th><th style="{CELL}"></th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
        for number, rerun in enumerate(verdict.reruns, 1):
            if rerun.diffs:
                parts.append(self._diff_html(number, rerun))
            elif _no_file_differs(rerun):
                parts.append(f"<div><i>re-run {number}: {_e(NO_FILE_DIFFERS)}</i></div>")
        return "".join(parts)

    def _diff_html(self, number: int, rerun: RerunResult) -> str:
        count = len(rerun.diffs)
        rows = []
        for diff in rerun.diffs[:MAX_DIFF_ROWS]:
            rows.append(
                f'<tr><td style="{CELL}">{_diff_mark(diff)}</td>'
                f'<td style="{CELL}"><code>{_e(diff.path or "(the output)")}</code></td>'
                f"{_size_cell(diff.size_before)}{_size_cell(diff.size_after)}</tr>"
            )
        more = (
            f"<div><i>… and {count - MAX_DIFF_ROWS} more files</i></div>"
            if count > MAX_DIFF_ROWS
            else ""
        )
        head = "".join(
            f'<th style="{CELL}{align}">{label}</th>'
            for label, align in (
                ("change", ""),
                ("path", ""),
                ("recorded size", ";text-align:right"),
                ("re-run size", ";text-align:right"),
            )
        )
        return (
            f'<details open style="margin-top:0.4em"><summary>re-run {number} '
            f"({_e(rerun.condition)}): {count} file{'s' if count != 1 else ''} differ"
            f"{'s' if count == 1 else ''}</summary>"
            f'<table style="border-collapse:collapse"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>{more}</details>"
        )

    def to_html(self) -> str:
        colour = GOOD if self.verdict.reproducible else BAD
        return (
            f'<div class="ipfs-execute-verdict"><div><b style="color:{colour}">'
            f"{_e(verdict_headline(self.verdict))}</b></div>{self.body_html()}</div>"
        )

    def mimebundle(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return (
            {"text/plain": self.to_plain(), "text/html": self.to_html()},
            view_metadata(
                "verdict", verified=self.verdict.record_cid, reproducible=self.verdict.reproducible
            ),
        )


def _diff_mark(diff: FileDiff) -> str:
    symbol = {"added": "+", "removed": "−", "changed": "~"}.get(diff.change, "?")
    return f"<code>{symbol}</code> {_e(diff.change)}"


def _size_cell(size: int | None) -> str:
    title = "" if size is None else f' title="{size} bytes"'
    return f'<td style="{CELL};text-align:right"{title}>{_e(_size(size))}</td>'


def notebook_headline(result: NotebookVerdict) -> str:
    total = len(result.cells)
    runs = f"{total} recorded run{'s' if total != 1 else ''}"
    if result.reproducible:
        return f"✓ all {runs} reproduced"
    bad = sum(not cell.reproducible for cell in result.cells)
    return f"✗ {bad} of {runs} did not reproduce"


def cell_outcome(cell: CellVerdict) -> str:
    if cell.verdict is None:
        return f"✗ could not be verified: {cell.error}"
    return "✓ reproducible" if cell.verdict.reproducible else "✗ NOT reproducible"


class NotebookVerdictView:
    def __init__(self, result: NotebookVerdict, gateway: Gateway | str) -> None:
        self.result = result
        self.gateway = as_gateway(gateway)

    def to_plain(self) -> str:
        lines = [f"{self.result.path}: {notebook_headline(self.result)}"]
        for cell in self.result.cells:
            lines.append(f"{cell.label}: record ipfs://{cell.record_cid}: {cell_outcome(cell)}")
            if cell.verdict is not None:
                # The verdict without its first lines (headline, record): said just above.
                detail = VerdictView(cell.verdict, self.gateway).to_plain("    ")
                lines += detail.splitlines()[2:]
        lines += self.result.stale_lines()
        return "\n".join(lines)

    def to_html(self) -> str:
        colour = GOOD if self.result.reproducible else BAD
        parts = [
            f'<div class="ipfs-execute-notebook-verdict"><div><code>{_e(self.result.path)}'
            f'</code>: <b style="color:{colour}">{_e(notebook_headline(self.result))}</b>'
            "</div>"
        ]
        for cell in self.result.cells:
            colour = GOOD if cell.reproducible else BAD
            summary = (
                f'{_e(cell.label)} · <b style="color:{colour}">'
                f"{_e(cell_outcome(cell))}</b> · record "
                f"{cid_link(self.gateway, cell.record_cid)}"
            )
            body = (
                VerdictView(cell.verdict, self.gateway).body_html()
                if cell.verdict is not None
                else ""
            )
            opened = "" if cell.reproducible else " open"
            parts.append(
                f'<details{opened} style="margin:0.3em 0"><summary>{summary}</summary>'
                f'<div style="margin-left:1.2em">{body}</div></details>'
            )
        parts += [
            f'<div style="color:#9a6700"><b>⚠ {_e(line)}</b></div>'
            for line in self.result.stale_lines()
        ]
        parts.append("</div>")
        return "".join(parts)

    def mimebundle(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return (
            {"text/plain": self.to_plain(), "text/html": self.to_html()},
            view_metadata(
                "notebook verdict", notebook=self.result.path, reproducible=self.result.reproducible
            ),
        )


# -- lineage -----------------------------------------------------------------------------------

BOX = (
    "display:inline-block;border:1px solid #8c959f;border-radius:4px;padding:2px 8px;"
    "margin:2px 0;vertical-align:top"
)
DATA_BOX = BOX.replace("solid #8c959f", "dashed #8c959f")
BRANCH = "margin-left:1.2em;padding-left:0.8em;border-left:2px solid #d0d7de"
EDGE = (
    f"display:inline-block;min-width:3.6em;font-size:85%;{MUTED};padding-top:6px;vertical-align:top"
)


class LineageView:
    """The lineage tree as nested boxes: runs (solid) and data (dashed), edges labelled."""

    def __init__(self, node: LineageNode, gateway: Gateway | str) -> None:
        self.node = node
        self.gateway = as_gateway(gateway)

    def to_plain(self) -> str:
        return self.node.to_text()

    def counts(self) -> tuple[int, int]:
        """Distinct runs and distinct pieces of data in the graph."""
        runs = {node.record_cid for _, _, node in self.node.walk() if node.is_run}
        data = {node.cid for _, _, node in self.node.walk() if not node.is_run}
        return len(runs), len(data)

    def to_html(self) -> str:
        runs, data = self.counts()
        header = (
            f"<div>lineage of <code>{path_link(self.gateway, self.node.path)}</code>: "
            f"{runs} run{'s' if runs != 1 else ''}, back to {data} piece"
            f"{'s' if data != 1 else ''} of data</div>"
        )
        return f'<div class="ipfs-execute-lineage">{header}{self._node_html(self.node)}</div>'

    def _node_html(self, node: LineageNode) -> str:
        box = self._run_box(node) if node.is_run else self._data_box(node)
        if not node.parents:
            return f"<div>{box}</div>"
        edges = "".join(
            f'<div><span style="{EDGE}">{_e(role)}</span>'
            '<div style="display:inline-block;vertical-align:top">'
            f"{self._node_html(parent)}</div></div>"
            for role, parent in node.parents
        )
        return f'<div>{box}</div><div style="{BRANCH}">{edges}</div>'

    def _content(self, node: LineageNode) -> str:
        shown = f"<code>{path_link(self.gateway, node.path)}</code>"
        if node.path.startswith("/ipfs/") and node.path != f"/ipfs/{node.cid}":
            shown += f' <span style="{MUTED}">= {cid_link(self.gateway, node.cid)}</span>'
        return shown

    def _run_box(self, node: LineageNode) -> str:
        record = node.record
        assert record is not None
        colour = GOOD if record.succeeded else BAD
        duration = record.durations.get("total")
        took = f" in {duration:.2f} s" if duration is not None else ""
        return (
            f'<div style="{BOX}"><div><b>run</b> {_command_html(record)}</div>'
            f'<div style="{MUTED}">{_e(started_text(record))}{_e(took)} · '
            f'<b style="color:{colour}">{_e(record_status(record))}</b></div>'
            f"<div>output {self._content(node)}</div>"
            f"<div>record {cid_link(self.gateway, node.record_cid)}</div></div>"
        )

    def _data_box(self, node: LineageNode) -> str:
        note = node.note or "data: no recorded run produced it"
        return (
            f'<div style="{DATA_BOX}"><div><b>data</b> {self._content(node)}</div>'
            f'<div style="{MUTED}"><i>{_e(note)}</i></div></div>'
        )

    def mimebundle(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return (
            {"text/plain": self.to_plain(), "text/html": self.to_html()},
            view_metadata("lineage", cid=self.node.cid),
        )


# -- why two runs differ -----------------------------------------------------------------------


class ExplanationView:
    """Two runs compared part by part (explanation.Explanation): a table of the parts that
    differ with their details, then the output files that differ."""

    def __init__(self, explanation: Explanation, gateway: Gateway | str) -> None:
        self.explanation = explanation
        self.gateway = as_gateway(gateway)

    def to_plain(self) -> str:
        return self.explanation.describe()

    def to_html(self) -> str:
        found = self.explanation
        rows = [
            ("A", f"record {cid_link(self.gateway, found.a_cid)} {_command_html(found.a)}"),
            ("B", f"record {cid_link(self.gateway, found.b_cid)} {_command_html(found.b)}"),
        ]
        if found.same_computation:
            rows.append(("key", f"the same computation: <code>{_e(found.a.key or '')}</code>"))
        for difference in found.differences:
            note = "" if difference.in_key else f' <span style="{MUTED}">(not in the key)</span>'
            details = "\n".join(difference.details[:MAX_DIFF_ROWS])
            shown = (
                f'<pre style="margin:0.2em 0;font-size:90%">{_e(details)}</pre>' if details else ""
            )
            rows.append((difference.part, f"<b>{_e(difference.summary)}</b>{note}{shown}"))
        if found.a.output == found.b.output:
            rows.append(("output", f"the same: {cid_link(self.gateway, found.a.output)}"))
        else:
            files = "".join(
                f"<li><code>{_e(diff.describe())}</code></li>"
                for diff in found.output_diffs[:MAX_DIFF_ROWS]
            )
            more = len(found.output_diffs) - MAX_DIFF_ROWS
            files += f"<li>... and {more} more</li>" if more > 0 else ""
            rows.append(
                (
                    "output",
                    f"{cid_link(self.gateway, found.a.output)} → "
                    f"{cid_link(self.gateway, found.b.output)}"
                    + (f'<ul style="margin:0.2em 0">{files}</ul>' if files else ""),
                )
            )
        header = f"<div>why these runs differ: {_e(found.reason())}</div>"
        return f'<div class="ipfs-execute-explain">{header}{_kv_table(rows)}</div>'

    def mimebundle(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return (
            {"text/plain": self.to_plain(), "text/html": self.to_html()},
            view_metadata("explain", a=self.explanation.a_cid, b=self.explanation.b_cid),
        )


# -- progress ----------------------------------------------------------------------------------


class VerifyProgress:
    """One line under a display id while re-runs go on; a static summary at the end."""

    # The line names the record being verified: not a run of this cell (see the module doc).
    METADATA = view_metadata("progress")

    def __init__(self) -> None:
        self._handle: Any = None
        self._started = time.monotonic()

    def __call__(self, text: str) -> None:
        from IPython.display import display

        bundle = static_line(text)
        if self._handle is None:
            self._handle = display(bundle, raw=True, display_id=True, metadata=self.METADATA)
        else:
            self._handle.update(bundle, raw=True, metadata=self.METADATA)

    def finish(self, text: str) -> None:
        if self._handle is None:
            return
        summary = static_line(f"{text} in {time.monotonic() - self._started:.1f} s")
        self._handle.update(summary, raw=True, metadata=self.METADATA)
        self._handle = None
