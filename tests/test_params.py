"""Parameters: environment variables of the payload, part of the cache key, recorded, and
repeated by a verification. Real Kubo and bwrap."""

from __future__ import annotations

import pytest
from helpers import ipfs_execute

from ipfs_execute_magic.errors import UsageError
from ipfs_execute_magic.params import params_from, parse_param
from ipfs_execute_magic.record import RunRequest
from ipfs_execute_magic.runner import Runner
from ipfs_execute_magic.verification import request_of, verify


def test_parameters_are_variables_in_the_key_and_the_record(
    settings, busybox_cid: str, empty_cid: str
) -> None:
    script = 'echo "n=$n name=$name" > /output/said; echo "$n"'
    with Runner(settings) as runner:

        def run(**params: object):
            request = RunRequest(busybox_cid, empty_cid, script=script, params=params_from(params))
            return runner.run(request)

        ten = run(n=10, name="foo bar")
        assert runner.store.cat(f"{ten}/said") == b"n=10 name=foo bar\n"
        assert ten.record.params == {"n": "10", "name": "foo bar"}
        assert ten.record.env["n"] == "10"
        again = run(name="foo bar", n=10)  # same parameters in another order: the same run
        assert again.cache_hit and str(again) == str(ten)
        eleven = run(n=11, name="foo bar")  # another value: another run, another output
        assert not eleven.cache_hit and str(eleven) != str(ten)
        assert run(n=True, name=[1, 2]).stdout == b"true\n"  # not a str: JSON
        # A verification repeats the run with its parameters, and agrees.
        assert request_of(ten.record).params == (("n", "10"), ("name", "foo bar"))
        assert verify(runner, runner.results.find(str(ten))).reproducible


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("n", "has no value"),
        ("1n=2", "not a variable name"),
        ("PATH=/evil", "sandbox's own environment"),
        ("LD_PRELOAD=/x.so", "sandbox's own environment"),
        ("PYTHONPATH=/x", "sandbox's own environment"),
        ("a-b=1", "not a variable name"),
    ],
)
def test_a_parameter_that_cannot_be_a_plain_variable_is_refused(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_param(text)


def test_a_parameter_given_twice_is_refused() -> None:
    with pytest.raises(UsageError, match="given twice"):
        RunRequest("x", params=(("n", "1"), ("n", "2")))


def test_the_command_line_takes_parameters(home, store, busybox_cid: str, empty_cid: str) -> None:
    shown = ipfs_execute(
        home,
        "-p",
        "n=7",
        "--param",
        "who=a b",
        busybox_cid,
        empty_cid,
        "sh",
        "-c",
        'echo "$n $who" > /output/said',
    )
    assert shown.returncode == 0, shown.stderr
    assert store.cat(f"{shown.stdout.strip()}/said") == b"7 a b\n"
    refused = ipfs_execute(home, "-p", "PATH=/x", busybox_cid, empty_cid, "true")
    assert refused.returncode == 2
    assert "parameter PATH would change the sandbox's own environment" in refused.stderr


def test_the_magic_takes_parameters(ip) -> None:
    from IPython.utils.capture import capture_output

    with capture_output():
        cell = ip.run_cell(
            '%%ipfs_execute $busybox -p n=3 -p who=x -o said\necho "$n $who" > /output/said'
        )
    assert cell.error_in_exec is None, cell.error_in_exec
    said = ip.user_ns["said"]
    assert said.record.params == {"n": "3", "who": "x"}
    assert said.output.read_bytes("said") == b"3 x\n"
    with capture_output():
        ip.run_cell(
            '%%ipfs_execute $busybox -p n=3 -p who=x -o said\necho "$n $who" > /output/said'
        )
    hit = ip.user_ns["said"]
    assert hit.cache_hit
    plain, html = (
        ip.display_formatter.format(hit)[0][kind] for kind in ("text/plain", "text/html")
    )
    for shown in (plain, html):
        assert "parameters: n=3, who=x" in shown
        # A hit says when the recorded run ran, and whose key signed it: not "in 0.01 s".
        assert (
            f"cached · ran {hit.record.durations['total']:.2f} s on {hit.record.started_at[:10]}"
            in shown
        )
        assert "attested by 1 key (trusted)" in shown
    with capture_output():
        refused = ip.run_cell("%%ipfs_execute $busybox -p HOME=/x\ntrue")
    assert "parameter HOME would change the sandbox's own environment" in str(refused.error_in_exec)
