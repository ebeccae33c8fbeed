"""Signed records between two nodes with their own keys: what a shared cache may serve.

Two embedded nodes on loopback, each with its own data directory and signing key; B imports
A's cache export. Real Kubo, real bwrap, real Ed25519.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import ipfs_execute, world_traversable_tmpdir

from ipfs_execute_magic.node import EmbeddedNode
from ipfs_execute_magic.record import RunRecord, RunRequest
from ipfs_execute_magic.result_cache import CACHE_DIR
from ipfs_execute_magic.runner import Runner
from ipfs_execute_magic.settings import Settings
from ipfs_execute_magic.trust import TrustedKeys

SCRIPT = "echo computed > /output/result"


@pytest.fixture()
def two_nodes(busybox_tarball: Path) -> Iterator[tuple[Runner, Runner, str]]:
    """Runners of nodes A and B (connected, sharing nothing else) and a busybox both have."""
    homes = [world_traversable_tmpdir(f"iex-trust{name}-") for name in "AB"]
    runners = [Runner(Settings(home=home, online=True)) for home in homes]
    try:
        a, b = runners
        b.store.swarm_connect(a.store.peer_addresses()[0])
        busybox = a.store.add_path(busybox_tarball)
        yield a, b, busybox
    finally:
        for runner, home in zip(runners, homes, strict=True):
            runner.close()
            EmbeddedNode(runner.settings).stop()
            shutil.rmtree(home, ignore_errors=True)


def _request(busybox: str, script: str = SCRIPT) -> RunRequest:
    return RunRequest(busybox, script=script)


def _plant(runner: Runner, record: RunRecord) -> None:
    """Put a record into a node's cache index as its own (what a forger's node can do)."""
    runner.results.flush()  # the run's own entries are written in the background: not over ours
    cid = runner.store.add_bytes(record.to_json().encode(), name="record.json")
    runner.store.mfs_link(f"{CACHE_DIR}/{record.key}", cid)


def test_an_honest_result_from_a_trusted_key_is_a_hit(two_nodes) -> None:
    a, b, busybox = two_nodes
    made = a.run(_request(busybox))
    assert made.trust == "attested by 1 key (trusted)"
    report = b.results.import_(a.results.export())
    assert (report.added, report.rejected) == (1, ())
    TrustedKeys(b.settings.trusted_keys_path).add(a.signing_key.public_id, "A")
    hit = Runner(b.settings).run(_request(busybox))  # a fresh runner reads the trusted keys
    assert hit.cache_hit and str(hit) == str(made)
    assert hit.trust == "attested by 1 key (trusted)"


def test_an_untrusted_result_is_run_again_and_trusted_once_it_agrees(two_nodes) -> None:
    a, b, busybox = two_nodes
    made = a.run(_request(busybox))
    b.results.import_(a.results.export())
    # --trust-any serves it, and says on whose word.
    with Runner(b.settings.with_changes(trust_any=True)) as lenient:
        served = lenient.run(_request(busybox))
    assert served.cache_hit and str(served) == str(made)
    assert served.trust_note is not None and "untrusted keys only" in served.trust_note
    first = b.run(_request(busybox))
    assert not first.cache_hit  # A's word alone is not enough
    assert str(first) == str(made) and first.disagreement is None
    assert first.trust == "reproduced by 2 keys, 1 trusted"
    shown = ipfs_execute(b.settings.home, "lineage", str(first))
    assert shown.returncode == 0, shown.stderr
    assert f"attestations of {first}: reproduced by 2 keys, 1 trusted" in shown.stdout
    again = b.run(_request(busybox))
    assert again.cache_hit and again.trust is not None and "trusted" in again.trust
    assert b.results.lookup(again.record.key or "") is not None
    signers = {att.signer for att in b.results.attestations(again.record.key or "")}
    assert signers == {a.signing_key.public_id, b.signing_key.public_id}


def test_a_forged_output_signed_by_a_real_key_is_caught(two_nodes) -> None:
    a, b, busybox = two_nodes
    honest = a.run(_request(busybox))
    forged_output = a.store.compose({"result": a.store.add_bytes(b"forged\n")})
    record = honest.record
    assert record.key is not None
    forged = replace(
        record,
        output=forged_output,
        attestation=a.signing_key.attest(record.key, forged_output).to_dict(),
    )
    _plant(a, forged)
    a.results._memo.clear()
    report = b.results.import_(a.results.export())
    assert report.added == 1  # a valid signature: kept, whoever signed it
    result = b.run(_request(busybox))
    assert not result.cache_hit
    assert str(result) == str(honest)  # B's own run, not the forgery
    assert result.disagreement is not None and result.disagreement.startswith("CONFLICT:")
    assert forged_output in result.disagreement
    # B's own result is the answer from now on, and the conflict stays on record.
    again = b.run(_request(busybox))
    assert again.cache_hit and str(again) == str(honest)
    summary = b.trust_policy.summarize(str(honest), b.results.attestations(record.key))
    assert "CONFLICT" in summary.describe() and forged_output in summary.describe()


def test_tampered_records_are_rejected_on_import_with_one_line_each(two_nodes) -> None:
    a, b, busybox = two_nodes
    outputs = []
    for name in ("signature", "edited"):
        made = a.run(_request(busybox, f"echo {name} > /output/result"))
        outputs.append(made)
    tampered_signature, edited = (result.record for result in outputs)
    assert tampered_signature.attestation is not None and edited.attestation is not None
    signature = tampered_signature.attestation["signature"]
    flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
    _plant(
        a,
        replace(
            tampered_signature, attestation={**tampered_signature.attestation, "signature": flipped}
        ),
    )
    _plant(a, replace(edited, args=(*edited.args, "--edited")))  # the key no longer matches
    edited_key = edited.key
    report = b.results.import_(a.results.export())
    assert report.added == 0 and len(report.rejected) == 2
    lines = sorted(report.problems)
    assert any("does not verify: it was tampered with" in line for line in lines)
    assert any(
        line.startswith(f"{edited_key}: ") and "edited after" in line and "signed it" in line
        for line in lines
    )
    assert all("\n" not in line for line in lines)


def test_the_python_api_manages_trusted_keys(scratch: Path) -> None:
    import ipfs_execute_magic as ie

    previous = ie.default_runner().settings
    ie.configure(Settings(home=scratch / "home"))
    try:
        own = ie.signing_key()
        assert own.startswith("ed25519:") and own == ie.signing_key()
        colleague = _key_of(scratch / "colleague.key")
        ie.trust_key(colleague, "colleague")
        assert ie.trusted_keys() == {colleague: "colleague"}
        assert colleague in ie.default_runner().trust_policy.trusted
        assert ie.untrust_key("colleague") == colleague
        assert ie.trusted_keys() == {}
        assert colleague not in ie.default_runner().trust_policy.trusted
    finally:
        ie.configure(previous)
        EmbeddedNode(Settings(home=scratch / "home")).stop()


def _key_of(path: Path) -> str:
    from ipfs_execute_magic.trust import SigningKey

    return SigningKey.load_or_create(path).public_id
