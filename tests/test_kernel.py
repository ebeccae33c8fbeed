"""The magics in a real ipykernel, driven over the Jupyter protocol (jupyter_client, nbclient).

What only a kernel shows: output streamed while the payload runs, a real interrupt
(SIGINT to the kernel), and executed notebooks as they are saved. The kernel uses the session's
embedded node through IPFS_EXECUTE_HOME.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import nbformat
import pytest
from helpers import execute_notebook
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel

from ipfs_execute_magic.jupyter.magics import INTERRUPTED_LINE

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def kernel_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPFS_EXECUTE_")}
    env["IPFS_EXECUTE_HOME"] = str(home)
    return env


class Kernel(NamedTuple):
    manager: KernelManager
    client: BlockingKernelClient


@pytest.fixture(scope="module")
def kernel(home: Path, store, busybox_cid: str) -> Iterator[Kernel]:
    # The kernelspec's "python" is replaced by sys.executable: the venv's python.
    manager, client = start_new_kernel(kernel_name="python3", env=kernel_env(home))
    try:
        reply = execute(client, f"%load_ext ipfs_execute_magic\nbusybox = {busybox_cid!r}")
        assert reply["content"]["status"] == "ok", reply
        yield Kernel(manager, client)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def execute(
    client: BlockingKernelClient, code: str, timeout: float = 60, on_iopub: Any = None
) -> dict[str, Any]:
    """Run code; pass every iopub message of it to `on_iopub`; return the execute_reply."""
    return client.execute_interactive(
        code, timeout=timeout, output_hook=on_iopub or (lambda _message: None)
    )


def sent_at(message: dict[str, Any]) -> dt.datetime:
    return message["header"]["date"]


def sandbox_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


def test_output_streams_while_the_payload_runs(kernel: Kernel) -> None:
    streams: list[dict[str, Any]] = []

    def collect(message: dict[str, Any]) -> None:
        if message["msg_type"] == "stream":
            streams.append(message)

    reply = execute(
        kernel.client,
        "%%ipfs_execute $busybox -o slow\n"
        "echo first; sleep 2; echo second >&2; echo done > /output/d",
        on_iopub=collect,
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    text = {
        name: "".join(m["content"]["text"] for m in streams if m["content"]["name"] == name)
        for name in ("stdout", "stderr")
    }
    assert text["stdout"] == "first\n" and text["stderr"] == "second\n"
    lead = (sent_at(reply) - sent_at(streams[0])).total_seconds()
    assert lead > 1.0, f"the first line arrived only {lead:.2f} s before the end"
    reply = execute(kernel.client, "assert slow.read_text('d') == 'done\\n'")
    assert reply["content"]["status"] == "ok", reply["content"]


@pytest.fixture(scope="module")
def python_cid(store, image_dir: Path) -> str:
    from ipfs_execute_magic.images import builders as images

    return store.add_path(images.build_python(image_dir))


def test_python_payload_streams_unbuffered_and_progress_is_replaced(
    kernel: Kernel, python_cid: str
) -> None:
    messages: list[dict[str, Any]] = []
    setup = execute(
        kernel.client,
        "from ipfs_execute_magic.jupyter import magics\n"
        f"magics.PROGRESS_DELAY = 0\npyimage = {python_cid!r}",
    )
    assert setup["content"]["status"] == "ok", setup["content"]
    reply = execute(
        kernel.client,
        "%%ipfs_execute $pyimage --interpreter python3 -o py\n"
        "import time\nprint('first')\ntime.sleep(2)\n"
        "print('second')",
        timeout=120,
        on_iopub=messages.append,
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    streams = [m for m in messages if m["msg_type"] == "stream"]
    assert "".join(m["content"]["text"] for m in streams) == "first\nsecond\n"
    lead = (sent_at(reply) - sent_at(streams[0])).total_seconds()
    assert lead > 1.0, f"python buffered its output: first line only {lead:.2f} s before the end"

    # The status line (a display call from a thread: it reaches the cell) showed the python
    # image being fetched under one display id, and its last update is a static line:
    # nothing of a widget is left to save.
    shown = [
        m
        for m in messages
        if m["msg_type"] == "display_data"
        and m["content"]["data"].get("text/plain", "").startswith("running · ")
    ]
    assert len(shown) == 1
    display_id = shown[0]["content"]["transient"]["display_id"]
    updates = [
        m
        for m in messages
        if m["msg_type"] == "update_display_data"
        and m["content"]["transient"]["display_id"] == display_id
    ]
    texts = [m["content"]["data"]["text/plain"] for m in updates]
    assert any(" · staging rootfs " in text for text in texts)
    assert updates and "fetched rootfs" in texts[-1]
    assert set(updates[-1]["content"]["data"]) == {"text/plain", "text/html"}


def test_errors_render_short_in_the_kernel(kernel: Kernel) -> None:
    reply = execute(kernel.client, "%%ipfs_execute $busybox\necho bad input >&2; exit 4")
    content = reply["content"]
    assert content["status"] == "error" and content["ename"] == "PayloadFailedError"
    assert "status 4" in content["traceback"][0] and content["traceback"][-1] == "  bad input"
    assert len(content["traceback"]) == 3

    messages: list[dict[str, Any]] = []
    reply = execute(kernel.client, "%%ipfs_execute not-a-cid\necho", on_iopub=messages.append)
    content = reply["content"]
    assert content["ename"] == "UsageError" and "not a CID" in content["evalue"]
    # IPython shows a UsageError as one line on stderr, with no traceback.
    shown = "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")
    assert shown.startswith("UsageError: ROOTFS:") and shown.count("\n") == 1
    assert not content["traceback"]


def test_interrupt_kills_the_sandbox_and_the_kernel_goes_on(kernel: Kernel) -> None:
    client = kernel.client
    marker = f"iex-kernel-interrupt-{secrets.token_hex(6)}"
    msg_id = client.execute(f"%%ipfs_execute $busybox\nsh -c 'sleep 60; true' {marker}")
    deadline = time.monotonic() + 20
    while not sandbox_processes(marker):
        assert time.monotonic() < deadline, "the payload never started"
        time.sleep(0.05)

    interrupted_at = time.monotonic()
    kernel.manager.interrupt_kernel()  # SIGINT to the kernel, as JupyterLab's stop button
    reply = client.get_shell_msg(timeout=10)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = client.get_shell_msg(timeout=10)
    elapsed = time.monotonic() - interrupted_at
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert reply["content"]["traceback"] == ["KeyboardInterrupt"]
    assert elapsed < 3, f"the cell took {elapsed:.1f} s to stop"
    assert sandbox_processes(marker) == []

    stderr = ""
    while True:
        message = client.get_iopub_msg(timeout=10)
        if message["parent_header"].get("msg_id") != msg_id:
            continue
        if message["msg_type"] == "stream" and message["content"]["name"] == "stderr":
            stderr += message["content"]["text"]
        if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
            break
    assert INTERRUPTED_LINE in stderr

    reply = execute(client, "%%ipfs_execute $busybox -o after\necho ok > /output/ok")
    assert reply["content"]["status"] == "ok", reply["content"]


def test_executed_notebook_validates_and_keeps_fallbacks(
    home: Path, store, busybox_cid: str, monkeypatch
) -> None:
    monkeypatch.delenv("IPFS_EXECUTE_API", raising=False)
    monkeypatch.setenv("IPFS_EXECUTE_HOME", str(home))
    nb = execute_notebook(
        [
            "%load_ext ipfs_execute_magic",
            f"busybox = {busybox_cid!r}",
            "%%ipfs_execute $busybox -o table\n"
            "printf 'word,count\\npear,3\\n' > /output/table.csv; echo made",
            "%%ipfs_execute $busybox $table -o copy\ncp /input/table.csv /output/again.csv",
            "assert copy.read_text('again.csv').startswith('word,count')",
        ]
    )
    nbformat.validate(nb)
    nb = nbformat.reads(nbformat.writes(nb), as_version=4)  # what is saved is what we check

    for index in (2, 3):
        results = [out for out in nb.cells[index].outputs if out.output_type == "execute_result"]
        assert len(results) == 1, nb.cells[index].outputs
        data = results[0].data
        assert {"text/html", "text/plain", WIDGET_MIME} <= set(data)
        assert "ipfs://" in data["text/plain"]
    html = nb.cells[2].outputs[-1].data["text/html"]
    assert "table.csv" in html and 'href="http' in html and "pear" in html
    streams = [out for out in nb.cells[2].outputs if out.output_type == "stream"]
    assert streams and streams[0].text == "made\n"
