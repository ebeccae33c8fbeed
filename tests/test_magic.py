"""The notebook magics in-process: a real IPython InteractiveShell, the real node, real bwrap.

Most payloads use the busybox image with `sh` (it has sort, awk, sleep ...).
"""

from __future__ import annotations

import base64
import re
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import world_traversable_tmpdir
from IPython.core.error import UsageError
from IPython.core.interactiveshell import ExecutionResult, InteractiveShell
from IPython.utils.capture import capture_output

import ipfs_execute_magic as ie
from ipfs_execute_magic.errors import IpfsExecuteError
from ipfs_execute_magic.errors import UsageError as CoreUsageError
from ipfs_execute_magic.jupyter import magics
from ipfs_execute_magic.jupyter.display import (
    HTML_PREVIEWS,
    LiveStatus,
    OutputBrowser,
    ResultView,
    human_size,
    inert_markdown,
    preview_html,
)
from ipfs_execute_magic.jupyter.magics import (
    INTERRUPTED_LINE,
    IpfsExecuteMagics,
    PayloadFailedError,
    split_payload_args,
)
from ipfs_execute_magic.links import Gateway
from ipfs_execute_magic.node import GATEWAY_PORT_NAME, stored_gateway_url
from ipfs_execute_magic.record import SCRIPT_DIR, RunRequest
from ipfs_execute_magic.result import IpfsRef, RunResult

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    path = world_traversable_tmpdir("iex-magic-data-")
    (path / "words.txt").write_text("pear\napple\npear\nfig\npear\n")
    return path


@pytest.fixture(scope="module")
def data(ip: InteractiveShell, data_dir: Path) -> IpfsRef:
    ok(ip, f"%ipfs_add {data_dir} -o data")
    return ip.user_ns["data"]


@pytest.fixture(scope="module")
def counts(ip: InteractiveShell, data: IpfsRef) -> RunResult:
    ok(
        ip,
        "%%ipfs_execute $busybox $data -o counts\n"
        "sort /input/words.txt | uniq -c | awk '{print $2\",\"$1}' > /output/counts.csv\n"
        "mkdir -p /output/deep/er && echo nested > /output/deep/er/note.txt\n"
        'echo \'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>\''
        " > /output/dot.svg\n"
        "printf '# Notes\\n\\n*three* pears\\n' > /output/notes.md\n",
    )
    return ip.user_ns["counts"]


def run(ip: InteractiveShell, source: str) -> ExecutionResult:
    return ip.run_cell(source)


def ok(ip: InteractiveShell, source: str):
    result = run(ip, source)
    assert result.error_in_exec is None, result.error_in_exec
    return result.result


def error_of(ip: InteractiveShell, source: str) -> BaseException:
    result = run(ip, source)
    assert result.error_in_exec is not None, f"no error from {source!r}"
    return result.error_in_exec


# -- argument parsing (no runs) ------------------------------------------------------------


def test_split_payload_args_keeps_options_after_double_dash() -> None:
    assert split_payload_args("A B -o x -- sh -c 'echo 1 > /output/a' --timeout 3") == (
        ["A", "B", "-o", "x"],
        ["sh", "-c", "echo 1 > /output/a", "--timeout", "3"],
    )
    assert split_payload_args("A") == (["A"], [])
    with pytest.raises(UsageError):
        split_payload_args("A 'unclosed")


def test_interpreter_and_script_make_the_command_line() -> None:
    request = RunRequest(rootfs="x", script="print(1)", interpreter="python3 -X utf8", args=("a",))
    assert request.argv() == (
        "/sbin/init",
        "python3",
        "-X",
        "utf8",
        "/input/.ipfs-execute/script",
        "a",
    )


