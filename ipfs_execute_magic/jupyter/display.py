"""How a run's result looks in a notebook: a widget, static HTML and plain text in one bundle.

Every result carries all three because a shared notebook is often opened where widgets do not
work: untrusted (JupyterLab shows text/html), on GitHub or without saved widget state. So the
HTML repeats the widget's information (status, the three CIDs, the /output listing, previews of
small files) statically, with http(s) gateway links: untrusted HTML drops `ipfs://` hrefs, so
`ipfs://CID` is shown as link text only. Which gateway and how a link is spelled is the core's
(`links.Gateway`); the live widget adds a button that copies each CID.

The core never imports this: the magics register `result_mimebundle` as IPython's mimebundle
formatter for RunResult (and `ref_mimebundle` for IpfsRef).
"""

from __future__ import annotations

import base64
import codecs
import csv
import html
import io
import re
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from ..errors import IpfsExecuteError
from ..links import Gateway, as_gateway
from ..per_entry import EntriesSnapshot, EntryResults
from ..record import RunRecord
from ..result import FileEntry, IpfsRef, RunResult
from ..staging import PHASE_ADDING_OUTPUT, PHASE_RUNNING

if TYPE_CHECKING:
    from ..store import AddProgress

IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".svg": "image/svg+xml",
}
TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}
MARKDOWN_SUFFIXES = (".md", ".markdown")
_NUMBER = re.compile(r"[-+]?(\d[\d_,]*(\.\d*)?|\.\d+)([eE][-+]?\d+)?%?")
# The copy button's click: the clipboard API where the page may use it, else the older
# selection command (a page served over plain http from another host).
COPY_SCRIPT = (
    "const b=this,c=b.dataset.cid,"
    "done=()=>{b.textContent='copied';setTimeout(()=>{b.textContent='copy'},2000)};"
    "const old=()=>{const t=document.createElement('textarea');t.value=c;"
    "document.body.appendChild(t);t.select();document.execCommand('copy');t.remove();done()};"
    "navigator.clipboard?navigator.clipboard.writeText(c).then(done,old):old()"
)


@dataclass(frozen=True)
class PreviewLimits:
    """How much of the output one rendering may fetch and embed."""

    text_bytes: int  # head of a text file shown
    text_lines: int
    table_rows: int
    image_bytes: int  # larger images are linked, not embedded
    total_bytes: int  # everything embedded in one rendering
    files: int  # how many files get a preview


# The static HTML is saved in the notebook: keep it small. The widget fetches on click.
HTML_PREVIEWS = PreviewLimits(
    text_bytes=4096,
    text_lines=60,
    table_rows=20,
    image_bytes=512 * 1024,
    total_bytes=1536 * 1024,
    files=12,
)
WIDGET_PREVIEW = PreviewLimits(
    text_bytes=64 * 1024,
    text_lines=2000,
    table_rows=200,
    image_bytes=4 * 1024**2,
    total_bytes=4 * 1024**2,
    files=1,
)
LISTING_ROWS = 500  # rows of the static listing
WIDGET_ROWS = 300  # rows of the widget tree (each row is two widgets)


def record_status(record: RunRecord) -> str:
    if record.timed_out:
        limit = record.limits.get("timeout")
        return f"✗ timed out after {limit:g} s" if limit else "✗ timed out"
    if record.killed_by in ("output_bytes", "output_files"):
        return f"✗ exit {record.exit_status}, {record.killed_text()}"
    if record.exit_status == 0:
        return "✓ exit 0"
    if record.killed_by == "memory":
        return f"✗ exit {record.exit_status}, {record.killed_text()}"
    return f"✗ exit {record.exit_status}"


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def gateway_href(gateway: Gateway | str, cid: str, path: str = "") -> str:
    return as_gateway(gateway).url(cid, path)


def copy_button(cid: str) -> str:
    """A button copying `cid` (live widget only: saved or untrusted HTML drops the script)."""
    return (
        f'<button class="ipfs-execute-copy" data-cid="{_e(cid)}" title="copy the CID" '
        f'onclick="{_e(COPY_SCRIPT)}" style="margin-left:0.5em;font-size:85%">copy</button>'
    )


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _link(href: str, text: str) -> str:
    return f'<a href="{_e(href)}" target="_blank" rel="noopener">{_e(text)}</a>'


# -- previews ----------------------------------------------------------------------------------


