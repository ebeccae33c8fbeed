"""`%ipfs_verify`, `%ipfs_lineage` and the run metadata saved with results, in-process (a real
IPython InteractiveShell, the real node, real bwrap), plus one executed notebook checked by
`ipfs-execute verify`.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path

import nbformat
import pytest
from helpers import BIN, cli_env, execute_notebook, world_traversable_tmpdir
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import ipfs_execute_magic as ie
from ipfs_execute_magic.jupyter.magics import INTERRUPTED_LINE, IpfsExecuteMagics
from ipfs_execute_magic.lineage_graph import LineageNode
from ipfs_execute_magic.result import IpfsRef, RunResult
from ipfs_execute_magic.verification import NotebookVerdict, Verdict, records_in_notebook

RANDOM_OUTPUT = (
    "echo fixed > /output/same; head -c 16 /dev/urandom > /output/rand; "
    "touch /output/extra-$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \\n')"
)


@pytest.fixture(scope="module")
def gateway(ip: InteractiveShell) -> str:
    magics = ip.magics_manager.registry["IpfsExecuteMagics"]
    return magics.gateway_for(ie.default_runner().store)


def ok(ip: InteractiveShell, source: str):
    with capture_output():
        result = ip.run_cell(source)
    assert result.error_in_exec is None, result.error_in_exec
    return result.result


def error_of(ip: InteractiveShell, source: str) -> BaseException:
    with capture_output():
        result = ip.run_cell(source)
    assert result.error_in_exec is not None, f"no error from {source!r}"
    return result.error_in_exec


def shown(ip: InteractiveShell, value: object) -> tuple[dict, dict]:
    return ip.display_formatter.format(value)


def token() -> str:
    return secrets.token_hex(6)  # a script never run before: no cache hit


@pytest.fixture(scope="module")
def stable(ip: InteractiveShell) -> RunResult:
    return ok(
        ip, f"%%ipfs_execute $busybox -o stable\nmkdir /output/d; echo same-{token()} > /output/d/f"
    )


@pytest.fixture(scope="module")
def noisy(ip: InteractiveShell) -> RunResult:
    return ok(ip, f"%%ipfs_execute $busybox -o noisy\n# {token()}\n{RANDOM_OUTPUT}")


@pytest.fixture(scope="module")
def unrun(ip: InteractiveShell, store) -> str:
    """Content no run produced (an empty directory may well be some run's output)."""
    cid = store.add_bytes(f"plain data {token()}".encode())
    ip.user_ns["unrun"] = cid
    return cid


@pytest.fixture(scope="module")
def chain(ip: InteractiveShell) -> tuple[IpfsRef, RunResult, RunResult]:
    folder = world_traversable_tmpdir("iex-lineage-magic-")
    (folder / "words.txt").write_text(f"pear\napple\npear\n{token()}\n")
    data = ok(ip, f"%ipfs_add {folder} -o words")
    first = ok(
        ip,
        "%%ipfs_execute $busybox $words -o counted\n"
        "sort /input/words.txt | uniq -c > /output/counts.txt",
    )
    second = ok(
        ip,
        "%%ipfs_execute $busybox $counted -o top\n"
        "sort -rn /input/counts.txt | head -n 1 > /output/top.txt",
    )
    return data, first, second


# -- help and bad input --------------------------------------------------------------------


def test_help_is_complete(ip: InteractiveShell) -> None:
    verify_doc = IpfsExecuteMagics.ipfs_verify.__doc__
    for fragment in (
        "%ipfs_verify [-o NAME] [--runs N] NAME_OR_RECORD",
        "%ipfs_verify [-o NAME] [--runs N] --notebook PATH.ipynb",
        "%%ipfs_execute -o NAME",
        "record CID",
        "output CID",
        "--runs N",
        "another staging location",
        "shuffled",
        "--out NAME",
        "Verdict",
        "added, removed, changed",
        "ipfs-execute verify",
    ):
        assert fragment in verify_doc, fragment
    lineage_doc = IpfsExecuteMagics.ipfs_lineage.__doc__
    for fragment in (
        "%ipfs_lineage [-o NAME] NAME_OR_CID",
        "rootfs, input and",
        "script",
        "record CID",
        "LineageNode",
        "--out NAME",
        "ipfs-execute lineage",
    ):
        assert fragment in lineage_doc, fragment
    # What `%ipfs_verify?` shows is this docstring.
    assert ip.object_inspect("%ipfs_verify")["docstring"] == verify_doc.strip()
    assert ip.object_inspect("%ipfs_lineage")["docstring"] == lineage_doc.strip()


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("%ipfs_verify", "either NAME_OR_RECORD or --notebook"),
        ("%ipfs_verify stable --notebook x.ipynb", "either NAME_OR_RECORD or --notebook"),
        ("%ipfs_verify stable --runs 0", "positive"),
        ("%ipfs_verify stable --runs many", "positive"),
        ("%ipfs_verify stable -o 2bad", "variable name"),
        ("%ipfs_verify stable --bogus", "unrecognized"),
        ("%ipfs_verify no_such_name", "no variable 'no_such_name'"),
        ("%ipfs_verify not-a-cid", "not a CID"),
        ("%ipfs_verify $no_such_variable", "is the variable defined"),
        ("%ipfs_verify unrun", "neither a run record nor the output"),
        ("%ipfs_verify ten", "ten is int '10', not a run result"),
        ("%ipfs_verify --notebook /no/such/notebook.ipynb", "not a readable notebook"),
        ("%ipfs_lineage", "NAME_OR_CID"),
        ("%ipfs_lineage no_such_name", "no variable 'no_such_name'"),
        ("%ipfs_lineage /ipfs/$busybox/../x", "'..'"),
        ("%ipfs_lineage stable -o class", "variable name"),
    ],
)
def test_bad_input_is_a_one_line_usage_error(
    ip: InteractiveShell, stable: RunResult, unrun: str, line: str, fragment: str
) -> None:
    ip.user_ns["ten"] = 10
    error = error_of(ip, line)
    assert type(error) is UsageError, error  # exactly: IPython prints one line for this type
    assert fragment in str(error) and "\n" not in str(error)


