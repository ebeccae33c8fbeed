"""One run per entry of an input directory without a cluster: `ie.map_entries` and
`%%ipfs_execute ... --each`, in parallel on this machine, each entry cached on its own."""

from __future__ import annotations

from pathlib import Path

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import ipfs_execute_magic as ie
from ipfs_execute_magic.per_entry import EntryResults

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