def preview_html(path: str, data: bytes, size: int, limits: PreviewLimits) -> str | None:
    """An HTML preview of a file's first bytes, or None when it is nothing we can show."""
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in IMAGE_TYPES:
        if size > limits.image_bytes or len(data) < size:
            return None
        encoded = base64.b64encode(data).decode("ascii")
        return (
            f'<img src="data:{IMAGE_TYPES[suffix]};base64,{encoded}" alt="{_e(path)}" '
            'style="max-width:100%;max-height:480px"/>'
        )
    if b"\0" in data[:8192]:
        return None  # binary
    text = _decode_head(data)
    if text is None:
        return None
    truncated = len(data) < size
    if suffix in TABLE_DELIMITERS:
        return _table_html(text, TABLE_DELIMITERS[suffix], limits.table_rows, truncated)
    lines = text.splitlines(keepends=True)
    shown = "".join(lines[: limits.text_lines])
    more = truncated or len(lines) > limits.text_lines
    note = (
        f"<div><i>… first {human_size(len(shown.encode()))} of {human_size(size)}</i></div>"
        if more
        else ""
    )
    return (
        '<pre style="max-height:24em;overflow:auto;margin:0;font-family:monospace">'
        f"{_e(shown)}</pre>{note}"
    )


def _decode_head(data: bytes) -> str | None:
    # A cut in the middle of a multi-byte character is not a reason to call the file binary.
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        return decoder.decode(data, final=False)
    except UnicodeDecodeError:
        return None


# A link destination or reference definition whose scheme runs code or embeds a document
# (a browser skips control characters and spaces around a scheme).
_UNSAFE_LINK = re.compile(
    r"(\]\(|^[ ]{0,3}\[[^\]]*\]:)([\x00-\x20]*)(javascript|vbscript|data|file)([\x00-\x20]*):",
    re.IGNORECASE | re.MULTILINE,
)
ZERO_WIDTH_SPACE = "\u200b"


def inert_markdown(text: str) -> str:
    """Markdown from a payload, made safe to hand to the front end's renderer: the widget's
    output area is trusted, so raw HTML in it would run (`<img onerror=...>`). A zero-width
    space after every `<` and `&` means no tag, comment, autolink or entity can form, in prose
    and code alike, while the text looks the same; links lose the schemes that run code."""
    text = text.replace("<", "<" + ZERO_WIDTH_SPACE).replace("&", "&" + ZERO_WIDTH_SPACE)
    return _UNSAFE_LINK.sub(lambda m: f"{m.group(1)}{m.group(3)}%3A", text)


def _is_number(text: str) -> bool:
    return _NUMBER.fullmatch(text.strip()) is not None


def _table_html(text: str, delimiter: str, max_rows: int, truncated: bool) -> str:
    lines = text.splitlines()
    if truncated and lines:
        lines = lines[:-1]  # the last line may be cut
    rows = list(csv.reader(io.StringIO("\n".join(lines[: max_rows + 1])), delimiter=delimiter))
    if not rows:
        return "<i>(empty table)</i>"
    head, body = rows[0], rows[1 : max_rows + 1]
    # A column of numbers is right-aligned, its header too, so that digits line up.
    width = max(len(row) for row in rows[: max_rows + 1])
    numeric = [
        any(_is_number(row[i]) for row in body if i < len(row))
        and all(_is_number(row[i]) or not row[i].strip() for row in body if i < len(row))
        for i in range(width)
    ]

    def cell(tag: str, text: str, i: int) -> str:
        align = "right" if numeric[i] else "left"
        return f'<{tag} style="text-align:{align};padding:0 0.6em">{_e(text)}</{tag}>'

    parts = ['<table style="border-collapse:collapse;font-size:90%"><thead><tr>']
    parts += [cell("th", text, i) for i, text in enumerate(head)]
    parts.append("</tr></thead><tbody>")
    for row in body:
        parts.append("<tr>" + "".join(cell("td", text, i) for i, text in enumerate(row)) + "</tr>")
    parts.append("</tbody></table>")
    if truncated or len(lines) > max_rows + 1:
        parts.append(f"<div><i>… first {len(body)} rows</i></div>")
    return "".join(parts)


# -- the view ----------------------------------------------------------------------------------


