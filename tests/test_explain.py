"""Why two runs differ: `ipfs-execute explain`, `%ipfs_explain` and the line a cell prints
when it misses the cache. Real runs on the session's node."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from helpers import ipfs_execute
from IPython.core.interactiveshell import InteractiveShell

import ipfs_execute_magic as ie
from ipfs_execute_magic.explanation import Explanation
from ipfs_execute_magic.record import RunRequest
from ipfs_execute_magic.runner import Runner
from ipfs_execute_magic.settings import Settings

SCRIPT = "wc -c < /input/words.txt > /output/n; echo {word} > /output/word\n"


def _words(runner: Runner, text: bytes) -> str:
    return runner.results.compose({"words.txt": runner.store.add_bytes(text, name="words.txt")})


def test_cli_explains_input_file_script_and_parameter(home: Path, store, busybox_cid: str) -> None:
    token = secrets.token_hex(4)
    with Runner(Settings(home=home)) as runner:
        first = runner.run(
            RunRequest(
                busybox_cid,
                _words(runner, f"{token}\n".encode()),
                script=SCRIPT.format(word="one"),
                params=(("n", "1"),),
            )
        )
        second = runner.run(
            RunRequest(
                busybox_cid,
                _words(runner, f"{token} and more\n".encode()),
                script=SCRIPT.format(word="two"),
                params=(("n", "2"),),
            )
        )
    proc = ipfs_execute(home, "explain", first.record_cid or "", str(second))  # record, output
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"A: record {first.record_cid}" in lines and f"B: record {second.record_cid}" in lines
    assert "input: input file words.txt changed (9 -> 18 bytes)" in lines
    assert "script: the script changed (+1 -1 lines)" in lines
    assert "  -wc -c < /input/words.txt > /output/n; echo one > /output/word" in lines
    assert "  +wc -c < /input/words.txt > /output/n; echo two > /output/word" in lines
    assert "parameters: parameter n changed (1 -> 2)" in lines
    assert not any(line.startswith(("rootfs:", "arguments:", "sandbox:")) for line in lines)
    assert f"output: {first} -> {second}" in lines
    assert "  ~ n (2 -> 3 bytes)" in lines and "  ~ word (4 -> 4 bytes)" in lines
    # Runs as an executed notebook's cells show them (cell numbers as `verify` gives them).
    notebook = home / f"explained-{token}.ipynb"
    cells = [
        {"cell_type": "code", "outputs": [{"metadata": {"ipfs_execute": {"record": cid}}}]}
        for cid in (first.record_cid, second.record_cid)
    ]
    notebook.write_text(json.dumps({"cells": cells}))
    by_cell = ipfs_execute(home, "explain", f"{notebook}:0", f"{notebook}:1")
    assert by_cell.stdout == proc.stdout
    missing = ipfs_execute(home, "explain", f"{notebook}:0", f"{notebook}:7")
    assert missing.returncode == 2 and "cell 7 shows no recorded run" in missing.stderr
    same = ipfs_execute(home, "explain", str(first), str(first))
    assert "the same computation: cache key" in same.stdout and "output: the same" in same.stdout


def test_a_cell_that_misses_says_why_and_explain_shows_the_whole_comparison(
    ip: InteractiveShell, capsys
) -> None:
    token = secrets.token_hex(4)
    runner = ie.default_runner()
    ip.user_ns["words"] = _words(runner, f"{token}\n".encode())
    cell = "%%ipfs_execute $busybox $words -o counted\n" + SCRIPT.format(word="w")
    capsys.readouterr()
    assert ip.run_cell(cell).success
    assert "ran:" not in capsys.readouterr().out  # no earlier run of this cell
    ip.user_ns["words"] = _words(runner, f"{token} changed\n".encode())
    assert ip.run_cell(cell).success
    out = capsys.readouterr().out
    assert "ran: input file words.txt changed (9 -> 17 bytes) since this cell's last run\n" in out
    assert out.count("ran:") == 1
    explanation = ip.run_line_magic("ipfs_explain", "counted")
    assert isinstance(explanation, Explanation)
    assert explanation.reason() == "input file words.txt changed (9 -> 17 bytes)"
    data, metadata = ip.display_formatter.format(explanation)
    assert "input file words.txt changed" in data["text/plain"]
    assert "~ n (2 -> 3 bytes)" in data["text/plain"]
    html = data["text/html"]
    assert "why these runs differ: input file words.txt changed" in html
    assert "~ n (2 -&gt; 3 bytes)" in html
    assert "'record'" not in repr(metadata)  # a view: `verify NOTEBOOK` skips it
    assert ip.run_cell(cell).success  # a hit: nothing to explain
    assert "ran:" not in capsys.readouterr().out
    again = ip.run_line_magic("ipfs_explain", "counted")  # against the run before the hit
    assert again.same_computation and "output: the same" in again.describe()
    # Two runs given: A B.
    ip.user_ns["other"] = ip.user_ns["counted"]
    both = ip.run_line_magic("ipfs_explain", f"{explanation.a_cid} other")
    assert both.reason() == explanation.reason()
    api = ie.explain(explanation.a_cid, ip.user_ns["counted"])  # the Python API: the same
    assert api.describe() == both.describe()


def test_input_files_are_compared_level_by_level_as_diff_trees_would(store) -> None:
    from ipfs_execute_magic.explanation import _tree_diffs
    from ipfs_execute_magic.verification import diff_trees

    token = secrets.token_hex(4).encode()

    def tree(deep: bytes, extra: bool) -> str:
        entries = {
            "same/a.txt": store.add_bytes(token + b"a"),
            "deep/er/file.txt": store.add_bytes(token + deep),
            "top.txt": store.add_bytes(token),
        }
        if extra:
            entries["new/dir/x.txt"] = store.add_bytes(token + b"x")
        return store.compose(entries)

    old, new = tree(b"1", False), tree(b"22", True)
    pruned = _tree_diffs(store, old, new)
    assert pruned == diff_trees(store, old, new)
    assert [diff.describe() for diff in pruned or []] == [
        f"~ deep/er/file.txt ({len(token) + 1} -> {len(token) + 2} bytes)",
        "+ new (0 bytes)",
        "+ new/dir (0 bytes)",
        f"+ new/dir/x.txt ({len(token) + 1} bytes)",
    ]
