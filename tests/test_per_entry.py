"""One run per entry of an input directory without a cluster: `ie.map_entries` and
`%%ipfs_execute ... --each`, in parallel on this machine, each entry cached on its own."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import ipfs_execute_magic as ie
from ipfs_execute_magic.jupyter import magics
from ipfs_execute_magic.jupyter.display import (
    MAX_RUNNING_SHOWN,
    entries_bundle,
    entries_status_text,
)
from ipfs_execute_magic.per_entry import EntriesProgress, EntriesSnapshot, EntryResults

SCRIPT = "for f in /input/*; do wc -l < $f > /output/lines; basename $f > /output/name; done\n"


def _dataset(root: Path, files: dict[str, str]) -> str:
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    return str(ie.add(root))


def test_each_runs_once_per_entry_and_reruns_only_the_changed_one(
    ip: InteractiveShell, tmp_path: Path, capsys
) -> None:
    files = {f"f{i:02d}": f"{i}\n" * (i + 1) for i in range(20)}
    ip.user_ns["ds"] = _dataset(tmp_path / "a", files)
    ip.run_cell_magic("ipfs_execute", "$busybox $ds --each -o per_file", SCRIPT)
    first = ip.user_ns["per_file"]
    assert isinstance(first, EntryResults) and first.ok
    assert sorted(first.executed) == sorted(files)
    # One entry NAME per input entry, holding that entry's /output.
    assert sorted(e.name for e in first.output.ls()) == sorted(files)
    assert first.output.read_text("f03/name") == "f03\n"
    assert first.output.read_text("f03/lines").strip() == "4"
    printed = capsys.readouterr().out
    assert printed.count("✓ ran") == 20

    files["f11"] = "changed\n"
    ip.user_ns["ds"] = _dataset(tmp_path / "b", files)
    ip.run_cell_magic("ipfs_execute", "$busybox $ds --each -o per_file", SCRIPT)
    second = ip.user_ns["per_file"]
    assert second.executed == ["f11"]  # one sandbox ran, 19 results came from the cache
    assert second.output.read_text("f11/lines").strip() == "1"
    assert capsys.readouterr().out.count("✓ cached") == 19
    # The composed output is a directory lineage can see through.
    assert ie.default_runner().results.composition(str(second.output)) is not None


def test_a_failed_entry_is_named_and_the_others_are_bound(
    ip: InteractiveShell, tmp_path: Path
) -> None:
    ip.user_ns["ds"] = _dataset(tmp_path / "d", {"ok1": "1\n", "boom": "2\n", "ok2": "3\n"})
    cell = "if [ -e /input/boom ]; then echo no good >&2; exit 4; fi; cp /input/* /output/\n"
    result = ip.run_cell(f"%%ipfs_execute $busybox $ds --each -o parts\n{cell}")
    error = result.error_in_exec
    assert type(error) is UsageError
    assert "1 of 3 entries failed: boom; the others' outputs are bound to parts" in str(error)
    parts = ip.user_ns["parts"]
    assert parts.failed == {"boom": "exit status 4: no good"}
    assert sorted(e.name for e in parts.output.ls()) == ["ok1", "ok2"]
    assert parts.output.read_text("ok2/ok2") == "3\n"
    # Shown as the composed output's link and one row per entry, the failed one first.
    shown = ip.display_formatter.format(parts)[0]
    page = shown["text/html"]
    assert "<b>3 entries</b>: 3 ran, 0 from the cache, 1 failed" in page
    assert page.index("boom") < page.index("ok1") and "✗ exit status 4: no good" in page
    assert str(parts.output) in page and "failed: boom" in shown["text/plain"]


def test_map_entries_needs_a_directory(ip: InteractiveShell, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    single = str(ie.add(tmp_path / "file"))
    error = ip.run_cell(f"%%ipfs_execute $busybox {single} --each\ntrue\n").error_in_exec
    assert type(error) is UsageError and "is not a directory" in str(error)


def test_entries_status_texts() -> None:
    running = (("a.csv", "tcp://10.0.0.5:40123"), ("b.csv", "tcp://10.0.0.6:40777"))
    snapshot = EntriesSnapshot(20, 12, 9, 3, 0, running, 6)
    assert entries_status_text(snapshot) == (
        "12 of 20 entries done (9 cached, 3 ran) · running: a.csv on tcp://10.0.0.5:40123, "
        "b.csv on tcp://10.0.0.6:40777 · 6 queued"
    )
    bundle = entries_bundle(4.25, snapshot)
    assert bundle["text/plain"].endswith(" · 6 queued · 4.2 s")
    assert '<progress value="12" max="20">' in bundle["text/html"]
    many = tuple((f"f{i}", None) for i in range(10))
    assert entries_status_text(EntriesSnapshot(12, 2, 0, 2, 1, many, 0)) == (
        "2 of 12 entries done (0 cached, 2 ran, 1 failed) · running: "
        + ", ".join(f"f{i}" for i in range(8))
        + " and 2 more"
    )


def test_each_without_a_cluster_shows_which_entries_run_while_pending(
    ip: InteractiveShell, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the thread pool of this process (one run a core): the entries running are named,
    the others counted as queued, then the final count replaces the line."""
    monkeypatch.setattr(magics, "PROGRESS_DELAY", 0.0)
    threads = os.cpu_count() or 1
    names = [f"f{i}" for i in range(threads + 1)]
    ip.user_ns["ds"] = _dataset(tmp_path / "p", {name: f"{time.time_ns()}\n" for name in names})
    with capture_output() as captured:
        ip.run_cell_magic(
            "ipfs_execute", "$busybox $ds --each -o slow", "sleep 1; cp /input/* /output/\n"
        )
    assert ip.user_ns["slow"].ok
    texts = [out.data.get("text/plain", "") for out in captured.outputs]
    shown = min(threads, MAX_RUNNING_SHOWN)  # the line names so many, then counts the rest
    more = f" and {threads - shown} more" if threads > shown else ""
    running = re.compile(
        rf"^0 of {len(names)} entries done \(0 cached, 0 ran\) · running: "
        rf"f\d+(, f\d+){{{shown - 1}}}{more} · 1 queued · [\d.]+ s$"
    )
    assert any(running.match(text) for text in texts), texts
    assert not any(" on " in text for text in texts if "running:" in text)
    finished = f" · {len(names)} of {len(names)} entries (0 cached, {len(names)} ran)"
    assert texts[-1].startswith("finished after ") and texts[-1].endswith(finished)


def test_entries_progress_counts_what_ended(ip: InteractiveShell, tmp_path: Path) -> None:
    progress = EntriesProgress()
    data = _dataset(tmp_path / "c", {"x": "1\n", "y": "2\n"})
    script = "cp /input/* /output/\n"
    ie.map_entries(ip.user_ns["busybox"], data, script=script)
    ie.map_entries(ip.user_ns["busybox"], data, script=script + "exit 0\n", progress=progress)
    snapshot = progress.snapshot()
    assert (snapshot.total, snapshot.done, snapshot.cached, snapshot.ran) == (2, 2, 0, 2)
    assert snapshot.running == () and snapshot.waiting == 0
    again = EntriesProgress()
    ie.map_entries(ip.user_ns["busybox"], data, script=script, progress=again)
    assert again.snapshot().cached == 2