class ResultView:
    """Everything shown for one RunResult; reads /output once per rendering."""

    def __init__(
        self, result: RunResult, gateway: Gateway | str, *, stale: str | None = None
    ) -> None:
        self.result = result
        self.gateway = as_gateway(gateway)
        self.stale = stale  # "stale: $counts changed": an input variable was rebound since
        self.browser: OutputBrowser | None = None  # the live widget, once made
        self._entries: list[FileEntry] | None = None
        self.listing_error: str | None = None
        self._heads: dict[tuple[str, int], bytes] = {}

    @property
    def entries(self) -> list[FileEntry]:
        if self._entries is None:
            self._entries = []
            if self.result.record.output is None:
                self.listing_error = "this run has no output"
            elif self.result.store is None:
                self.listing_error = "no IPFS connection to list the output"
            else:
                try:
                    self._entries = self.result.files()
                except IpfsExecuteError as error:
                    self.listing_error = f"the output could not be listed: {error}"
        return self._entries

    def head(self, entry: FileEntry, limit: int) -> bytes | None:
        """The first `limit` bytes of a file of the output (None if unreadable)."""
        key = (entry.cid, limit)
        if key not in self._heads:
            assert self.result.store is not None
            try:
                with self.result.store.cat_stream(entry.cid) as stream:
                    self._heads[key] = stream.read(limit)
            except (IpfsExecuteError, OSError):  # requests' errors are OSErrors
                return None
        return self._heads[key]

    # -- pieces shared by the widget and the HTML ------------------------------------------

    def status_text(self) -> str:
        return record_status(self.result.record)

    def timing_text(self) -> str:
        """ "in 1.20 s" for a run, "cached · ran 1.20 s on 2026-11-30 by ed25519:Pu8y…" for a
        hit: a hit's duration is the recorded run's, not this one's."""
        record = self.result.record
        if not self.result.cache_hit:
            return f"in {self.result.duration:.2f} s"
        by = ""
        if record.attestation and record.attestation.get("signer"):
            by = f" by {record.attestation['signer'][:16]}…"
        return f"cached · ran {self.result.duration:.2f} s on {record.started_at[:10]}{by}"

    def summary_text(self) -> str:
        files = [e for e in self.entries if e.kind != "directory"]
        total = sum(e.size for e in files)
        count = f"{len(files)} file{'s' if len(files) != 1 else ''} ({human_size(total)})"
        return f"{self.status_text()} {self.timing_text()}, {count}"

    def details(self) -> list[str]:
        """Parameters and who attests the output: lines under the status."""
        lines = []
        if self.result.record.params:
            shown = ", ".join(f"{k}={v}" for k, v in sorted(self.result.record.params.items()))
            lines.append(f"parameters: {shown}")
        if self.result.trust:
            lines.append(self.result.trust)
        return lines

    def cids(self) -> list[tuple[str, str | None]]:
        record = self.result.record
        cids = [("output", record.output), ("input", record.input), ("rootfs", record.rootfs)]
        if self.result.record_cid:
            cids.append(("record", self.result.record_cid))  # `ipfs cat` it: how it was made
        return cids

    def notes(self) -> list[str]:
        notes = []
        if self.result.cache_hit:
            notes.append(
                f"cached: nothing ran, this is the recorded result of an identical run "
                f"({self.result.record.started_at}); --no-cache runs it again"
            )
        if self.result.trust_note:
            notes.append(f"warning: {self.result.trust_note}")
        if self.result.disagreement:
            notes.append(f"warning: {self.result.disagreement}")
        notes.extend(f"warning: {warning}" for warning in self.result.record.output_warnings)
        return notes

    def header_html(self, copy: bool = False) -> str:
        """Status and CIDs; `copy`: with a button copying each CID (the live widget)."""
        colour = "#1a7f37" if self.result.ok else "#cf222e"
        rows = []
        for label, cid in self.cids():
            shown = _link(gateway_href(self.gateway, cid), f"ipfs://{cid}") if cid else "—"
            if cid and copy:
                shown += copy_button(cid)
            rows.append(
                f'<tr><td style="padding:0 0.8em 0 0;text-align:left">{label}</td>'
                f'<td style="text-align:left"><code>{shown}</code></td></tr>'
            )
        notes = "".join(f"<div><i>{_e(note)}</i></div>" for note in self.notes())
        details = "".join(f"<div>{_e(line)}</div>" for line in self.details())
        stale = (
            f'<div class="ipfs-execute-stale" style="color:#9a6700"><b>⚠ {_e(self.stale)}</b>'
            " (%ipfs_rerun_stale runs it again)</div>"
            if self.stale
            else ""
        )
        return (
            f'<div><b style="color:{colour}">{_e(self.status_text())}</b> '
            f"{_e(self.timing_text())}</div>{stale}{details}{notes}"
            f'<table style="border-collapse:collapse">{"".join(rows)}</table>'
        )

    def _directory_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for entry in self.entries:
            if entry.kind == "directory":
                continue
            parts = entry.path.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                key = "/".join(parts[:depth])
                sizes[key] = sizes.get(key, 0) + entry.size
        return sizes

    def _size_of(self, entry: FileEntry, dir_sizes: dict[str, int]) -> int:
        return dir_sizes.get(entry.path, 0) if entry.kind == "directory" else entry.size

    def _entry_href(self, entry: FileEntry) -> str:
        return gateway_href(self.gateway, str(self.result.record.output), entry.path)

    # -- static HTML -----------------------------------------------------------------------

    def to_html(self) -> str:
        parts = ['<div class="ipfs-execute-result">', self.header_html()]
        entries = self.entries
        if self.listing_error:
            parts.append(f"<div><i>{_e(self.listing_error)}</i></div>")
        elif not entries:
            parts.append("<div><i>/output is empty</i></div>")
        else:
            parts.append(self._listing_html(entries))
            parts.append(self._previews_html(entries))
        parts.append("</div>")
        return "".join(parts)

    def _listing_html(self, entries: list[FileEntry]) -> str:
        dir_sizes = self._directory_sizes()
        cell = "padding:0 0.8em 0 0"
        rows = [
            f'<table style="border-collapse:collapse"><thead><tr>'
            f'<th style="text-align:left;{cell}">/output</th>'
            f'<th style="text-align:right;{cell}">size</th>'
            f'<th style="text-align:left">CID</th></tr></thead><tbody>'
        ]
        for entry in entries[:LISTING_ROWS]:
            depth = entry.path.count("/")
            name = entry.path.rsplit("/", 1)[-1] + ("/" if entry.kind == "directory" else "")
            if entry.kind == "symlink":
                name += " (symlink)"
            size = self._size_of(entry, dir_sizes)
            rows.append(
                f'<tr><td style="text-align:left;{cell};padding-left:{depth * 1.2:g}em">'
                f"{_link(self._entry_href(entry), name)}</td>"
                f'<td style="text-align:right;{cell}" title="{size} bytes">{human_size(size)}</td>'
                f'<td style="text-align:left"><code>{_e(entry.cid)}</code></td></tr>'
            )
        rows.append("</tbody></table>")
        if len(entries) > LISTING_ROWS:
            rows.append(f"<div><i>… and {len(entries) - LISTING_ROWS} more entries</i></div>")
        return "".join(rows)

    def _previews_html(self, entries: list[FileEntry]) -> str:
        limits = HTML_PREVIEWS
        budget = limits.total_bytes
        parts: list[str] = []
        for entry in entries:
            if len(parts) >= limits.files or budget <= 0:
                break
            if entry.kind != "file":
                continue
            snippet = self.preview(entry, limits, budget)
            if snippet is None:
                continue
            budget -= len(snippet)
            parts.append(
                f"<details open><summary><code>{_e(entry.path)}</code> "
                f"({human_size(entry.size)})</summary>{snippet}</details>"
            )
        return "".join(parts)

    def preview(
        self, entry: FileEntry, limits: PreviewLimits, budget: int | None = None
    ) -> str | None:
        suffix = PurePosixPath(entry.path).suffix.lower()
        cap = limits.image_bytes if suffix in IMAGE_TYPES else limits.text_bytes
        if budget is not None:
            cap = min(cap, budget)
        if suffix in IMAGE_TYPES and entry.size > cap:
            return None
        data = self.head(entry, cap)
        if data is None:
            return None
        return preview_html(entry.path, data, entry.size, limits)

    def markdown(self, entry: FileEntry, limits: PreviewLimits) -> str | None:
        """A Markdown file's text (its head, within `limits`), or None for any other file."""
        if not entry.path.lower().endswith(MARKDOWN_SUFFIXES) or entry.kind != "file":
            return None
        data = self.head(entry, limits.text_bytes)
        if data is None or b"\0" in data[:8192]:
            return None
        text = _decode_head(data)
        if text is not None and len(data) < entry.size:
            text += f"\n\n*… first {human_size(len(data))} of {human_size(entry.size)}*\n"
        return text

    # -- plain text ------------------------------------------------------------------------

    def to_plain(self) -> str:
        lines = [f"RunResult {self.summary_text()}"]
        if self.stale:
            lines.append(self.stale)
        lines += self.details()
        lines += self.notes()
        lines += [f"{label:<7} ipfs://{cid}" for label, cid in self.cids() if cid]
        if self.listing_error:
            lines.append(self.listing_error)
        dir_sizes = self._directory_sizes()
        for entry in self.entries[:LISTING_ROWS]:
            indent = "  " * entry.path.count("/")
            name = entry.path.rsplit("/", 1)[-1] + ("/" if entry.kind == "directory" else "")
            size = human_size(self._size_of(entry, dir_sizes))
            lines.append(f"{size:>10}  {indent}{name}  {entry.cid}")
        if len(self.entries) > LISTING_ROWS:
            lines.append(f"… and {len(self.entries) - LISTING_ROWS} more entries")
        return "\n".join(lines)

    # -- the bundle ------------------------------------------------------------------------

    def mimebundle(self) -> dict[str, Any]:
        bundle: dict[str, Any] = {}
        try:
            self.browser = OutputBrowser(self)
            bundle.update(self.browser._repr_mimebundle_())
        except Exception:
            pass
        # After the widget's bundle: its text/plain is only the widget's repr.
        bundle["text/html"] = self.to_html()
        bundle["text/plain"] = self.to_plain()
        return bundle

    def metadata(self) -> dict[str, Any]:
        return result_metadata(self.result)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        # `display(ResultView(result, gateway))` works without the registered formatter.
        return self.mimebundle()


