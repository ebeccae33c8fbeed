"""Stale results and the live status line of a running cell.

The ledger's bookkeeping alone (jupyter/stale.py), then the magics in a real IPython shell on
the real node: a result whose `$variable` was rebound says so in its header (the live widget's
too), and %ipfs_rerun_stale runs it again.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from pathlib import Path

import pytest
from helpers import BIN, cli_env, world_traversable_tmpdir
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from ipfs_execute_magic.jupyter import magics
from ipfs_execute_magic.jupyter.display import LiveStatus, live_bundle
from ipfs_execute_magic.jupyter.stale import StaleLedger, cid_of, names_read
from ipfs_execute_magic.per_entry import EntryResults
from ipfs_execute_magic.result import IpfsRef, RunResult
from ipfs_execute_magic.staging import PHASE_ADDING_OUTPUT, PHASE_RUNNING
from ipfs_execute_magic.verification import NotebookVerdict, StaleCell, stale_cells

CID_A = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"
CID_B = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"


def ok(ip: InteractiveShell, source: str) -> object:
    result = ip.run_cell(source)
    assert result.error_in_exec is None, result.error_in_exec
    return result.result


# -- the bookkeeping ---------------------------------------------------------------------------


def test_names_read_from_a_line_as_written() -> None:
    line = "$busybox {counts}/sub -o out -p n={n} -p price=$$5 {{literal}} -- sh"
    assert names_read(line) == ["busybox", "counts", "n"]
    assert names_read('$img {data / "x"}') == ["img", "data"]


def test_cid_of_bound_values() -> None:
    assert cid_of(IpfsRef(CID_A)) == CID_A
    assert cid_of(f"/ipfs/{CID_A}/sub") == f"/ipfs/{CID_A}/sub"
    assert cid_of("not a cid") is None and cid_of(3) is None
    # The runs of --each stand for their composed output directory.
    assert cid_of(EntryResults(IpfsRef(CID_A))) == CID_A


def test_a_rebound_variable_makes_its_readers_stale() -> None:
    ledger = StaleLedger()
    namespace: dict[str, object] = {"img": CID_A, "counts": CID_A, "n": 3}
    upstream = ledger.add("$img -o counts", "echo a", namespace, binds="counts")
    reader = ledger.add("$img $counts -o report", "cat", namespace, binds="report")
    assert reader.reads == {"img": CID_A, "counts": CID_A}  # n is no CID
    heard: list[str | None] = []
    reader.listeners.append(heard.append)
    assert ledger.refresh(namespace) == [] and not ledger.stale_runs()

    namespace["counts"] = CID_B  # the upstream cell ran again with another script
    upstream_again = ledger.add("$img -o counts", "echo b", namespace, binds="counts")
    assert upstream.superseded and not upstream_again.superseded  # the same -o NAME
    assert ledger.refresh(namespace) == [reader]
    assert heard == ["stale: $counts changed"] and reader.changed == {"counts": CID_B}
    assert ledger.stale_runs() == [reader]

    # Re-run: the same source supersedes it; the new run is current.
    again = ledger.add("$img $counts -o report", "cat", namespace, binds="report")
    assert reader.superseded and again.reads["counts"] == CID_B
    assert ledger.stale_runs() == []
    namespace["counts"] = CID_A  # bound back: no longer stale
    ledger.refresh(namespace)
    assert heard[-1] is None


def test_a_cell_that_rebinds_what_it_reads_is_not_its_own_reader() -> None:
    ledger = StaleLedger()
    run = ledger.add("$img $acc -o acc", "x", {"img": CID_A, "acc": CID_A}, binds="acc")
    assert run.reads == {"img": CID_A}


def test_cells_with_ids_supersede_by_id() -> None:
    ledger = StaleLedger()
    first = ledger.add("$a", "x", {"a": CID_A}, cell_id="c1")
    other = ledger.add("$a", "x", {"a": CID_A}, cell_id="c2")
    assert not first.superseded
    ledger.add("$a", "y", {"a": CID_A}, cell_id="c1")
    assert first.superseded and not other.superseded


# -- the live status line ----------------------------------------------------------------------


def test_status_line_texts() -> None:
    staging = live_bundle(12.34, f"rootfs {CID_A}", 45 * 2**20, 120 * 2**20)
    assert staging["text/plain"] == (
        "running · 12.3 s · staging rootfs bafybeigdyrzt…: 45.0 MiB of 120.0 MiB (38%)"
    )
    assert "<progress" in staging["text/html"]
    assert live_bundle(1, PHASE_RUNNING, 0, None)["text/plain"] == (
        "running · 1.0 s · payload running"
    )
    assert live_bundle(2, PHASE_ADDING_OUTPUT, 3000, 5000)["text/plain"] == (
        "running · 2.0 s · adding output: 3,000 of 5,000 files"
    )


def test_a_run_reports_its_phases_to_on_progress(ip: InteractiveShell, busybox_cid: str) -> None:
    import ipfs_execute_magic as ie

    heard: list[tuple[str, int, int | None]] = []
    ie.run(
        busybox_cid,
        None,
        "sh",
        "-c",
        f"# {secrets.token_hex(4)}\n"
        "i=0; while [ $i -lt 3000 ]; do : > /output/f$i; i=$((i + 1)); done",
        on_progress=lambda what, done, total: heard.append((what, done, total)),
    )
    phases = [what for what, _, _ in heard]
    assert phases.count(PHASE_RUNNING) == 1 and heard[phases.index(PHASE_RUNNING)][1:] == (0, None)
    assert phases.index(PHASE_RUNNING) < phases.index(PHASE_ADDING_OUTPUT)
    assert set(phases[phases.index(PHASE_RUNNING) + 1 :]) == {PHASE_ADDING_OUTPUT}
    assert heard[-1] == (PHASE_ADDING_OUTPUT, 3000, 3000)  # the add's last word: all sent


def test_status_line_is_silent_for_a_quick_run() -> None:
    with capture_output() as captured:
        status = LiveStatus(delay=0.5, interval=0.1)
        status(PHASE_RUNNING, 0, None)
        status.finish()
    assert captured.outputs == [] and not status.shown


def test_status_line_ticks_while_the_payload_prints_nothing(ip: InteractiveShell) -> None:
    with capture_output() as captured:
        ok(ip, "%%ipfs_execute $busybox --no-cache\nsleep 2; echo done > /output/done")
    lines = [
        out for out in captured.outputs if out.data.get("text/plain", "").startswith("running · ")
    ]
    # Updated about every 0.5 s under one display id, the phase named, then a static line.
    assert len(lines) >= 3, [out.data["text/plain"] for out in captured.outputs]
    assert any("payload running" in out.data["text/plain"] for out in lines)
    assert all(out.update for out in lines[1:])
    seconds = [float(out.data["text/plain"].split(" · ")[1].removesuffix(" s")) for out in lines]
    assert seconds == sorted(seconds) and seconds[-1] - seconds[0] >= 1.0
    last = captured.outputs[-1]
    assert last.update and last.data["text/plain"].startswith("finished after ")
    assert set(last.data) == {"text/plain", "text/html"}  # nothing of it left to update


def test_a_quick_cell_shows_no_status_line(ip: InteractiveShell) -> None:
    ok(ip, "%%ipfs_execute $busybox\necho quick > /output/q")  # recorded: a hit below
    start = time.monotonic()
    with capture_output() as captured:
        ok(ip, "%%ipfs_execute $busybox\necho quick > /output/q")
    assert time.monotonic() - start < magics.PROGRESS_DELAY
    assert captured.outputs == []


# -- stale results in a shell ------------------------------------------------------------------


def test_rebinding_an_upstream_result_marks_its_reader_stale_and_rerun_stale_runs_it(
    ip: InteractiveShell,
) -> None:
    tag = secrets.token_hex(4)
    ok(ip, f"%%ipfs_execute $busybox -o up_{tag}\necho 1 > /output/n")
    reader_source = f"%%ipfs_execute $busybox $up_{tag} -o down_{tag}\ncat /input/n > /output/copy"
    down = ok(ip, reader_source)
    assert isinstance(down, RunResult)
    bundle, metadata = ip.display_formatter.format(down)
    assert "stale" not in bundle["text/plain"]
    up = ip.user_ns[f"up_{tag}"]
    assert metadata["ipfs_execute"]["reads"] == {
        "busybox": ip.user_ns["busybox"],
        f"up_{tag}": up.output,
    }
    assert metadata["ipfs_execute"]["binds"] == f"down_{tag}"
    ledger = ip.magics_manager.registry["IpfsExecuteMagics"].ledger
    browser = ledger.find(down).listeners[-1].__self__  # the live widget just displayed
    assert "stale" not in browser.header.value

    # The upstream cell runs again with another script: a new CID in the same variable.
    ok(ip, f"%%ipfs_execute $busybox -o up_{tag}\necho 2 > /output/n")
    marker = f"stale: $up_{tag} changed"
    assert marker in browser.header.value  # the live header changed without a re-display
    bundle, _ = ip.display_formatter.format(down)
    assert marker in bundle["text/plain"] and marker in bundle["text/html"]

    with capture_output() as captured:
        ok(ip, "%ipfs_rerun_stale")
    printed = captured.stdout
    assert f"({marker}): %%ipfs_execute $busybox $up_{tag} -o down_{tag}" in printed
    assert "re-ran 1 stale cell" in printed
    again = ip.user_ns[f"down_{tag}"]
    assert again is not down and again.read_text("copy") == "2\n"
    shown = [out for out in captured.outputs if "RunResult" in out.data.get("text/plain", "")]
    assert len(shown) == 1 and "stale" not in shown[0].data["text/plain"]
    with capture_output() as captured:
        ok(ip, "%ipfs_rerun_stale")
    assert captured.stdout.strip() == "no stale cells"


def test_each_cells_are_tracked_like_other_cells(ip: InteractiveShell, tmp_path: Path) -> None:
    """An --each cell is stale when its input is rebound, so is a cell that reads its
    result, and %ipfs_rerun_stale runs both again, in order."""
    import ipfs_execute_magic as ie

    tag = secrets.token_hex(4)

    def dataset(name: str, values: dict[str, str]) -> str:
        root = tmp_path / name
        root.mkdir()
        for entry, value in values.items():
            (root / entry).mkdir()
            (root / entry / "n").write_text(value)
        return str(ie.add(root))

    ip.user_ns[f"ds_{tag}"] = dataset("one", {"a": "1\n", "b": "2\n"})
    each_source = (
        f"%%ipfs_execute $busybox $ds_{tag} --each -o per_{tag}\n"
        "for d in /input/*; do cat $d/n > /output/n; done\n"
    )
    each = ok(ip, each_source)
    assert isinstance(each, EntryResults)
    reader_source = (
        f"%%ipfs_execute $busybox $per_{tag} -o sum_{tag}\ncat /input/a/n /input/b/n > /output/all"
    )
    reader = ok(ip, reader_source)
    assert isinstance(reader, RunResult) and reader.read_text("all") == "1\n2\n"
    ledger = ip.magics_manager.registry["IpfsExecuteMagics"].ledger
    each_run, reader_run = ledger.find(each), ledger.find(reader)
    assert each_run is not None and reader_run is not None
    assert each_run.reads[f"ds_{tag}"] == ip.user_ns[f"ds_{tag}"]
    assert each_run.binds == f"per_{tag}" and reader_run.reads[f"per_{tag}"] == str(each.output)
    assert not each_run.stale and not reader_run.stale

    # The data set moves on: the --each cell is stale, and says so in its display.
    moved_on = dataset("two", {"a": "1\n", "b": "3\n"})
    ok(ip, f"ds_{tag} = {moved_on!r}")
    marker = f"stale: $ds_{tag} changed"
    assert each_run.stale_text() == marker and not reader_run.stale
    bundle, _ = ip.display_formatter.format(each)
    assert marker in bundle["text/plain"] and marker in bundle["text/html"]

    with capture_output() as captured:
        ok(ip, "%ipfs_rerun_stale")
    printed = captured.stdout
    # The --each cell first (one entry changed: one run), then the reader of its result.
    assert f"({marker}): %%ipfs_execute $busybox $ds_{tag} --each -o per_{tag}" in printed
    assert f"(stale: $per_{tag} changed): %%ipfs_execute $busybox $per_{tag}" in printed
    assert printed.index(f"--each -o per_{tag}") < printed.index(f"$per_{tag} -o sum_{tag}")
    assert "re-ran 2 stale cells" in printed
    again = ip.user_ns[f"per_{tag}"]
    assert isinstance(again, EntryResults) and again is not each and again.executed == ["b"]
    assert ip.user_ns[f"sum_{tag}"].read_text("all") == "1\n3\n"
    with capture_output() as captured:
        ok(ip, "%ipfs_rerun_stale")
    assert captured.stdout.strip() == "no stale cells"


# -- a saved notebook --------------------------------------------------------------------------


def test_verify_reports_a_stale_cell_of_a_saved_notebook(
    home: Path, store: object, busybox_cid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.delenv("IPFS_EXECUTE_API", raising=False)
    monkeypatch.setenv("IPFS_EXECUTE_HOME", str(home))
    tag = secrets.token_hex(4)
    sources = [
        "%load_ext ipfs_execute_magic",
        f"busybox = {busybox_cid!r}",
        f"%%ipfs_execute $busybox -o counts\necho {tag} 1 > /output/n",
        "%%ipfs_execute $busybox $counts -o report\ncat /input/n > /output/copy",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    client = NotebookClient(nb, timeout=120, kernel_name="python3")
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
        # The user edits the upstream cell and runs it again, and only it.
        nb.cells[2].source = f"%%ipfs_execute $busybox -o counts\necho {tag} 2 > /output/n"
        client.execute_cell(nb.cells[2], 2)
    path = world_traversable_tmpdir("iex-nb-stale-") / "stale.ipynb"
    nbformat.write(nb, path)

    (upstream,) = [o for o in nb.cells[2].outputs if o.output_type == "execute_result"]
    (reader,) = [o for o in nb.cells[3].outputs if o.output_type == "execute_result"]
    read = reader.metadata["ipfs_execute"]["reads"]["counts"]
    bound = upstream.metadata["ipfs_execute"]["output"]
    assert upstream.metadata["ipfs_execute"]["binds"] == "counts" and read != bound
    (stale,) = stale_cells(path)
    assert (stale.cell, stale.variable, stale.read, stale.bound, stale.bound_by) == (
        3,
        "counts",
        read,
        bound,
        2,
    )
    checked = subprocess.run(
        [str(BIN / "ipfs-execute"), "verify", str(path)],
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr  # both runs reproduce
    assert (
        f"cell 3 (In [4]): stale: $counts changed (it read {read}; cell 2 binds it to "
        f"{bound} now): run it again"
    ) in checked.stdout
    assert checked.stdout.count("stale") == 1


def test_notebook_verdict_views_name_stale_cells() -> None:
    from ipfs_execute_magic.jupyter.provenance import NotebookVerdictView

    stale = StaleCell(3, 4, "counts", CID_A, CID_B, 2)
    verdict = NotebookVerdict("a.ipynb", (), (stale,))
    line = (
        f"cell 3 (In [4]): stale: $counts changed (it read {CID_A}; cell 2 binds it to "
        f"{CID_B} now): run it again"
    )
    assert verdict.describe() == line
    view = NotebookVerdictView(verdict, "http://127.0.0.1:8080")
    assert view.to_plain().endswith(line) and "stale: $counts changed" in view.to_html()
