"""The result cache: run records and their index, kept in the IPFS node itself.

Layout in the node's MFS (it survives daemon restarts, and `ipfs files ls /ipfs-execute` shows
it with the Kubo CLI):

    /ipfs-execute/cache/KEY        -> the record of a successful, pure run with that cache key
    /ipfs-execute/outputs/CID      -> the record of the run that produced output CID (lineage)

Records are small JSON files (UnixFS), so `ipfs cat RECORD` prints one. Sharing a cache is
sharing the CID of `/ipfs-execute/cache`: `export()` gives it, `import_()` merges someone
else's, checking that every entry's key really is the hash of its record.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Mapping
from typing import NamedTuple

from .cid import IpfsPath, is_cid, raw_leaf_cid
from .errors import InvalidPathError, IpfsError, UsageError
from .record import RunRecord
from .store import Store
from .trust import Attestation

INDEX_ROOT = "/ipfs-execute"
CACHE_DIR = f"{INDEX_ROOT}/cache"
OUTPUTS_DIR = f"{INDEX_ROOT}/outputs"
COMPOSED_DIR = f"{INDEX_ROOT}/composed"  # CID -> JSON {name: path} of an ipfs-mkdir directory
# KEY/NAME -> an attestation of the computation KEY beyond the one its cached record carries:
# a verifying re-run's, a colleague's record's, or one of another output (a conflict).
ATTESTATIONS_DIR = f"{INDEX_ROOT}/attestations"
_KEY = re.compile(r"^[0-9a-f]{64}$")
# A record up to this size is one raw block (the import's chunk size): its CID is known here.
RECORD_BLOCK_MAX_BYTES = 1024 * 1024


class StoredRecord(NamedTuple):
    record: RunRecord
    cid: str


class ImportReport(NamedTuple):
    added: int
    already_present: int
    rejected: tuple[str, ...]  # entry names that were not valid records for their key
    problems: tuple[str, ...] = ()  # one line a rejected entry or attestation: which, and why
    attestations: int = 0  # attestations kept beside the records


class ResultCache:
    def __init__(self, store: Store) -> None:
        self.store = store
        # Records are immutable: a key seen once in this process needs no second RPC.
        self._memo: dict[str, StoredRecord] = {}
        # Index entries are written in the background (two MFS round trips a run that the
        # caller need not wait for); every read of the index, and close, waits for them.
        self._pending: list[_IndexWrite] = []
        self._last: _IndexWrite | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        """Write what is pending."""
        self.flush()

    def __enter__(self) -> ResultCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self, *, strict: bool = False) -> None:
        """Wait until every record and index entry written so far is in the node.

        A failed index write loses no data (the output is pinned, the record too; at worst a
        later identical run is not recognised), so it does not fail whatever run comes next;
        `strict` (export) raises it. A record that could not be stored is said on stderr: its
        run's output is pinned, but the run must be run again to be recorded.
        """
        with self._lock:
            pending, self._pending = self._pending, []
        for write in pending:
            try:
                write.result()
            except IpfsError as error:
                if write.record_failed:
                    print(f"ipfs-execute: warning: {error}", file=sys.stderr)
                if strict:
                    raise

    def _link_later(self, links: list[tuple[str, str]], *, record: bytes | None = None) -> None:
        with self._lock:
            self._last = _IndexWrite(self.store, links, after=self._last, record=record)
            self._pending.append(self._last)

    # -- records ---------------------------------------------------------------------------

    def save(self, record: RunRecord, *, index: bool = True, cache: bool = True) -> str:
        """Store a record; index it by output (always) and by key (when cacheable).

        A record is one raw block: its CID is computed here and returned at once, and the
        record (pinned), then its index entries, are written in the background, in order, as
        one writer would: a run does not wait for its record's round trip. Every read through
        this cache, `close`, and the process's exit wait for them; a bigger record is stored
        before this returns. `index=False` only stores it (a verifier's re-run: the index keeps
        naming the run being checked, whatever the re-run gave); `cache=False` indexes it by
        output but leaves the cache entry of its key alone.
        """
        data = record.to_json().encode()
        if len(data) > RECORD_BLOCK_MAX_BYTES:
            cid = self.store.add_bytes(data, name="record.json", pin=True)
            unwritten = None
        else:
            cid, unwritten = raw_leaf_cid(data), data
        if not index:
            self._link_later([], record=unwritten)
            return cid
        links = []
        if record.output:
            links.append((f"{OUTPUTS_DIR}/{record.output}", cid))
        if cache and record.cacheable and record.key:
            links.append((f"{CACHE_DIR}/{record.key}", cid))
            self._memo[record.key] = StoredRecord(record, cid)
        self._link_later(links, record=unwritten)
        return cid

    def load(self, record_cid: str) -> RunRecord:
        self.flush()
        try:
            return RunRecord.from_json(self.store.cat(record_cid))
        except (ValueError, TypeError, UnicodeDecodeError):
            raise UsageError(f"{record_cid} is not an ipfs-execute run record") from None

    def lookup(self, key: str) -> StoredRecord | None:
        """The record cached under `key`, or None.

        An entry counts only when its record is a cacheable run that hashes to `key`: an entry
        naming another run's record (a forged or misfiled link) is a miss, and the run that
        follows writes the right entry over it.
        """
        memo = self._memo.get(key)
        if memo is not None:
            return memo
        self.flush()
        data = self.store.mfs_read(f"{CACHE_DIR}/{key}")
        if data is None:
            return None
        record = _parse_record(data)
        if record is None or not record.cacheable or record.key != key:
            return None
        if record.recomputed_key() != key:  # the entry names another run's record
            return None
        stored = StoredRecord(record, raw_leaf_cid(data))  # records are one small raw block
        self._memo[key] = stored
        return stored

    def record_for_output(self, output_cid: str) -> StoredRecord | None:
        """The record of the run that produced `output_cid`, or None (also when the entry
        names a record whose output is another CID)."""
        self.flush()
        data = self.store.mfs_read(f"{OUTPUTS_DIR}/{output_cid}")
        if data is None:
            return None
        record = _parse_record(data)
        if record is None or record.output != output_cid:
            return None
        return StoredRecord(record, raw_leaf_cid(data))

    def find(self, cid_or_path: str) -> StoredRecord:
        """A record given its own CID, or the CID of the output it produced."""
        self.flush()
        if not is_cid(cid_or_path.removeprefix("/ipfs/").split("/")[0]):
            raise InvalidPathError(f"{cid_or_path!r} is not a CID")
        cid = self.store.resolve(cid_or_path)
        by_output = self.record_for_output(cid)
        if by_output is not None:
            return by_output
        try:
            return StoredRecord(RunRecord.from_json(self.store.cat(cid)), cid)
        except (ValueError, TypeError, UnicodeDecodeError, IpfsError):
            raise UsageError(
                f"{cid} is neither a run record nor the output of a run recorded "
                "on this node (import the cache it came from, or give the record "
                "CID)"
            ) from None

    # -- compositions (ipfs-mkdir), so lineage can see through them ------------------------

    def compose(self, entries: Mapping[str, str], base: str | None = None) -> str:
        """A new directory of the given entries (CIDs or IPFS paths); remembered for lineage."""
        resolved = {name: self.store.resolve(str(path)) for name, path in entries.items()}
        cid = self.store.compose(resolved, base=base)
        sources = {name: str(IpfsPath.parse(str(path))) for name, path in entries.items()}
        if base:
            sources[""] = f"/ipfs/{base}"
        note = json.dumps(
            {"format": "ipfs-execute/composition/1", "entries": sources}, sort_keys=True
        ).encode()
        self._link_later(
            [(f"{COMPOSED_DIR}/{cid}", self.store.add_bytes(note, name="composition.json"))]
        )
        return cid

    def composition(self, cid: str) -> dict[str, str] | None:
        """{name: IPFS path} of a directory made by `compose`, or None."""
        self.flush()
        data = self.store.mfs_read(f"{COMPOSED_DIR}/{cid}")
        if data is None:
            return None
        try:
            entries = json.loads(data)["entries"]
        except (ValueError, KeyError, TypeError):
            return None
        return {str(k): str(v) for k, v in entries.items()}

    # -- sharing ---------------------------------------------------------------------------

    def entries(self) -> list[str]:
        self.flush()
        return [name for name in self.store.mfs_ls(CACHE_DIR) if _KEY.match(name)]

    def export(self) -> str:
        """The CID of the cache index and its attestations (pinned), to give to someone else:
        a directory of `cache/` (KEY -> record) and `attestations/` (KEY/NAME)."""
        self.flush(strict=True)
        parts = {}
        for name, path in (("cache", CACHE_DIR), ("attestations", ATTESTATIONS_DIR)):
            cid = self.store.mfs_hash(path)
            parts[name] = cid if cid is not None else self.store.empty_directory()
        exported = self.store.compose(parts)
        return exported

    # -- attestations ----------------------------------------------------------------------

    def attest(self, attestation: Attestation) -> None:
        """Keep an attestation of a computation beside its cached record."""
        if not attestation.valid():
            raise UsageError(f"the attestation by {attestation.signer} does not verify: not kept")
        cid = self.store.add_bytes(attestation.to_json(), name="attestation.json", pin=True)
        self._link_later([(f"{ATTESTATIONS_DIR}/{attestation.key}/{attestation.entry_name}", cid)])

    def attestations(self, key: str) -> list[Attestation]:
        """Every attestation this node knows of the computation `key` (not yet checked):
        the cached record's own, then those kept beside it."""
        self.flush()
        found = []
        stored = self.lookup(key)
        if stored is not None and stored.record.attestation:
            try:
                found.append(Attestation.from_dict(stored.record.attestation))
            except ValueError:
                pass
        for name in self.store.mfs_ls(f"{ATTESTATIONS_DIR}/{key}"):
            data = self.store.mfs_read(f"{ATTESTATIONS_DIR}/{key}/{name}")
            try:
                found.append(Attestation.from_json(data or b""))
            except ValueError:
                continue
        return found

    def import_(self, exported: str) -> ImportReport:
        """Merge an exported cache, with every attestation, whoever signed it.

        Each record is checked against its key, and a record that carries an attestation
        against it: a signature that does not verify, or one over another key or output (the
        record was edited after it was signed), rejects the entry. Trusting what was imported
        is the lookup's business (trust.TrustPolicy), not the import's.
        """
        root = self.store.resolve(exported)
        top = {entry.name: entry for entry in self.store.ls(root)}
        if "cache" in top and top["cache"].kind == "directory":
            records_root = top["cache"].cid
            attestations_root = top["attestations"].cid if "attestations" in top else None
        else:  # an export of an older version: the cache directory itself
            records_root, attestations_root = root, None
        present = set(self.entries())
        added = already = kept = 0
        rejected: list[str] = []
        problems: list[str] = []

        def reject(name: str, why: str) -> None:
            rejected.append(name)
            problems.append(f"{name}: {why}")

        for entry in self.store.ls(records_root):
            if not _KEY.match(entry.name) or entry.kind != "file":
                reject(entry.name, "not a cache key naming a record file")
                continue
            if entry.name in present:
                already += 1
                continue
            try:
                record_bytes = self.store.cat(entry.cid)
                record = RunRecord.from_json(record_bytes)
            except (ValueError, TypeError, UnicodeDecodeError):
                reject(entry.name, f"{entry.cid} is not a run record")
                continue
            problem = _attestation_problem(record, entry.name)
            if problem is not None:
                reject(entry.name, f"record {entry.cid}: {problem}")
                continue
            if record.recomputed_key() != entry.name or not record.cacheable:
                reject(entry.name, f"record {entry.cid} is not a cacheable run with this key")
                continue
            # Stored again here with our import settings: then its CID is the raw-leaf CID of its
            # bytes, as for every record made here (lookups compute it without a round trip).
            local = self.store.add_bytes(record_bytes, name="record.json", pin=True)
            self.store.mfs_link(f"{CACHE_DIR}/{entry.name}", local)
            # This node's own lineage of an output is never replaced by someone else's.
            if record.output and self.store.mfs_read(f"{OUTPUTS_DIR}/{record.output}") is None:
                self.store.mfs_link(f"{OUTPUTS_DIR}/{record.output}", local)
            added += 1
        if attestations_root is not None:
            for key_entry in self.store.ls(attestations_root):
                if not _KEY.match(key_entry.name) or key_entry.kind != "directory":
                    continue
                for item in self.store.ls(key_entry.cid):
                    try:
                        attestation = Attestation.from_json(self.store.cat(item.cid))
                    except ValueError as error:
                        problems.append(f"attestation {key_entry.name}/{item.name}: {error}")
                        continue
                    if attestation.key != key_entry.name or not attestation.valid():
                        problems.append(
                            f"attestation {key_entry.name}/{item.name} by {attestation.signer}: "
                            "its signature does not verify for this key and output; not kept"
                        )
                        continue
                    self.attest(attestation)
                    kept += 1
        self.flush()
        return ImportReport(added, already, tuple(rejected), tuple(problems), kept)