# -- the widget --------------------------------------------------------------------------------


class OutputBrowser(widgets.VBox):  # type: ignore[misc]
    """Header, a collapsible tree of /output, and a preview of the file clicked."""

    def __init__(self, view: ResultView) -> None:
        self.view = view
        self.buttons: dict[str, widgets.Button] = {}  # path -> the entry's button
        self._selected: widgets.Button | None = None
        self.preview = widgets.HTML("<i>click a file to preview it</i>")
        # A Markdown file is rendered by the front end (text/markdown), not shown as HTML.
        self.rendered = widgets.Output(layout=widgets.Layout(display="none"))
        preview_area = widgets.VBox(
            [self.preview, self.rendered],
            layout=widgets.Layout(
                border="1px solid #ccc", padding="4px", max_height="520px", overflow="auto"
            ),
        )
        header = self.header = widgets.HTML(view.header_html(copy=True))
        entries = view.entries
        if view.listing_error or not entries:
            note = view.listing_error or "/output is empty"
            super().__init__([header, widgets.HTML(f"<i>{_e(note)}</i>")])
            return
        self._dir_sizes = view._directory_sizes()
        children: dict[str, list[FileEntry]] = {}
        for entry in entries[:WIDGET_ROWS]:
            parent = entry.path.rsplit("/", 1)[0] if "/" in entry.path else ""
            children.setdefault(parent, []).append(entry)
        tree_rows = self._rows(children, "", 0)
        if len(entries) > WIDGET_ROWS:
            tree_rows.append(
                widgets.HTML(
                    f"<i>… and {len(entries) - WIDGET_ROWS} more "
                    "entries (see the gateway listing)</i>"
                )
            )
        tree = widgets.VBox(tree_rows, layout=widgets.Layout(max_height="360px", overflow="auto"))
        super().__init__([header, tree, preview_area])
        first = next((e for e in entries if e.kind == "file" and e.path in self.buttons), None)
        if first is not None:
            self.show(first.path)

    def set_stale(self, text: str | None) -> None:
        """Mark the live header stale ("stale: $counts changed"), or no longer."""
        self.view.stale = text
        self.header.value = self.view.header_html(copy=True)

    def _rows(
        self, children: dict[str, list[FileEntry]], parent: str, depth: int
    ) -> list[widgets.Widget]:
        rows: list[widgets.Widget] = []
        for entry in children.get(parent, []):
            name = entry.path.rsplit("/", 1)[-1]
            is_dir = entry.kind == "directory"
            size = human_size(self.view._size_of(entry, self._dir_sizes))
            button = widgets.Button(
                description=name + ("/" if is_dir else ""),
                icon="folder-open" if is_dir else "file",
                tooltip=entry.cid,
                layout=widgets.Layout(width="auto", margin=f"0 0 0 {depth * 20}px"),
            )
            info = widgets.HTML(
                f'<span style="display:inline-block;min-width:6em;text-align:right">'
                f"{_e(size)}</span>&nbsp; {_link(self.view._entry_href(entry), entry.cid)}"
            )
            rows.append(widgets.HBox([button, info]))
            self.buttons[entry.path] = button
            if is_dir:
                box = widgets.VBox(self._rows(children, entry.path, depth + 1))
                button.on_click(self._toggler(button, box))
                rows.append(box)
            else:
                button.on_click(lambda _button, path=entry.path: self.show(path))
        return rows

    @staticmethod
    def _toggler(button: widgets.Button, box: widgets.VBox) -> Callable[[Any], None]:
        def toggle(_button: Any) -> None:
            hidden = box.layout.display == "none"
            box.layout.display = "flex" if hidden else "none"
            button.icon = "folder-open" if hidden else "folder"

        return toggle

    def show(self, path: str) -> None:
        """Preview one file of the output (fetched now, within WIDGET_PREVIEW)."""
        entry = next((e for e in self.view.entries if e.path == path), None)
        if entry is None:
            raise KeyError(path)
        if self._selected is not None:
            self._selected.button_style = ""
        self._selected = self.buttons.get(path)
        if self._selected is not None:
            self._selected.button_style = "info"
        link = _link(self.view._entry_href(entry), "open through the gateway")
        title = f"<div><code>{_e(path)}</code> ({human_size(entry.size)}) · {link}</div>"
        markdown = self.view.markdown(entry, WIDGET_PREVIEW)
        if markdown is not None:
            self.preview.value = title
            self.rendered.outputs = (
                {
                    "output_type": "display_data",
                    "data": {"text/markdown": inert_markdown(markdown), "text/plain": markdown},
                    "metadata": {},
                },
            )
            self.rendered.layout.display = "block"
            return
        self.rendered.outputs = ()
        self.rendered.layout.display = "none"
        snippet = self.view.preview(entry, WIDGET_PREVIEW)
        if snippet is None:
            snippet = "<i>no preview (binary or too large)</i>"
        self.preview.value = title + snippet