def test_a_notebook_without_runs_is_a_usage_error(ip: InteractiveShell) -> None:
    path = world_traversable_tmpdir("iex-nb-empty-") / "empty.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")]), path)
    error = error_of(ip, f"%ipfs_verify --notebook {path}")
    assert type(error) is UsageError and "no recorded runs" in str(error)


# -- %ipfs_verify ----------------------------------------------------------------------------


def test_verify_a_deterministic_run(ip: InteractiveShell, stable: RunResult, gateway: str) -> None:
    verdict = ok(ip, "%ipfs_verify stable -o checked")
    assert isinstance(verdict, Verdict) and verdict is ip.user_ns["checked"]
    assert verdict.reproducible and verdict.record_cid == stable.record_cid
    assert [rerun.condition for rerun in verdict.reruns] == ["same staging"]
    data, metadata = shown(ip, verdict)
    plain, html = data["text/plain"], data["text/html"]
    assert plain.startswith("Verdict ✓ reproducible: 1 re-run without the cache")
    assert "re-run 1, same staging: same output" in plain
    assert f"record   ipfs://{stable.record_cid}" in plain
    assert "✓ reproducible" in html and "same staging" in html and "✓ same output" in html
    assert f'href="{gateway}/ipfs/{stable.record_cid}"' in html
    assert f'href="{gateway}/ipfs/{stable.output}"' in html
    assert 'href="ipfs://' not in html
    # Not a run of its own: `ipfs-execute verify NOTEBOOK` must not pick up its record.
    assert metadata == {
        "ipfs_execute": {"view": "verdict", "verified": stable.record_cid, "reproducible": True}
    }
    # The same run named by its record CID, or by its output CID ($stable expands to it):
    # the re-runs above left the index naming the run that was checked.
    assert ok(ip, "%ipfs_verify {stable.record_cid}").record_cid == stable.record_cid
    assert ok(ip, "%ipfs_verify $stable").record_cid == stable.record_cid