class _IndexWrite:
    """One batch of index links, written in a thread of its own once the batch before it is
    (in order, as one writer would). A plain thread: importing concurrent.futures (and
    logging) cost a CLI run about 5 ms. Not a daemon thread: an exit waits for the write."""

    def __init__(
        self,
        store: Store,
        links: list[tuple[str, str]],
        after: _IndexWrite | None,
        record: bytes | None = None,
    ) -> None:
        self.error: BaseException | None = None
        self.record_failed = False  # the error is the record's own, not an index link's
        self._thread = threading.Thread(
            target=self._write, args=(store, links, after, record), name="index-writer"
        )
        self._thread.start()

    def _write(
        self,
        store: Store,
        links: list[tuple[str, str]],
        after: _IndexWrite | None,
        record: bytes | None,
    ) -> None:
        if after is not None:
            after._thread.join()
        try:
            if record is not None:  # first: the links name it
                self.record_failed = True
                expected = raw_leaf_cid(record)
                try:
                    stored = store.add_bytes(record, name="record.json", pin=True)
                except IpfsError as error:
                    raise IpfsError(
                        f"the run record {expected} could not be stored ({error}); its run's "
                        "output is pinned: run it again to record it"
                    ) from None
                if stored != expected:
                    raise IpfsError(
                        f"the IPFS daemon at {store.api} stored a run record as {stored}, not "
                        f"{expected}: report this with `ipfs version --all`"
                    )
                self.record_failed = False
            for path, target in links:
                store.mfs_link(path, target)
        except BaseException as error:  # handed to whoever waits for it
            self.error = error

    def result(self) -> None:
        """Wait for the write; raise what it raised."""
        self._thread.join()
        if self.error is not None:
            raise self.error


def _parse_record(data: bytes) -> RunRecord | None:
    """A run record from an index entry's bytes, or None when they are not one."""
    try:
        return RunRecord.from_json(data)
    except (ValueError, TypeError, UnicodeDecodeError):
        return None


def _attestation_problem(record: RunRecord, key: str) -> str | None:
    """Why a record's own attestation disproves it, or None (also when it carries none)."""
    if record.attestation is None:
        return None
    try:
        attestation = Attestation.from_dict(record.attestation)
    except ValueError as error:
        return f"its attestation is malformed ({error})"
    if attestation.key != key:
        return f"its attestation by {attestation.signer} is for another computation"
    if record.recomputed_key() != key or attestation.output != record.output:
        return (
            f"it was edited after {attestation.signer} signed it (the signature is over key "
            f"{key[:12]}... and output {attestation.output}; the record no longer says that)"
        )
    if not attestation.valid():
        return f"its signature by {attestation.signer} does not verify: it was tampered with"
    return None
