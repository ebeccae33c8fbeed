"""Signing keys, attestations and the trust policy (pure logic: real Ed25519, no node)."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from ipfs_execute_magic.errors import UsageError
from ipfs_execute_magic.trust import (
    Attestation,
    SigningKey,
    TrustedKeys,
    TrustPolicy,
    parse_key_id,
)

KEY = "a" * 64
OTHER_KEY = "b" * 64


def test_a_key_is_made_once_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "home" / "keys" / "signing.key"
    first = SigningKey.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert SigningKey.load_or_create(path).public_id == first.public_id
    assert parse_key_id(first.public_id) == first.public_id
    os.chmod(path, 0o644)
    with pytest.raises(UsageError, match="can be read by other users"):
        SigningKey.load_or_create(path)
    os.chmod(path, 0o600)
    path.write_text("not a key\n")
    with pytest.raises(UsageError, match="not a signing key of this tool"):
        SigningKey.load_or_create(path)


def _load_at_once(
    load_key: Callable[[], str], threads: int
) -> tuple[list[str], list[BaseException]]:
    """`load_key()` called by `threads` threads let go at the same moment."""
    start = threading.Barrier(threads)
    found: list[str] = []
    errors: list[BaseException] = []

    def load() -> None:
        start.wait()
        try:
            found.append(load_key())
        except BaseException as error:
            errors.append(error)

    running = [threading.Thread(target=load) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    return found, errors


def test_threads_making_the_key_at_once_all_get_the_one_made(tmp_path: Path) -> None:
    """Runs in threads of one process (`--each`, `ie.map_entries`) in a new data directory
    each load the key: whichever makes it, all get that one, and nothing is left beside it."""
    for attempt in range(40):
        path = tmp_path / f"home-{attempt}" / "keys" / "signing.key"
        # The key itself, or its public half (written beside it on first use).
        if attempt % 2:
            found, errors = _load_at_once(lambda path=path: SigningKey.public_id_at(path), 4)
        else:
            found, errors = _load_at_once(
                lambda path=path: SigningKey.load_or_create(path).public_id, 4
            )
        assert errors == []
        assert len(found) == 4 and len(set(found)) == 1
        assert [name for name in os.listdir(path.parent) if name.startswith(".")] == []


def test_an_attestation_holds_only_for_what_was_signed(tmp_path: Path) -> None:
    key = SigningKey.load_or_create(tmp_path / "signing.key")
    attestation = key.attest(KEY, "bafyoutput")
    assert attestation.valid()
    assert Attestation.from_json(attestation.to_json()) == attestation
    # Any field changed after signing: no longer valid.
    assert not attestation._replace(output="bafyforged").valid()
    assert not attestation._replace(key=OTHER_KEY).valid()
    someone = SigningKey.load_or_create(tmp_path / "other.key")
    assert not attestation._replace(signer=someone.public_id).valid()
    flipped = attestation.signature[:-2] + ("A" if attestation.signature[-2] != "A" else "B")
    assert not attestation._replace(signature=flipped + attestation.signature[-1]).valid()
    with pytest.raises(ValueError):
        Attestation.from_json(b'{"format": "something else"}')


def test_the_policy_counts_trusted_signers_and_reports_conflicts(tmp_path: Path) -> None:
    own, colleague, stranger = (
        SigningKey.load_or_create(tmp_path / f"{name}.key")
        for name in ("own", "colleague", "stranger")
    )
    policy = TrustPolicy(own.public_id, [colleague.public_id])
    attestations = [
        own.attest(KEY, "out"),
        colleague.attest(KEY, "out"),
        stranger.attest(KEY, "out"),
        stranger.attest(KEY, "forged"),
        colleague.attest(KEY, "out2")._replace(output="out"),  # tampered: ignored
    ]
    summary = policy.summarize("out", attestations)
    assert summary.signers == (own.public_id, colleague.public_id, stranger.public_id)
    assert summary.trusted == (own.public_id, colleague.public_id)
    assert [a.output for a in summary.conflicts] == ["forged"]
    assert summary.describe() == "reproduced by 3 keys, 2 trusted; CONFLICT: other output forged"
    alone = TrustPolicy(None).summarize("out", [stranger.attest(KEY, "out")])
    assert alone.describe() == "attested by 1 key (not trusted)"


def test_trusted_keys_are_added_listed_and_removed(tmp_path: Path) -> None:
    keys = TrustedKeys(tmp_path / "trusted-keys.json")
    colleague = SigningKey.load_or_create(tmp_path / "c.key").public_id
    keys.add(colleague, "alice")
    assert keys.load() == {colleague: "alice"}
    with pytest.raises(UsageError, match="not a public key"):
        keys.add("ed25519:short")
    with pytest.raises(UsageError, match="names no trusted key"):
        keys.remove("bob")
    assert keys.remove("alice") == colleague
    assert keys.load() == {}