def test_help_documents_every_option(ip: InteractiveShell) -> None:
    doc = IpfsExecuteMagics.ipfs_execute.__doc__
    for option in (
        "ROOTFS",
        "INPUT",
        "--out",
        "--interpreter",
        "--timeout",
        "--memory",
        "--pids",
        "--tmp-size",
        "--no-cache",
        "--no-raise-error",
        "--quiet",
        "-- ARG",
        ".ipfs-execute/script",
        "%config IpfsExecuteMagics",
    ):
        assert option in doc, option
    assert ip.find_cell_magic("ipfs_execute") is not None
    assert ip.find_line_magic("ipfs_execute") is not None
    assert "NAME=PATH" in IpfsExecuteMagics.ipfs_mkdir.__doc__


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("", "ROOTFS"),
        ("$busybox --timeout soon", "seconds"),
        ("$busybox --memory lots", "size"),
        ("$busybox --pids 0", "positive"),
        ("$busybox -o 2bad", "variable name"),
        ("$busybox -o class", "variable name"),
        ("$busybox --bogus", "unrecognized"),
        ("$busybox $empty extra words", "after --"),
        ("not-a-cid", "not a CID"),
        ("$busybox bafy-not-a-cid", "INPUT"),
        ("$busybox /ipfs/$busybox/../x", "'..'"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(
    ip: InteractiveShell, line: str, fragment: str
) -> None:
    error = error_of(ip, f"%%ipfs_execute {line}\necho hi > /output/x")
    assert type(error) is UsageError  # exactly: IPython prints one line only for this type
    assert fragment in str(error)


def test_undefined_variable_gets_a_hint(ip: InteractiveShell) -> None:
    error = error_of(ip, "%%ipfs_execute $no_such_variable\necho")
    assert type(error) is UsageError
    assert "is the variable defined" in str(error)


def test_empty_cell_and_line_form_interpreter_are_refused(ip: InteractiveShell) -> None:
    assert type(error_of(ip, "%%ipfs_execute $busybox\n   \n")) is UsageError
    error = error_of(ip, "%ipfs_execute $busybox $empty --interpreter python3 -- true")
    assert type(error) is UsageError and "cell" in str(error)


# -- running, binding, expansion -----------------------------------------------------------


def test_cell_binds_result_and_underscore(
    ip: InteractiveShell, counts: RunResult, data: IpfsRef
) -> None:
    assert isinstance(counts, RunResult) and counts.ok
    assert counts.read_text("counts.csv") == "apple,1\nfig,1\npear,3\n"
    assert str(counts) == counts.record.output and f"{counts}" == str(counts)
    # The input the payload saw is the given input plus the script at the reserved name.
    assert counts.record.given_input == str(data)
    names = {entry.name for entry in counts.input.ls()}
    assert names == {"words.txt", SCRIPT_DIR}
    assert "sort /input/words.txt" in counts.input.read_text(".ipfs-execute/script")
    value = ok(ip, "%%ipfs_execute $busybox $data -o again\ncp /input/words.txt /output/")
    assert value is ip.user_ns["again"] and ip.user_ns["_"] is value


def test_live_output_goes_to_stdout_and_stderr(ip: InteractiveShell, capsys) -> None:
    capsys.readouterr()
    ok(ip, "%%ipfs_execute $busybox\necho to-stdout; echo to-stderr >&2; printf 'caf\\303\\251\\n'")
    captured = capsys.readouterr()
    assert "to-stdout\n" in captured.out and "café\n" in captured.out
    assert "to-stderr\n" in captured.err and "to-stderr" not in captured.out


def test_expansion_of_results_refs_and_sub_paths(ip: InteractiveShell, counts: RunResult) -> None:
    ok(ip, "%ipfs_mkdir images/busybox.tar.gz=$busybox -o imgs")
    imgs = ip.user_ns["imgs"]
    # A rootfs as a sub path of a bound ref, in both spellings; a result's sub path as input.
    for rootfs in ("{imgs}/images/busybox.tar.gz", '{imgs / "images/busybox.tar.gz"}'):
        result = ok(
            ip,
            f"%%ipfs_execute {rootfs} {{counts / 'deep'}} -o sub_run\n"
            "cat /input/er/note.txt > /output/copy.txt",
        )
        assert result.read_text("copy.txt") == "nested\n"
        assert result.rootfs == ip.user_ns["busybox"]
    result = ok(ip, "%%ipfs_execute $busybox {counts}/deep/er\nls /input > /output/ls.txt")
    assert "note.txt" in result.read_text("ls.txt")
    assert isinstance(imgs, IpfsRef) and str(imgs) == imgs.cid


def test_line_form_runs_a_command_without_script(ip: InteractiveShell, data: IpfsRef) -> None:
    result = ok(
        ip,
        "%ipfs_execute $busybox $data -o listed -- "
        "sh -c 'wc -l < /input/words.txt > /output/n; echo \"$@\" > /output/a' "
        "sh --not-an-option x",
    )
    assert result is ip.user_ns["listed"]
    assert result.read_text("n").strip() == "5"
    assert result.read_text("a") == "--not-an-option x\n"
    assert result.record.script is None and result.record.input == str(data)


def test_script_arguments_after_double_dash(ip: InteractiveShell) -> None:
    result = ok(ip, '%%ipfs_execute $busybox -- one "two words"\nprintf "%s|" "$@" > /output/args')
    assert result.read_text("args") == "one|two words|"


def test_reserved_script_name_in_input_is_refused(ip: InteractiveShell, busybox_cid: str) -> None:
    ok(ip, f"%ipfs_mkdir {SCRIPT_DIR}/script=$busybox -o clashing")
    error = error_of(ip, "%%ipfs_execute $busybox $clashing\necho")
    assert type(error) is UsageError and SCRIPT_DIR in str(error)
    # The line form has no script: the same input is fine there.
    ok(ip, "%ipfs_execute $busybox $clashing -- true")


def test_identical_run_comes_from_the_record_and_replays_its_output(
    ip: InteractiveShell, capsys
) -> None:
    token = secrets.token_hex(4)
    body = f"echo printed-{token}; echo warned-{token} >&2; echo x > /output/x"
    first = ok(ip, f"%%ipfs_execute $busybox -o first\n{body}")
    assert not first.cache_hit and first.record_cid
    capsys.readouterr()
    second = ok(ip, f"%%ipfs_execute $busybox -o second\n{body}")
    captured = capsys.readouterr()
    assert second.cache_hit and second.output == first.output
    # (the displayed result follows on stdout)
    assert captured.out.startswith(f"printed-{token}\n") and captured.err == f"warned-{token}\n"
    bundle, _ = ip.display_formatter.format(second)
    for mime in ("text/plain", "text/html"):
        assert "cached: nothing ran" in bundle[mime]
        assert f"ipfs://{second.record_cid}" in bundle[mime]
    third = ok(ip, f"%%ipfs_execute $busybox --no-cache -o third\n{body}")
    assert not third.cache_hit and third.output == first.output
    assert "cached" not in ip.display_formatter.format(third)[0]["text/plain"]


# -- failures ------------------------------------------------------------------------------


def test_failing_payload_raises_short_error_and_binds(ip: InteractiveShell) -> None:
    error = error_of(
        ip,
        "%%ipfs_execute $busybox -o failed\n"
        "echo partial > /output/p\nfor i in 1 2 3; do echo line$i >&2; done\n"
        "exit 3",
    )
    assert isinstance(error, PayloadFailedError)
    lines = error._render_traceback_()
    assert "exited with status 3" in lines[0] and "`failed`" in lines[0]
    assert lines[-3:] == ["  line1", "  line2", "  line3"]
    assert not any("Traceback" in line or ".py" in line for line in lines)
    failed = ip.user_ns["failed"]
    assert failed is error.result and failed.exit_status == 3
    assert failed.read_text("p") == "partial\n"


def test_stderr_tail_is_bounded(ip: InteractiveShell) -> None:
    error = error_of(ip, "%%ipfs_execute $busybox --quiet\nseq 1 100 >&2; exit 1")
    lines = error._render_traceback_()
    assert lines[-1] == "  100" and "  88" not in lines and len(lines) < 20


def test_no_raise_error_returns_the_failed_result(ip: InteractiveShell) -> None:
    result = ok(ip, "%%ipfs_execute $busybox --no-raise-error -o soft\nexit 7")
    assert result is ip.user_ns["soft"] and result.exit_status == 7 and not result.ok
    bundle, _ = ip.display_formatter.format(result)
    assert "✗ exit 7" in bundle["text/plain"] and "✗ exit 7" in bundle["text/html"]


def test_timeout_kills_and_says_so(ip: InteractiveShell) -> None:
    started = time.monotonic()
    error = error_of(
        ip, "%%ipfs_execute $busybox --timeout 1 -o slow\necho before > /output/b; sleep 30"
    )
    assert time.monotonic() - started < 15
    assert isinstance(error, PayloadFailedError) and "1 s timeout" in str(error)
    assert ip.user_ns["slow"].record.timed_out
    assert ip.user_ns["slow"].read_text("b") == "before\n"


def test_quiet_prints_nothing_and_returns_nothing(ip: InteractiveShell, capsys) -> None:
    capsys.readouterr()
    value = ok(ip, "%%ipfs_execute $busybox -q -o hushed\necho loud; echo loud >&2")
    captured = capsys.readouterr()
    assert value is None and "loud" not in captured.out + captured.err
    assert ip.user_ns["hushed"].stdout == b"loud\n"  # still kept in the result
    assert isinstance(error_of(ip, "%%ipfs_execute $busybox -q\nexit 2"), PayloadFailedError)


def test_core_errors_render_short(ip: InteractiveShell, counts: RunResult) -> None:
    # counts.csv is a file, not a usable rootfs: a staging error, not a usage error.
    error = error_of(ip, "%%ipfs_execute {counts}/counts.csv\necho")
    assert isinstance(error, IpfsExecuteError) and not isinstance(error, CoreUsageError)
    rendered = error._render_traceback_()
    assert len(rendered) == 1 and type(error).__name__ in rendered[0]


def test_interrupt_stops_the_sandbox_and_reraises(ip: InteractiveShell, capsys) -> None:
    marker = f"iex-interrupt-{secrets.token_hex(6)}"
    main = threading.main_thread().ident

    def interrupt_when_running() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not sandbox_processes(marker):
            time.sleep(0.05)
        signal.pthread_kill(main, signal.SIGINT)  # the main thread: it waits in select()

    watcher = threading.Thread(target=interrupt_when_running)
    watcher.start()
    started = time.monotonic()
    error = error_of(ip, f"%%ipfs_execute $busybox\nsh -c 'sleep 60; true' {marker}")
    watcher.join()
    assert type(error) is KeyboardInterrupt
    assert time.monotonic() - started < 20
    assert error._render_traceback_() == ["KeyboardInterrupt"]
    assert INTERRUPTED_LINE in capsys.readouterr().err
    assert sandbox_processes(marker) == []
    ok(ip, "%%ipfs_execute $busybox\ntrue")  # the next cell runs normally


def sandbox_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


# -- display -------------------------------------------------------------------------------


def test_mimebundle_has_widget_html_and_text(
    ip: InteractiveShell, counts: RunResult, home: Path
) -> None:
    bundle, _ = ip.display_formatter.format(counts)
    assert {WIDGET_MIME, "text/html", "text/plain"} <= set(bundle)
    html, plain = bundle["text/html"], bundle["text/plain"]
    gateway = ip.magics_manager.registry["IpfsExecuteMagics"].gateway_for(counts.store)
    # The gateway on the port kept for the data directory, not one daemon's random port.
    port = (home / GATEWAY_PORT_NAME).read_text().strip()
    assert gateway == Gateway(f"http://127.0.0.1:{port}")
    assert set(re.findall(r'href="http://127\.0\.0\.1:(\d+)/', html)) == {port}
    for entry in counts.files():
        assert entry.path.rsplit("/", 1)[-1] in html and entry.cid in html
        assert entry.cid in plain
    assert f'href="{gateway}/ipfs/{counts.output}/counts.csv"' in html
    for cid in (counts.output, counts.input, counts.rootfs):
        assert f'href="{gateway}/ipfs/{cid}"' in html and f"ipfs://{cid}" in html
        assert f"ipfs://{cid}" in plain
    assert 'href="ipfs://' not in html  # untrusted HTML drops those
    assert "✓ exit 0" in html and "✓ exit 0" in plain
    size = human_size(len("apple,1\nfig,1\npear,3\n"))
    assert f">{size}<" in html and size in plain
    assert "<th" in html and "pear" in html  # the CSV preview as a table
    assert "data:image/svg+xml;base64," in html  # the SVG preview
    assert "nested" in html  # small text preview
    assert '<pre style="max-height:24em;overflow:auto;margin:0;font-family:monospace">' in html
    assert '<td style="text-align:right;padding:0 0.6em">3</td>' in html  # numbers line up
    assert '<td style="text-align:left;padding:0 0.6em">pear</td>' in html
    assert "# Notes\n\n*three* pears" in html  # Markdown as escaped text in the static HTML
    assert 'class="ipfs-execute-copy"' not in html  # no script in saved HTML


def test_widget_tree_and_previews(ip: InteractiveShell, counts: RunResult) -> None:
    view = ResultView(counts, "http://gw.example")
    assert WIDGET_MIME in view._repr_mimebundle_()
    browser = OutputBrowser(view)
    assert set(browser.buttons) == {entry.path for entry in counts.files()}
    assert "counts.csv" in browser.preview.value  # the first file is shown right away
    browser.buttons["deep/er/note.txt"].click()
    assert "nested" in browser.preview.value
    assert browser.buttons["deep/er/note.txt"].button_style == "info"
    assert browser.buttons["counts.csv"].button_style == ""
    browser.buttons["notes.md"].click()  # rendered by the front end, as text/markdown
    assert "notes.md" in browser.preview.value and "<pre" not in browser.preview.value
    assert browser.rendered.layout.display == "block"
    (shown,) = browser.rendered.outputs
    assert shown["data"]["text/markdown"] == "# Notes\n\n*three* pears\n"
    browser.buttons["dot.svg"].click()
    assert "data:image/svg+xml;base64," in browser.preview.value
    assert browser.rendered.outputs == () and browser.rendered.layout.display == "none"
    header = browser.children[0].value  # a copy button beside each CID
    for cid in (counts.output, counts.input, counts.rootfs):
        assert f'data-cid="{cid}"' in header and f"ipfs://{cid}" in header
    folder = browser.buttons["deep"]
    folder.click()
    assert folder.icon == "folder"
    folder.click()
    assert folder.icon == "folder-open"


def test_node_status_magic_and_api(ip: InteractiveShell, counts: RunResult, home: Path) -> None:
    gateway = stored_gateway_url(home)
    status = ie.node_status()
    assert status.embedded and status.running and status.pid
    assert status.api == counts.store.api and status.gateway == gateway
    assert status.links == Gateway(str(gateway)) and status.repo == home / "kubo"
    assert status.repo_size is not None and status.repo_size > 0
    with capture_output() as captured:
        ok(ip, "%ipfs_node")
    assert captured.stdout == status.describe() + "\n"
    assert f"gateway: {gateway}" in captured.stdout and "embedded, running" in captured.stdout
    try:
        ok(ip, "%config IpfsExecuteMagics.gateway = 'https://dweb.link'")
        ok(ip, "%config IpfsExecuteMagics.gateway_style = 'subdomain'")
        with capture_output() as captured:
            ok(ip, "%ipfs_node")
        assert "links:   https://dweb.link, subdomain style" in captured.stdout
        bundle, _ = ip.display_formatter.format(counts)
        assert f'href="https://{counts.output}.ipfs.dweb.link"' in bundle["text/html"]
        run(ip, "%config IpfsExecuteMagics.gateway_style = 'sideways'")  # refused
        assert ip.magics_manager.registry["IpfsExecuteMagics"].gateway_style == "subdomain"
    finally:
        ok(ip, "%config IpfsExecuteMagics.gateway = ''")
        ok(ip, "%config IpfsExecuteMagics.gateway_style = ''")


def test_markdown_from_a_payload_cannot_carry_html_or_script_links() -> None:
    hostile = (
        "# Report <img src=x onerror=alert(1)>\n"
        "<script>alert(2)</script> &#106;avascript `a < b && c`\n"
        "[one](javascript:alert(3)) [two]( \x01JavaScript :alert(4))\n"
        "[ref]: vbscript:msgbox(5)\n"
        "[fine](https://example.org/a?b=1)\n"
    )
    inert = inert_markdown(hostile)
    assert re.search(r"<[A-Za-z!/?]", inert) is None  # no tag, comment or autolink can open
    assert re.search(r"&[#A-Za-z]", inert) is None  # no entity can form
    assert re.search(r"(?i)(javascript|vbscript)\s*:", inert) is None
    assert "[fine](https://example.org/a?b=1)" in inert  # ordinary links stay
    # What a reader sees is unchanged (the added characters have no width).
    assert inert.replace("\u200b", "").startswith(hostile.split("[one]")[0])


def test_image_and_binary_previews() -> None:
    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
        "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    )
    snippet = preview_html("plot.png", png, len(png), HTML_PREVIEWS)
    assert snippet is not None and "data:image/png;base64," in snippet
    assert preview_html("big.jpg", b"x" * 10, 10**9, HTML_PREVIEWS) is None
    assert preview_html("blob.bin", b"\x00\x01\x02", 3, HTML_PREVIEWS) is None
    assert preview_html("bad.txt", b"\xff\xfe\xfa", 3, HTML_PREVIEWS) is None
    long = "".join(f"{i}\n" for i in range(1000)).encode()
    snippet = preview_html("long.log", long[:4096], len(long), HTML_PREVIEWS)
    assert snippet is not None and "first" in snippet and ">0\n1\n" in snippet


def test_python_api_results_display_too(ip: InteractiveShell, busybox_cid: str) -> None:
    result = ie.run(busybox_cid, None, "sh", "-c", "echo api > /output/from-api.txt")
    bundle, _ = ip.display_formatter.format(result)
    assert "from-api.txt" in bundle["text/html"] and WIDGET_MIME in bundle


def test_empty_output_and_refs_display(ip: InteractiveShell, data: IpfsRef) -> None:
    result = ok(ip, "%%ipfs_execute $busybox\ntrue")
    bundle, _ = ip.display_formatter.format(result)
    assert "/output is empty" in bundle["text/html"]
    bundle, _ = ip.display_formatter.format(data)
    assert f"ipfs://{data}" in bundle["text/html"] and 'href="http' in bundle["text/html"]
    assert bundle["text/plain"] == repr(data)


def test_staging_progress_is_replaced_by_a_static_line(
    ip: InteractiveShell, store, monkeypatch
) -> None:
    monkeypatch.setattr(magics, "PROGRESS_DELAY", 0.0)
    fresh = store.compose({"noise.bin": store.add_bytes(secrets.token_bytes(4096))})
    ip.user_ns["fresh"] = fresh  # never staged before: its input is fetched now
    with capture_output() as captured:
        ok(ip, "%%ipfs_execute $busybox $fresh\nwc -c < /input/noise.bin > /output/n")
    progress = [out for out in captured.outputs if "input" in out.data.get("text/plain", "")]
    assert progress and progress[0].data["text/plain"].startswith("running · ")
    assert "staging input" in progress[0].data["text/plain"]
    last = progress[-1]
    assert last.update and last.data["text/plain"].startswith("finished after ")
    assert "fetched input" in last.data["text/plain"]
    assert set(last.data) == {"text/plain", "text/html"}  # no widget state to save
    assert all(WIDGET_MIME not in out.data for out in progress)


def test_add_progress_is_replaced_by_a_static_line(
    ip: InteractiveShell, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(magics, "PROGRESS_DELAY", 0.0)
    tree = tmp_path / "big-add"
    tree.mkdir()
    for index in range(1000):
        (tree / f"f{index:04d}").write_text(f"{index}\n")
    with open(tree / "big.bin", "wb") as handle:
        handle.truncate(300 * 1024 * 1024)  # sparse: cheap to make, seconds to add
    with capture_output() as captured:
        ref = ok(ip, f"%ipfs_add {tree}")
    assert isinstance(ref, IpfsRef)
    progress = [out for out in captured.outputs if "add" in out.data.get("text/plain", "")]
    assert progress and progress[0].data["text/plain"].startswith(f"adding {tree}: ")
    assert "of 1,001 files" in progress[0].data["text/plain"]
    assert "/s" in progress[0].data["text/plain"]
    last = progress[-1]
    assert last.update and last.data["text/plain"].startswith(f"added {tree}: 1,001 files, 300.0")
    assert set(last.data) == {"text/plain", "text/html"}  # no widget state to save
    assert all(WIDGET_MIME not in out.data for out in progress)


def test_add_progress_is_silent_for_a_quick_add(ip: InteractiveShell, data_dir: Path) -> None:
    with capture_output() as captured:
        ok(ip, f"%ipfs_add {data_dir}")
    assert captured.outputs == []


def test_progress_is_silent_for_quick_staging() -> None:
    progress = LiveStatus(delay=60)
    with capture_output() as captured:
        progress("rootfs x", 10, 100)
        progress.finish()
    assert captured.outputs == [] and not progress.shown


# -- %ipfs_add, %ipfs_mkdir, the Python API ------------------------------------------------


def test_ipfs_add_file_and_folder_match_the_api(
    ip: InteractiveShell, data_dir: Path, data: IpfsRef, kubo_env
) -> None:
    assert isinstance(data, IpfsRef) and str(data) == ie.add(data_dir)
    single = ok(ip, f"%ipfs_add {data_dir / 'words.txt'} -o words")
    assert single is ip.user_ns["words"] and single.read_text().startswith("pear")
    expected = subprocess.run(
        ["ipfs", "add", "-Q", "--cid-version=1", "--raw-leaves", str(data_dir / "words.txt")],
        env=kubo_env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert str(single) == expected
    error = error_of(ip, "%ipfs_add /no/such/path -o nothing")
    assert type(error) is UsageError and "nothing" not in ip.user_ns


def test_ipfs_mkdir_composes_and_matches_the_api(
    ip: InteractiveShell, data: IpfsRef, counts: RunResult
) -> None:
    made = ok(
        ip,
        "%ipfs_mkdir words=$data counts.csv={counts}/counts.csv "
        "nested/deep={counts / 'deep'} -o bundle",
    )
    assert made is ip.user_ns["bundle"] and isinstance(made, IpfsRef)
    assert str(made) == ie.mkdir(
        {"words": data, "counts.csv": counts / "counts.csv", "nested/deep": counts / "deep"}
    )
    assert {e.name for e in made.ls()} == {"words", "counts.csv", "nested"}
    assert made.read_text("nested/deep/er/note.txt") == "nested\n"
    for line, fragment in (
        ("justaname", "NAME=PATH"),
        ("a=$data a=$data", "twice"),
        ("a=not-a-cid", "not a CID"),
    ):
        error = error_of(ip, f"%ipfs_mkdir {line}")
        assert type(error) is UsageError and fragment in str(error)


# -- configuration -------------------------------------------------------------------------


def test_config_changes_gateway_limits_and_rebuilds_the_runner(
    ip: InteractiveShell, counts: RunResult, home: Path
) -> None:
    magics_object = ip.magics_manager.registry["IpfsExecuteMagics"]
    assert magics_object in ip.configurables
    before = ie.default_runner()
    try:
        ok(ip, "%config IpfsExecuteMagics.gateway = 'https://gw.example/'")
        bundle, _ = ip.display_formatter.format(counts)
        assert f'href="https://gw.example/ipfs/{counts.output}"' in bundle["text/html"]

        ok(ip, "%config IpfsExecuteMagics.timeout = 42")
        ok(ip, "%config IpfsExecuteMagics.memory = '512M'")
        ok(ip, "%config IpfsExecuteMagics.pids = 64")
        runner = ie.default_runner()
        assert runner is not before and runner.settings.home == home
        limits = runner.settings.limits
        assert (limits.timeout, limits.memory_bytes, limits.pids) == (42, 512 * 1024**2, 64)
        # A script never run before: an identical run would come from the result cache.
        result = ok(ip, f"%%ipfs_execute $busybox --pids 32\ntrue {secrets.token_hex(4)}")
        assert not result.cache_hit
        assert result.record.limits["timeout"] == 42 and result.record.limits["pids"] == 32

        run(ip, "%config IpfsExecuteMagics.memory = 'lots'")  # refused, value kept
        assert magics_object.memory == 512 * 1024**2
    finally:
        for line in ("gateway = ''", "timeout = None", "memory = None", "pids = None"):
            ok(ip, f"%config IpfsExecuteMagics.{line}")
    assert ie.default_runner().settings.limits.timeout == 600


def test_config_given_at_load_applies(ip: InteractiveShell, home: Path) -> None:
    from traitlets.config import Config

    config = Config()
    config.IpfsExecuteMagics.home = str(home)
    config.IpfsExecuteMagics.timeout = 30.0
    try:
        IpfsExecuteMagics(config=config)  # as from ipython_config.py, before %load_ext
        assert ie.default_runner().settings.limits.timeout == 30
    finally:
        ip.magics_manager.registry["IpfsExecuteMagics"].apply_settings()
    assert ie.default_runner().settings.limits.timeout == 600


def test_config_api_points_at_a_daemon(ip: InteractiveShell, store) -> None:
    try:
        ok(ip, f"%config IpfsExecuteMagics.api = {store.api!r}")
        assert ie.default_runner().settings.api == store.api
        ok(ip, "%%ipfs_execute $busybox\ntrue")
        ok(ip, "%config IpfsExecuteMagics.api = '/ip4/127.0.0.1/tcp/1'")
        error = error_of(ip, "%%ipfs_execute $busybox\ntrue")
        assert type(error).__name__ == "DaemonUnreachableError"
        assert len(error._render_traceback_()) == 1
    finally:
        ok(ip, "%config IpfsExecuteMagics.api = ''")
    ok(ip, "%%ipfs_execute $busybox\ntrue")


# -- bad limits and the memory limit -------------------------------------------------------


@pytest.mark.parametrize(
    "option", ["--memory inf", "--memory nanM", "--timeout nan", "--timeout inf", "--pids=-2"]
)
def test_a_limit_that_is_not_finite_is_one_line_before_anything_runs(
    ip: InteractiveShell, option: str
) -> None:
    error = error_of(ip, f"%%ipfs_execute $busybox {option} -o never\necho ran > /output/x")
    assert type(error) is UsageError  # exactly: IPython prints one line only for this type
    assert option.replace("=", " ").split()[1] in str(error) and "\n" not in str(error)
    assert "never" not in ip.user_ns


@pytest.mark.parametrize(
    "setting",
    ["timeout = float('nan')", "timeout = -1.0", "memory = 'inf'", "tmp_size = '0'", "cpus = 0.0"],
)
def test_a_configured_limit_is_checked_like_the_option(ip: InteractiveShell, setting: str) -> None:
    magics = ip.magics_manager.registry["IpfsExecuteMagics"]
    name = setting.split()[0]
    before = getattr(magics, name)
    ip.run_line_magic("config", f"IpfsExecuteMagics.{setting}")  # refused, and logged
    assert getattr(magics, name) == before  # the bad value never took hold


def test_a_configured_size_is_held_in_bytes(ip: InteractiveShell) -> None:
    magics = ip.magics_manager.registry["IpfsExecuteMagics"]
    try:
        ip.run_line_magic("config", "IpfsExecuteMagics.tmp_size = '32M'")
        assert magics.tmp_size == 32 * 1024**2
        assert ie.default_runner().settings.limits.tmp_bytes == 32 * 1024**2
    finally:
        ip.run_line_magic("config", "IpfsExecuteMagics.tmp_size = None")


def test_a_run_killed_by_the_memory_limit_says_so(ip: InteractiveShell) -> None:
    hog = "x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo survived"
    error = error_of(ip, f"%%ipfs_execute $busybox --memory 64M --tmp-size 1M -o hog\n{hog}")
    assert isinstance(error, PayloadFailedError)
    hogged = ip.user_ns["hog"]
    if "cgroup" not in hogged.record.limits_enforced["memory"]:
        pytest.skip("no memory cgroup here")
    assert hogged.record.killed_by == "memory"
    headline = error._render_traceback_()[0]
    assert "killed: out of memory (limit 64 MiB), exit status 137" in headline
    assert "--memory" in headline and "`hog`" in headline
    bundle, _ = ip.display_formatter.format(hogged)
    for mime in ("text/plain", "text/html"):
        assert "✗ exit 137, killed: out of memory (limit 64 MiB)" in bundle[mime]


def test_lineage_view_of_the_empty_directory_credits_no_run(ip: InteractiveShell) -> None:
    ok(ip, "%%ipfs_execute $busybox --no-cache\ntrue")  # one run whose output is empty
    node = ok(ip, "%ipfs_lineage $empty")
    assert not node.is_run and not node.parents
    bundle, _ = ip.display_formatter.format(node)
    for mime in ("text/plain", "text/html"):
        assert "produced by many runs" in bundle[mime]