def test_verify_a_run_writing_random_bytes(
    ip: InteractiveShell, noisy: RunResult, gateway: str
) -> None:
    verdict = ok(ip, "%ipfs_verify noisy")
    assert not verdict.reproducible
    (rerun,) = verdict.reruns
    assert sorted((diff.change, diff.path.split("-")[0]) for diff in rerun.diffs) == [
        ("added", "extra"),
        ("changed", "rand"),
        ("removed", "extra"),
    ]
    data, _ = shown(ip, verdict)
    plain, html = data["text/plain"], data["text/html"]
    assert plain.startswith("Verdict ✗ NOT reproducible: 1 of 1 re-run gave another output")
    assert f"re-run 1, same staging: DIFFERENT output ipfs://{rerun.output}" in plain
    assert "    ~ rand (16 -> 16 bytes)" in plain
    assert re.search(r"\n    \+ extra-[0-9a-f]{8} \(0 bytes\)", plain)
    assert re.search(r"\n    - extra-[0-9a-f]{8} \(0 bytes\)", plain)
    assert "same (" not in plain  # the unchanged file is not listed
    # The HTML table has the same rows: change, path, both sizes.
    assert "✗ NOT reproducible" in html and "3 files differ" in html
    row = re.search(
        r"<tr><td[^>]*><code>~</code> changed</td><td[^>]*><code>rand</code></td>"
        r'<td[^>]*title="16 bytes">16 B</td><td[^>]*title="16 bytes">16 B</td></tr>',
        html,
    )
    assert row, html
    assert "<code>+</code> added" in html and "<code>−</code> removed" in html
    assert ">same<" not in html
    assert f'href="{gateway}/ipfs/{rerun.output}"' in html


def test_runs_three_shows_three_conditions(ip: InteractiveShell, stable: RunResult) -> None:
    with capture_output() as captured:
        result = ip.run_cell("%ipfs_verify stable --runs 3 -o thrice")
    assert result.error_in_exec is None, result.error_in_exec
    verdict = ip.user_ns["thrice"]
    conditions = ["same staging", "another staging location", "shuffled directory order"]
    assert [rerun.condition for rerun in verdict.reruns] == conditions
    assert verdict.reproducible
    data, _ = shown(ip, verdict)
    for number, condition in enumerate(conditions, 1):
        assert f"re-run {number}, {condition}: same output" in data["text/plain"]
        assert f">{condition}</td>" in data["text/html"]
    # Progress under one display id, ending in a static line (saved without any record).
    progress = [
        out for out in captured.outputs if out.metadata == {"ipfs_execute": {"view": "progress"}}
    ]
    assert progress and progress[-1].update
    assert re.fullmatch(r"re-ran 3 times in \d+\.\d s", progress[-1].data["text/plain"])


def test_verify_a_notebook_lists_each_cell(
    ip: InteractiveShell, stable: RunResult, noisy: RunResult, unrun: str
) -> None:
    cell = nbformat.v4.new_code_cell
    output = nbformat.v4.new_output
    verdict_text = shown(ip, ok(ip, "%ipfs_verify stable"))[0]["text/plain"]
    nb = nbformat.v4.new_notebook(
        cells=[
            cell(
                "stable",
                execution_count=1,
                outputs=[
                    output(
                        "execute_result",
                        data=shown(ip, stable)[0],
                        metadata=shown(ip, stable)[1],
                        execution_count=1,
                    )
                ],
            ),
            nbformat.v4.new_markdown_cell("text"),
            # A verdict mentions the records of other runs: they are not runs of its cell.
            cell(
                "%ipfs_verify noisy",
                execution_count=2,
                outputs=[
                    output(
                        "execute_result",
                        execution_count=2,
                        data={
                            "text/plain": verdict_text.replace(stable.record_cid, noisy.record_cid)
                        },
                        metadata={"ipfs_execute": {"view": "verdict"}},
                    )
                ],
            ),
            # An older notebook: the record only in the text.
            cell(
                "again",
                execution_count=3,
                outputs=[
                    output(
                        "display_data", data={"text/plain": f"record  ipfs://{stable.record_cid}"}
                    )
                ],
            ),
            # A "record" that is no record: reported in its cell, the others still verified.
            cell(
                "bogus",
                execution_count=4,
                outputs=[
                    output(
                        "display_data",
                        data={"text/plain": "x"},
                        metadata={"ipfs_execute": {"record": unrun}},
                    )
                ],
            ),
        ]
    )
    path = world_traversable_tmpdir("iex-nb-magic-") / "executed.ipynb"
    nbformat.write(nb, path)
    assert records_in_notebook(path) == [(0, stable.record_cid), (3, stable.record_cid), (4, unrun)]

    result = ok(ip, f"%ipfs_verify --notebook {path} -o checked_nb")
    assert isinstance(result, NotebookVerdict) and result is ip.user_ns["checked_nb"]
    assert [(c.cell, c.execution_count) for c in result] == [(0, 1), (3, 3), (4, 4)]
    assert result.cells[0].reproducible and result.cells[1].verdict is result.cells[0].verdict
    assert result.cells[2].verdict is None and "neither a run record" in result.cells[2].error
    assert not result.reproducible
    data, metadata = shown(ip, result)
    plain, html = data["text/plain"], data["text/html"]
    assert plain.splitlines()[0] == f"{path}: ✗ 1 of 3 recorded runs did not reproduce"
    assert f"cell 0 (In [1]): record ipfs://{stable.record_cid}: ✓ reproducible" in plain
    assert f"cell 3 (In [3]): record ipfs://{stable.record_cid}: ✓ reproducible" in plain
    assert f"cell 4 (In [4]): record ipfs://{unrun}: ✗ could not be verified" in plain
    assert "    re-run 1, same staging: same output" in plain
    assert noisy.record_cid not in plain
    assert "cell 0 (In [1])" in html and "✗ could not be verified" in html
    assert metadata["ipfs_execute"]["view"] == "notebook verdict"


