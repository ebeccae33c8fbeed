"""A real browser: JupyterLab on loopback, driven in Debian's chromium through Playwright.

The quickstart is run as a user runs it (Run > Run All Cells); the result widget must list the
output's files with their sizes and preview a file on click. The saved notebook is then opened
on a second server that has never seen it (another notebook secret, as on a colleague's
machine): untrusted, so JupyterLab shows the results' static text/html instead of the widget.
Screenshots of both go to artifacts/ (quickstart-widget.png, quickstart-untrusted.png).
Links point to the node's gateway on its kept port, and a CID's copy button fills the clipboard.
A second notebook checks a Markdown file's rendered preview, a CSV's right-aligned numbers and
links through a configured subdomain gateway.

The servers' kernels use the session's embedded node (IPFS_EXECUTE_HOME). The notebook runs in
a temporary root laid out like the project (notebooks/, examples/ linked, build/).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import world_traversable_tmpdir
from playwright.sync_api import Locator, Page, expect, sync_playwright

from ipfs_execute_magic.jupyter.display import human_size
from ipfs_execute_magic.node import stored_gateway_url

pytestmark = [pytest.mark.browser, pytest.mark.integration]

PROJECT = Path(__file__).resolve().parent.parent
ARTIFACTS = PROJECT / "artifacts"
CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright's own browser downloads are not used
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# User settings for clean screenshots: no news or update toasts; every cell kept rendered.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
        "doNotDisturbMode": True,
    },
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}
SERVER_START = 60  # seconds
RUN_ALL = 120  # seconds for the whole quickstart, cold image build included


def counts_size() -> str:
    """Size of counts.txt as the widget shows it: busybox `uniq -c` lines are "%7d %s"."""
    words = (PROJECT / "examples" / "data" / "words" / "words.txt").read_text().split()
    return human_size(sum(len(f"{count:7d} {word}\n") for word, count in Counter(words).items()))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Lab:
    url: str
    token: str
    log: Path

    def notebook_url(self, name: str) -> str:
        # ?reset: ignore any saved workspace (JupyterLab reopens the last layout otherwise).
        return f"{self.url}/lab/tree/{name}?reset&token={self.token}"


@contextmanager
def jupyter_lab(root: Path, state: Path, home: Path) -> Iterator[Lab]:
    """A JupyterLab server on root/notebooks whose config, data (notebook secret, trust
    database) and runtime files live in `state`: two states, two machines."""
    for name in ("config", "data", "runtime", "settings", "workspaces"):
        (state / name).mkdir(parents=True, exist_ok=True)
    for relative, values in LAB_SETTINGS.items():
        path = state / "settings" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IPFS_EXECUTE_", "JUPYTER"))}
    env.update(
        IPFS_EXECUTE_HOME=str(home),
        JUPYTER_CONFIG_DIR=str(state / "config"),
        JUPYTER_DATA_DIR=str(state / "data"),
        JUPYTER_RUNTIME_DIR=str(state / "runtime"),
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    )
    token, port = secrets.token_hex(16), free_port()
    log = state / "server.log"
    argv = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.token={token}",
        f"--ServerApp.root_dir={root / 'notebooks'}",
        "--allow-root",
        f"--LabApp.user_settings_dir={state / 'settings'}",
        f"--LabApp.workspaces_dir={state / 'workspaces'}",
    ]
    with open(log, "wb") as out:
        server = subprocess.Popen(
            argv,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    lab = Lab(f"http://127.0.0.1:{port}", token, log)
    try:
        deadline = time.monotonic() + SERVER_START
        while True:
            assert server.poll() is None, f"jupyter lab exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"jupyter lab not up:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{lab.url}/api/status?token={token}", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        yield lab
    finally:
        server.terminate()  # the server shuts its kernels down on SIGTERM
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    path = world_traversable_tmpdir("iex-lab-")
    (path / "notebooks").mkdir()
    shutil.copy(PROJECT / "notebooks" / "quickstart.ipynb", path / "notebooks")
    (path / "examples").symlink_to(PROJECT / "examples")  # ../examples from the notebook
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def page() -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        context.grant_permissions(["clipboard-read", "clipboard-write"])  # the copy buttons
        try:
            yield context.new_page()
        finally:
            context.close()
            browser.close()


def open_notebook(page: Page, lab: Lab, name: str) -> None:
    page.goto(lab.notebook_url(name))
    expect(page.locator(".jp-NotebookPanel .jp-Cell").first).to_be_visible(timeout=60_000)
    # The kernel is up when the status bar names it idle (before, Run All would ask which
    # kernel to start).
    expect(
        page.locator("#jp-main-statusbar").get_by_text("Python 3 (ipykernel) | Idle")
    ).to_be_visible(timeout=60_000)


def cell_output(page: Page, first_line: str) -> Locator:
    """The output area of the code cell whose source starts with `first_line`."""
    cell = page.locator(".jp-CodeCell").filter(
        has=page.locator(".jp-InputArea-editor", has_text=first_line)
    )
    return cell.locator(".jp-OutputArea").first


def test_quickstart_in_jupyterlab(
    root: Path, page: Page, home: Path, store: object, tmp_path: Path
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    size = counts_size()
    saved = root / "notebooks" / "quickstart.ipynb"

    # -- a user runs the quickstart ---------------------------------------------------------
    with jupyter_lab(root, tmp_path / "first", home) as lab:
        open_notebook(page, lab, "quickstart.ipynb")
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(
            ".lm-Menu-item:not(.lm-mod-hidden) .lm-Menu-itemLabel", has_text="Run All Cells"
        ).first.click()
        expect(cell_output(page, "%ipfs_lineage top")).to_contain_text(
            "2 runs, back to", timeout=RUN_ALL * 1000
        )  # the last cell
        expect(cell_output(page, "%ipfs_verify top")).to_contain_text("✓ reproducible")

        counts = cell_output(page, "%%ipfs_execute $busybox $data -o counts")
        widget = counts.locator(".widget-vbox").first
        expect(widget).to_be_visible()
        expect(widget).to_contain_text("✓ exit 0")
        files = widget.locator("button.jupyter-button")
        expect(files).to_have_text(["counts.txt", "total.txt"])
        expect(widget).to_contain_text(size)  # counts.txt's size, next to its name
        # The first file is previewed at once; a click previews another, fetched on demand.
        expect(widget).to_contain_text("6 the")
        files.filter(has_text="total.txt").click()
        expect(widget).to_contain_text("total.txt (3 B)")
        expect(widget.locator("pre").last).to_have_text("34\n")
        # A CID's link goes to the node's gateway on the port kept for the data directory
        # (it still answers tomorrow), and its copy button puts the CID on the clipboard.
        gateway = stored_gateway_url(home)
        copy = widget.locator("button.ipfs-execute-copy").first
        cid = copy.get_attribute("data-cid")
        assert gateway and cid
        link = widget.locator("a", has_text=f"ipfs://{cid}").first
        assert link.get_attribute("href") == f"{gateway}/ipfs/{cid}"
        with urllib.request.urlopen(f"{gateway}/ipfs/{cid}/counts.txt", timeout=10) as answer:
            assert b"6 the" in answer.read()
        copy.click()
        expect(copy).to_have_text("copied")
        assert page.evaluate("navigator.clipboard.readText()") == cid
        expect(
            cell_output(page, "%%ipfs_execute $busybox $counts -o top").locator(
                ".widget-vbox button.jupyter-button"
            )
        ).to_have_text(["top.txt"])
        widget.scroll_into_view_if_needed()
        page.wait_for_timeout(500)  # let the scrolled page paint
        page.screenshot(path=str(ARTIFACTS / "quickstart-widget.png"))

        before = saved.stat().st_mtime_ns
        page.keyboard.press("Control+s")
        deadline = time.monotonic() + 20
        while saved.stat().st_mtime_ns == before:
            assert time.monotonic() < deadline, "the notebook was not saved"
            time.sleep(0.1)

    # -- a colleague opens the saved notebook: untrusted, no widget, the static HTML ------------
    with jupyter_lab(root, tmp_path / "second", home) as lab:
        open_notebook(page, lab, "quickstart.ipynb")
        assert "Notebook quickstart.ipynb is not trusted" in lab.log.read_text()
        counts = cell_output(page, "%%ipfs_execute $busybox $data -o counts")
        static = counts.locator(".jp-RenderedHTMLCommon").filter(has_text="/output").first
        expect(static).to_be_visible(timeout=30_000)
        expect(static).to_contain_text("✓ exit 0")
        expect(static.locator("a", has_text="counts.txt")).to_be_visible()
        expect(static.locator("a", has_text="total.txt")).to_be_visible()
        expect(static).to_contain_text(size)
        expect(static).to_contain_text("6 the")  # the saved preview
        # The saved links name the stable gateway and keep the ipfs:// text; no copy buttons.
        assert static.locator("a", has_text=f"ipfs://{cid}").first.get_attribute("href") == (
            f"{gateway}/ipfs/{cid}"
        )
        expect(static.locator("button")).to_have_count(0)
        expect(page.locator(".jp-NotebookPanel .widget-vbox")).to_have_count(0)
        expect(page.get_by_text("Error displaying widget")).to_have_count(0)
        static.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "quickstart-untrusted.png"))


def test_markdown_preview_and_configured_gateway_links(
    root: Path, page: Page, home: Path, busybox_cid: str, tmp_path: Path
) -> None:
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    notebook.cells = [
        nbformat.v4.new_code_cell(
            "%load_ext ipfs_execute_magic\n"
            "%config IpfsExecuteMagics.gateway = 'https://dweb.link'\n"
            "%config IpfsExecuteMagics.gateway_style = 'subdomain'"
        ),
        nbformat.v4.new_code_cell(
            f"%%ipfs_execute {busybox_cid} -o notes\n"
            "printf '# Notes\\n\\n*three* pears\\n' > /output/notes.md\n"
            # A payload's Markdown is untrusted: its HTML must show as text, never run.
            "echo '<img src=x onerror=\"document.title=1\"> [go](javascript:document.title=2)'"
            " >> /output/notes.md\n"
            "printf 'fruit,count\\npear,3\\n' > /output/table.csv"
        ),
    ]
    nbformat.write(notebook, root / "notebooks" / "markdown.ipynb")
    with jupyter_lab(root, tmp_path / "lab", home) as lab:
        open_notebook(page, lab, "markdown.ipynb")
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(
            ".lm-Menu-item:not(.lm-mod-hidden) .lm-Menu-itemLabel", has_text="Run All Cells"
        ).first.click()
        widget = cell_output(page, "%%ipfs_execute").locator(".widget-vbox").first
        expect(widget).to_contain_text("✓ exit 0", timeout=RUN_ALL * 1000)
        # The first file, notes.md, is rendered as Markdown, not shown as its text.
        expect(widget.locator("h1", has_text="Notes")).to_be_visible()
        expect(widget.locator("em", has_text="three")).to_be_visible()
        rendered = widget.locator(".jp-RenderedMarkdown")
        expect(rendered).to_contain_text("<\u200bimg src=x onerror=")  # shown, not made
        expect(rendered.locator("img")).to_have_count(0)
        href = rendered.locator("a", has_text="go").get_attribute("href") or ""
        assert not href.lower().startswith("javascript:"), href
        assert page.title() != "1"
        widget.locator("button.jupyter-button", has_text="table.csv").click()
        expect(widget.locator("h1", has_text="Notes")).to_have_count(0)
        expect(widget.get_by_role("cell", name="3", exact=True)).to_have_css("text-align", "right")
        expect(widget.get_by_role("cell", name="pear", exact=True)).to_have_css(
            "text-align", "left"
        )
        # The configured gateway, subdomain style, beside the ipfs:// text.
        copy = widget.locator("button.ipfs-execute-copy").first
        cid = copy.get_attribute("data-cid")
        link = widget.locator("a", has_text=f"ipfs://{cid}").first
        assert link.get_attribute("href") == f"https://{cid}.ipfs.dweb.link"


def test_live_status_line_and_stale_marker(
    root: Path, page: Page, home: Path, busybox_cid: str, tmp_path: Path
) -> None:
    """A 3 s cell shows "running · N s" and its phase while it runs; re-running the upstream
    cell (a new CID in `counts`) marks the reader's live header stale. Screenshots of both go
    to artifacts/ (live-status.png, stale-marker.png) for docs/notebooks.md."""
    import nbformat

    ARTIFACTS.mkdir(exist_ok=True)
    tag = secrets.token_hex(4)
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    upstream = "%%ipfs_execute $busybox -o counts -p run={next(runs)}"
    reader = "%%ipfs_execute $busybox $counts -o report"
    notebook.cells = [
        nbformat.v4.new_code_cell(
            f"%load_ext ipfs_execute_magic\nimport itertools\nruns = itertools.count()\n"
            f"busybox = {busybox_cid!r}"
        ),
        # Each run of the cell gets the next parameter: another output, another CID.
        nbformat.v4.new_code_cell(f"{upstream}\nsleep 3\necho {tag} $run > /output/counts.txt"),
        nbformat.v4.new_code_cell(f"{reader}\nwc -c < /input/counts.txt > /output/size.txt"),
    ]
    nbformat.write(notebook, root / "notebooks" / "stale.ipynb")
    with jupyter_lab(root, tmp_path / "lab", home) as lab:
        open_notebook(page, lab, "stale.ipynb")
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(
            ".lm-Menu-item:not(.lm-mod-hidden) .lm-Menu-itemLabel", has_text="Run All Cells"
        ).first.click()
        status = cell_output(page, upstream).locator(".ipfs-execute-status")
        expect(status).to_contain_text("payload running", timeout=60_000)
        first = status.inner_text()
        assert first.startswith("running · "), first
        page.wait_for_timeout(1100)  # the line is updated about every 0.5 s
        assert status.inner_text() != first
        cell_output(page, upstream).scroll_into_view_if_needed()  # each update is a new line
        expect(status).to_contain_text("payload running")
        page.screenshot(path=str(ARTIFACTS / "live-status.png"))

        widget = cell_output(page, reader).locator(".widget-vbox").first
        expect(widget).to_contain_text("✓ exit 0", timeout=RUN_ALL * 1000)
        # Done: the line became a static summary, no longer updated.
        expect(cell_output(page, upstream)).to_contain_text("finished after ")
        expect(cell_output(page, upstream).locator(".ipfs-execute-status")).to_have_count(0)
        expect(widget).not_to_contain_text("stale")

        # The upstream cell runs again: `counts` holds another CID, the reader is stale.
        page.locator(".jp-CodeCell").filter(
            has=page.locator(".jp-InputArea-editor", has_text=upstream)
        ).locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        marker = widget.locator(".ipfs-execute-stale")
        expect(marker).to_contain_text("stale: $counts changed", timeout=60_000)
        widget.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "stale-marker.png"))