# -- IPython formatters ------------------------------------------------------------------------


def result_metadata(
    result: RunResult, *, reads: dict[str, str] | None = None, binds: str | None = None
) -> dict[str, Any]:
    """Output metadata naming the run: saved with the cell, so `ipfs-execute verify
    NOTEBOOK.ipynb` finds every run of an executed notebook without reading its text. `reads`
    (variable -> the CID it held) and `binds` (-o NAME) let it tell stale cells too."""
    record = result.record
    named = {
        "record": result.record_cid,
        "output": record.output,
        "rootfs": record.rootfs,
        "input": record.input,
    }
    meta: dict[str, Any] = {key: cid for key, cid in named.items() if cid}
    if reads:
        meta["reads"] = dict(reads)
    if binds:
        meta["binds"] = binds
    return {"ipfs_execute": meta}


def result_mimebundle(
    result: RunResult, gateway: Gateway | str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(data, metadata), as IPython's mimebundle formatters may return."""
    view = ResultView(result, gateway)
    return view.mimebundle(), view.metadata()


def ref_mimebundle(ref: IpfsRef, gateway: Gateway | str) -> dict[str, Any]:
    """A bound CID (from %ipfs_add / %ipfs_mkdir): `ipfs://…` linked through the gateway."""
    path = str(ref).removeprefix("/ipfs/")
    cid, _, sub = path.partition("/")
    href = gateway_href(gateway, cid, sub)
    return {"text/plain": repr(ref), "text/html": f"<code>{_link(href, f'ipfs://{path}')}</code>"}


# -- a running cell's status line -------------------------------------------------------------

_LONG_CID = re.compile(r"\b(b[a-z2-7]{12})[a-z2-7]{38,}\b")


def _short_cids(text: str) -> str:
    return _LONG_CID.sub(lambda m: f"{m.group(1)}…", text)


def phase_text(what: str, done: int, total: int | None) -> str:
    """A run's phase, from the run's on_progress (staging.ProgressCallback) arguments."""
    if what == PHASE_RUNNING:
        return "payload running"
    if what == PHASE_ADDING_OUTPUT:
        return f"adding output: {done:,} of {total or done:,} files"
    if what == "":
        return "looking up"
    if total:
        share = min(done / total, 1.0)
        return (
            f"staging {_short_cids(what)}: {human_size(done)} of {human_size(total)} ({share:.0%})"
        )
    return f"staging {_short_cids(what)}: {human_size(done)}"


def live_bundle(
    seconds: float, what: str, done: int, total: int | None, where: str | None = None
) -> dict[str, str]:
    """ "running · 12.3 s · staging rootfs bafy…: 45.0 MiB of 120.0 MiB (38%)", with a bar
    while staging or adding has a total. `where` (a run on a cluster: "queued", "on worker
    tcp://…") stands in for the phase, which a worker does not report."""
    phase = where if where is not None else phase_text(what, done, total)
    plain = f"running · {seconds:.1f} s · {phase}"
    bar = ""
    if total and what != PHASE_RUNNING and where is None:
        bar = f'<progress value="{min(done, total)}" max="{total}"></progress> '
    html_text = (
        f'<div class="ipfs-execute-status">{bar}<b>running · {seconds:.1f} s</b> · '
        f"{_e(phase)}</div>"
    )
    return {"text/plain": plain, "text/html": html_text}


MAX_RUNNING_SHOWN = 8  # entries named in an --each status line's "running:"


def entries_status_text(snapshot: EntriesSnapshot) -> str:
    """ "12 of 20 entries done (9 cached, 3 ran) · running: a.csv on tcp://…, b.csv on …" """
    counts = f"{snapshot.cached} cached, {snapshot.ran} ran"
    if snapshot.failed:
        counts += f", {snapshot.failed} failed"
    text = f"{snapshot.done} of {snapshot.total} entries done ({counts})"
    if snapshot.running:
        named = [
            name if worker is None else f"{name} on {worker}"
            for name, worker in snapshot.running[:MAX_RUNNING_SHOWN]
        ]
        more = len(snapshot.running) - len(named)
        text += " · running: " + ", ".join(named) + (f" and {more} more" if more else "")
    if snapshot.waiting:
        text += f" · {snapshot.waiting} queued"
    return text


def entries_bundle(seconds: float, snapshot: EntriesSnapshot) -> dict[str, str]:
    """An --each in progress: its counts and what runs where, with a bar over the entries."""
    text = entries_status_text(snapshot)
    plain = f"{text} · {seconds:.1f} s"
    bar = f'<progress value="{snapshot.done}" max="{max(snapshot.total, 1)}"></progress> '
    html_text = f'<div class="ipfs-execute-status">{bar}{_e(text)} · {seconds:.1f} s</div>'
    return {"text/plain": plain, "text/html": html_text}


def static_line(text: str) -> dict[str, str]:
    return {"text/plain": text, "text/html": f"<div><i>{_e(text)}</i></div>"}


class LiveStatus:
    """A running cell's status line, and the run's on_progress callback.

    Shows "running · 12.3 s" and the phase (staging with bytes, the payload running, adding
    output with files), refreshed every `interval` seconds by a thread: a payload that prints
    nothing still shows it is alive. Shown only once the run has taken `delay` seconds, so a
    quick run shows nothing. Plain display data under one display id (no widget), replaced by a
    one-line summary at the end: the saved notebook keeps only that line.
    """

    def __init__(self, delay: float = 0.5, interval: float = 0.5) -> None:
        self.delay = delay
        self.interval = interval
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._phase: tuple[str, int, int | None] = ("", 0, None)
        self._where: str | None = None  # a cluster run: "queued", "on worker ..."
        self._handle: Any = None
        self._fetched: dict[str, tuple[int, float]] = {}  # what -> (bytes, seconds)
        self._first_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="ipfs-execute-status", daemon=True)
        self._thread.start()

    def __call__(self, what: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        with self._lock:
            self._phase = (what, done, total)
            if what not in (PHASE_RUNNING, PHASE_ADDING_OUTPUT):
                first = self._first_seen.setdefault(what, now)
                self._fetched[what] = (done, now - first)
        # A new phase or more bytes show at once (the core reports a few times a second).
        if now - self._started >= self.delay and not self._stop.is_set():
            self._render()

    def place(self, where: str) -> None:
        """Where a run on a cluster stands ("queued", "on worker tcp://…"): shown in place
        of the phase (a worker does not report one)."""
        with self._lock:
            changed = where != self._where
            self._where = where
        if changed and time.monotonic() - self._started >= self.delay and not self._stop.is_set():
            self._render()

    def _bundle(self, seconds: float) -> dict[str, str]:
        return live_bundle(seconds, *self._phase, where=self._where)

    def _tick(self) -> None:
        # Display calls from this thread reach the running cell: ipykernel falls back to the
        # parent header of the request being executed when a thread has none of its own.
        if self._stop.wait(self.delay):
            return
        while True:
            self._render()
            if self._stop.wait(self.interval):
                return

    def _render(self) -> None:
        from IPython.display import display

        with self._lock:
            bundle = self._bundle(time.monotonic() - self._started)
            try:
                if self._handle is None:
                    self._handle = display(bundle, raw=True, display_id=True)
                else:
                    self._handle.update(bundle, raw=True)
            except Exception:
                self._stop.set()  # no display to update (the shell went away): stay quiet

    @property
    def shown(self) -> bool:
        return self._handle is not None

    def _summary(self) -> list[str]:
        return []

    def finish(self, outcome: str = "") -> None:
        """Stop the updates; replace the line with a static summary (only if it was shown)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if self._handle is None:
            return
        seconds = time.monotonic() - self._started
        parts = [f"{outcome or 'finished'} after {seconds:.1f} s", *self._summary()]
        parts += [
            f"fetched {_short_cids(what)}: {human_size(size)} in {took:.1f} s"
            for what, (size, took) in self._fetched.items()
        ]
        self._handle.update(static_line(" · ".join(parts)), raw=True)
        self._handle = None


class EntriesStatus(LiveStatus):
    """An --each cell's status line: "12 of 20 entries done (9 cached, 3 ran) · running: a.csv
    on tcp://…" (`entries_status_text`), refreshed like LiveStatus's; `poll` gives the
    snapshot (the magic asks the core: the display only formats it)."""

    def __init__(
        self, poll: Callable[[], EntriesSnapshot], delay: float = 0.5, interval: float = 0.5
    ) -> None:
        self._poll = poll
        self._last: EntriesSnapshot | None = None
        super().__init__(delay, interval)

    def _bundle(self, seconds: float) -> dict[str, str]:
        with suppress(Exception):  # a status is a courtesy: the last one known stays
            self._last = self._poll()
        if self._last is None or not self._last.total:  # the entries are still being listed
            return live_bundle(seconds, "", 0, None)
        return entries_bundle(seconds, self._last)

    def _summary(self) -> list[str]:
        with suppress(Exception):
            self._last = self._poll()  # the final count, not the last tick's
        if self._last is None or not self._last.total:
            return []
        last = self._last
        counts = f"{last.cached} cached, {last.ran} ran" + (
            f", {last.failed} failed" if last.failed else ""
        )
        return [f"{last.done} of {last.total} entries ({counts})"]


def add_progress_bundle(progress: AddProgress) -> dict[str, str]:
    """An add in progress: files, bytes and rate, with a bar over the bytes."""
    plain = (
        f"adding {progress.path}: {progress.files:,} of {progress.files_total:,} files, "
        f"{human_size(progress.bytes)} of {human_size(progress.bytes_total)}, "
        f"{human_size(int(progress.rate))}/s"
    )
    bar = f'<progress value="{progress.bytes}" max="{max(progress.bytes_total, 1)}"></progress> '
    return {"text/plain": plain, "text/html": f"<div>{bar}{_e(plain)}</div>"}


class AddProgressLine:
    """An add's progress in the cell via display_id (an AddProgressCallback); replaced by a
    one-line summary when the add ends. Like LiveStatus: shown only once the add takes
    longer than `delay` seconds, and plain display data, so the saved notebook keeps the
    summary line only."""

    def __init__(self, delay: float = 0.5) -> None:
        self.delay = delay
        self._handle: Any = None
        self._last: AddProgress | None = None

    def __call__(self, progress: AddProgress) -> None:
        self._last = progress
        if self._handle is None and progress.seconds < self.delay:
            return
        if progress.finished:
            self.finish()
            return
        from IPython.display import display

        bundle = add_progress_bundle(progress)
        if self._handle is None:
            self._handle = display(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)

    @property
    def shown(self) -> bool:
        return self._handle is not None

    def finish(self, outcome: str = "") -> None:
        """Replace the progress line with a static summary (only if it was shown)."""
        last = self._last
        if self._handle is None or last is None:
            return
        files = "1 file" if last.files == 1 else f"{last.files:,} files"
        text = (
            f"added {last.path}: {files}, {human_size(last.bytes)} in {last.seconds:.1f} s "
            f"({human_size(int(last.rate))}/s)"
        )
        if outcome:
            text = f"adding {last.path}: {outcome} after {files}, {human_size(last.bytes)}"
        self._handle.update(static_line(text), raw=True)
        self._handle = None


# -- one run per entry (--each) ----------------------------------------------------------------


def entries_mimebundle(
    each: EntryResults, gateway: Gateway | str, *, stale: str | None = None
) -> dict[str, Any]:
    """The runs of `--each`: the composed output's link, then one row per entry (its state,
    the node that ran it on a cluster, its output); failed entries first. `stale`: the
    ledger's "stale: $name changed", said first."""
    output = str(each.output)
    rows = []
    names = [*each.failed, *(name for name in each.results if name not in each.failed)]
    for name in names:
        result = each.results.get(name)
        if name in each.failed:
            state = f"✗ {each.failed[name]}"
        else:
            state = "✓ cached" if result is not None and result.cache_hit else "✓ ran"
        node = result.record.node if result is not None and result.record.node else ""
        out = ""
        if result is not None and result.record.output and name not in each.failed:
            cid = result.record.output
            out = _link(gateway_href(gateway, cid), f"{cid[:12]}…")
        cells = (html.escape(name), html.escape(state), html.escape(node[-12:]), out)
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    head = (
        f"<div><b>{len(names)} entries</b>: {len(each.executed)} ran, "
        f"{sum(1 for r in each.results.values() if r.cache_hit)} from the cache, "
        f"{len(each.failed)} failed; output "
        f"<code>{_link(gateway_href(gateway, output), f'ipfs://{output}')}</code></div>"
    )
    table = (
        "<table><tr><th>entry</th><th>state</th><th>node</th><th>output</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    if stale is None:
        return {"text/plain": repr(each), "text/html": head + table}
    warning = (
        f'<div class="ipfs-execute-stale" style="color:#9a6700"><b>⚠ {_e(stale)}</b>'
        " (%ipfs_rerun_stale runs it again)</div>"
    )
    return {"text/plain": f"{each!r}\n{stale}", "text/html": warning + head + table}