def test_interrupting_a_verification_stops_its_sandbox(ip: InteractiveShell) -> None:
    marker = f"iex-verify-interrupt-{token()}"
    ok(ip, f"%%ipfs_execute $busybox -o sleeper\nsh -c 'sleep 2; true' {marker}")
    main = threading.main_thread().ident

    def interrupt_when_running() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not sandbox_processes(marker):
            time.sleep(0.05)
        signal.pthread_kill(main, signal.SIGINT)

    watcher = threading.Thread(target=interrupt_when_running)
    watcher.start()
    with capture_output() as captured:
        result = ip.run_cell("%ipfs_verify sleeper")
    watcher.join()
    assert type(result.error_in_exec) is KeyboardInterrupt
    assert result.error_in_exec._render_traceback_() == ["KeyboardInterrupt"]
    assert INTERRUPTED_LINE in captured.stderr and sandbox_processes(marker) == []
    assert captured.outputs[-1].data["text/plain"].startswith("interrupted in ")


def sandbox_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


# -- %ipfs_lineage ---------------------------------------------------------------------------


def test_lineage_of_a_two_step_chain(
    ip: InteractiveShell, chain, busybox_cid: str, gateway: str
) -> None:
    data, first, second = chain
    # Verifying a step re-runs it; the lineage still goes through the run that was checked.
    assert ok(ip, "%ipfs_verify counted").reproducible
    node = ok(ip, "%ipfs_lineage top -o graph")
    assert isinstance(node, LineageNode) and node is ip.user_ns["graph"]
    assert node.record_cid == second.record_cid
    ((_, input_node),) = [(role, n) for role, n in node.parents if role == "input"]
    assert input_node.record_cid == first.record_cid

    rendered, metadata = shown(ip, node)
    plain, html = rendered["text/plain"], rendered["text/html"]
    assert plain == node.to_text()
    lines = plain.splitlines()
    assert lines[0].startswith(f"/ipfs/{second.output}  <- run")
    assert f"exit 0: sh /input/.ipfs-execute/script  [record {second.record_cid}]" in lines[0]
    assert any(
        line == f"    input: /ipfs/{first.output}  <- run "
        f"{first.record.started_at[:19]}Z, exit 0: sh /input/.ipfs-execute/script  "
        f"[record {first.record_cid}]"
        for line in lines
    )
    assert f"        input: /ipfs/{data}  (data: no recorded run produced it)" in lines
    assert sum(f"rootfs: /ipfs/{busybox_cid}  (data" in line for line in lines) == 2
    assert sum("script: /ipfs/" in line for line in lines) == 2

    # HTML: both runs (command, time, status, record) and the data, CIDs as gateway links.
    assert "2 runs, back to" in html and html.count("<b>run</b>") == 2
    for cid in (
        second.output,
        first.output,
        data,
        busybox_cid,
        second.record_cid,
        first.record_cid,
        second.record.script,
        first.record.script,
    ):
        assert f'href="{gateway}/ipfs/{cid}"' in html, cid
    assert f">ipfs://{data}</a>" in html and "data: no recorded run produced it" in html
    assert "sh /input/.ipfs-execute/script" in html and "✓ exit 0" in html
    assert first.record.started_at[:19].replace("T", " ") + " UTC" in html
    for role in ("rootfs", "input", "script"):
        assert f">{role}</span>" in html
    assert 'href="ipfs://' not in html
    assert metadata == {"ipfs_execute": {"view": "lineage", "cid": second.output}}


def test_lineage_of_a_sub_path_and_of_plain_data(ip: InteractiveShell, chain, gateway: str) -> None:
    data, first, _ = chain
    node = ok(ip, "%ipfs_lineage {counted}/counts.txt")
    assert node.path == f"/ipfs/{first.output}/counts.txt" and node.record_cid == first.record_cid
    html = shown(ip, node)[0]["text/html"]
    assert f'href="{gateway}/ipfs/{first.output}/counts.txt"' in html
    assert f'href="{gateway}/ipfs/{node.cid}"' in html  # the file's own CID beside the path
    leaf = ok(ip, "%ipfs_lineage words")
    assert not leaf.is_run and leaf.cid == str(data)
    assert shown(ip, leaf)[0]["text/plain"] == f"/ipfs/{data}  (data: no recorded run produced it)"


# -- the run's metadata, in-process and in a saved notebook ----------------------------------


def test_every_result_display_names_its_run(ip: InteractiveShell, stable: RunResult) -> None:
    data, metadata = shown(ip, stable)
    assert metadata == {
        "ipfs_execute": {
            "record": stable.record_cid,
            "output": stable.output,
            "rootfs": stable.rootfs,
            "input": stable.input,
            # What the magic line read and bound: a saved notebook can tell stale cells.
            "reads": {"busybox": ip.user_ns["busybox"]},
            "binds": "stable",
        }
    }
    assert "text/html" in data  # the data itself is unchanged
    hit = ok(ip, "%%ipfs_execute $busybox\n" + stable.input.read_text(".ipfs-execute/script"))
    del metadata["ipfs_execute"]["binds"]  # no -o this time
    assert hit.cache_hit and shown(ip, hit)[1] == metadata  # a hit names the recorded run


def test_executed_notebook_keeps_the_records_for_verify(
    home: Path, store, busybox_cid: str, monkeypatch
) -> None:
    monkeypatch.delenv("IPFS_EXECUTE_API", raising=False)
    monkeypatch.setenv("IPFS_EXECUTE_HOME", str(home))
    folder = world_traversable_tmpdir("iex-nb-data-")
    (folder / "numbers.txt").write_text(f"3\n1\n2\n# {token()}\n")
    nb = execute_notebook(
        [
            "%load_ext ipfs_execute_magic",
            f"busybox = {busybox_cid!r}",
            f"%ipfs_add {folder} -o numbers",
            "%%ipfs_execute $busybox $numbers -o sorted_numbers\n"
            "grep -v '#' /input/numbers.txt | sort -n > /output/sorted.txt",
            "%%ipfs_execute $busybox $sorted_numbers -o total\n"
            "awk '{s += $1} END {print s}' /input/sorted.txt > /output/total.txt",
            "%ipfs_verify total",
            "%ipfs_lineage total",
        ]
    )
    path = world_traversable_tmpdir("iex-nb-saved-") / "executed.ipynb"
    nbformat.write(nb, path)
    saved = nbformat.read(path, as_version=4)
    nbformat.validate(saved)

    records = []
    for index in (3, 4):
        (result,) = [
            out for out in saved.cells[index].outputs if out.output_type == "execute_result"
        ]
        meta = result.metadata["ipfs_execute"]
        assert set(meta) == {"record", "output", "rootfs", "input", "reads", "binds"}, meta
        assert meta["reads"]["busybox"] == busybox_cid  # the variables the line read
        assert (
            meta["rootfs"] == busybox_cid
            and f"ipfs://{meta['output']}" in result.data["text/plain"]
        )
        records.append(meta["record"])
    assert (
        json.loads(store.cat(records[1]))["input_path"]
        == f"/ipfs/{saved.cells[3].outputs[-1].metadata['ipfs_execute']['output']}"
    )
    shown_views = {
        out.metadata["ipfs_execute"].get("view")
        for index in (5, 6)
        for out in saved.cells[index].outputs
        if out.output_type == "execute_result"
    }
    assert shown_views == {"verdict", "lineage"}
    assert "✓ reproducible" in saved.cells[5].outputs[-1].data["text/plain"]

    # Every run is found, and only the runs: not the records the verdict and lineage mention.
    assert records_in_notebook(path) == [(3, records[0]), (4, records[1])]
    checked = subprocess.run(
        [str(BIN / "ipfs-execute"), "verify", str(path)],
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"cell 3 (In [4]): record {records[0]}" in checked.stdout
    assert f"cell 4 (In [5]): record {records[1]}" in checked.stdout
    assert checked.stdout.count("verdict: reproducible") == 2
