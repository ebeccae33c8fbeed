"""A notebook shared as one bundle: everything its runs name, in one CAR file.

The bundle is one UnixFS directory, written with Kubo's `dag export` (a CAR file: every block
under the root, so it travels without a network) and read back with `dag import`:

    index.json          what each CID is (its roles), the records and the cells they came from
    notebook.ipynb      the executed notebook
    cache/KEY           each cacheable run's record, under its cache key (ResultCache.import_)
    attestations/KEY/   the attestations this node keeps for that computation
    records/CID         every record named, cacheable or not, and those of its lineage
    content/CID         rootfs, inputs (with and without the script), scripts, outputs, stdout
                        and stderr of every record
    composed/CID        the note of each directory made with ipfs-mkdir (lineage sees through)

Importing merges `cache/` and `attestations/` with the import's checks (signatures, keys),
so a bundle is trusted no more than a cache export: hits need a trusted key (docs/trust.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .cid import EMPTY_FILE_CID, IpfsPath, is_cid
from .errors import IpfsExecuteError, UsageError
from .lineage_graph import PRODUCED_BY_MANY
from .record import RunRecord
from .result_cache import ATTESTATIONS_DIR, COMPOSED_DIR, ImportReport, ResultCache
from .runner import Runner
from .trust import TrustPolicy
from .verification import records_in_notebook

BUNDLE_FORMAT = "ipfs-execute/bundle/1"
INDEX_NAME = "index.json"
NOTEBOOK_NAME = "notebook.ipynb"
# The roles a record gives the CIDs it names, in the order index.json lists them.
_RECORD_ROLES = ("rootfs", "input", "given_input", "script", "output", "stdout", "stderr")


@dataclass
class Collected:
    """What an executed notebook names, found through its records."""

    records: dict[str, RunRecord] = field(default_factory=dict)  # record CID -> record
    cells: dict[str, int] = field(default_factory=dict)  # record CID -> notebook cell
    roles: dict[str, set[str]] = field(default_factory=dict)  # content CID -> roles
    compositions: dict[str, str] = field(default_factory=dict)  # directory CID -> note CID

    def role(self, cid: str | None, role: str) -> None:
        if cid:
            self.roles.setdefault(cid, set()).add(role)


@dataclass(frozen=True)
class Shared:
    root: str  # the bundle's root directory CID
    car: Path | None  # the CAR file written, if any
    car_bytes: int
    records: int
    cids: int  # content CIDs (rootfs, inputs, outputs ...)
    attestations: int  # computations whose attestations travel with it
    pinned_remote: str | None = None  # the service asked to pin the root

    def describe(self) -> str:
        lines = [
            f"bundle {self.root}: {_plural(self.records, 'run record')}, "
            f"{_plural(self.cids, 'CID')} of content, attestations of "
            f"{_plural(self.attestations, 'computation')}"
        ]
        if self.car is not None:
            lines.append(f"wrote {self.car} ({self.car_bytes} bytes)")
        if self.pinned_remote:
            lines.append(f"pinning requested at {self.pinned_remote} (root {self.root})")
        return "\n".join(lines)


@dataclass(frozen=True)
class BundleImport:
    root: str
    report: ImportReport
    notebook: str | None  # CID of the notebook inside, if any
    notebook_name: str | None
    signers: tuple[tuple[str, bool], ...]  # (key, trusted here) of the records inside
    compositions: int

    def describe(self) -> str:
        report = self.report
        shown = f" ({self.notebook_name})" if self.notebook_name else ""
        lines = [
            f"imported bundle {self.root}{shown}: {report.added} cached runs "
            f"({report.already_present} already here, {len(report.rejected)} rejected), "
            f"{_plural(report.attestations, 'attestation')}, "
            f"{_plural(self.compositions, 'composition')}"
        ]
        for key, trusted in self.signers:
            lines.append(
                f"signed by {key}: "
                + ("trusted here" if trusted else f"not trusted (`ipfs-execute trust add {key}`)")
            )
        if self.notebook:
            lines.append(f"the notebook: ipfs-execute get {self.notebook} NOTEBOOK.ipynb")
        return "\n".join(lines)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _root_of(path: str | None) -> str | None:
    if not path:
        return None
    try:
        parsed = IpfsPath.parse(path)
    except IpfsExecuteError:
        return None
    return parsed.root if parsed.namespace == "ipfs" else None


def collect(results: ResultCache, notebook: Path) -> Collected:
    """Every record an executed notebook shows, the records behind their inputs (lineage),
    the content they name and the compositions they went through."""
    found = records_in_notebook(notebook)
    if not found:
        raise UsageError(f"{notebook}: no recorded runs in it (was it executed and saved?)")
    collected = Collected()
    pending: list[str] = []
    for cell, record_cid in found:
        collected.cells.setdefault(record_cid, cell)
        pending.append(record_cid)
    seen_sources: set[str] = set()

    def follow(cid: str | None) -> None:
        """A CID a run read: the run that made it, and the entries of a composition."""
        if not cid or cid in seen_sources or cid in PRODUCED_BY_MANY:
            return  # the empty directory's "producer" is whichever run made one last
        seen_sources.add(cid)
        earlier = results.record_for_output(cid)
        if earlier is not None and earlier.cid not in collected.records:
            pending.append(earlier.cid)
        note = results.store.mfs_hash(f"{COMPOSED_DIR}/{cid}")
        entries = results.composition(cid) if note is not None else None
        if note is not None and entries is not None:
            collected.compositions[cid] = note
            for name, source in entries.items():
                root = _root_of(source)
                collected.role(root, f"composed into {cid} as {name or '(base)'}")
                follow(root)

    while pending:
        record_cid = pending.pop(0)
        if record_cid in collected.records:
            continue
        try:
            record = results.load(record_cid)
        except IpfsExecuteError as error:
            where = collected.cells.get(record_cid)
            shown = f" (cell {where})" if where is not None else ""
            raise UsageError(
                f"record {record_cid}{shown} cannot be read on this node ({error}); share from "
                "the data directory that executed the notebook"
            ) from None
        collected.records[record_cid] = record
        for role in _RECORD_ROLES:
            collected.role(getattr(record, role), role)
        for source in (record.rootfs, record.given_input or record.input):
            follow(source)
        follow(_root_of(record.input_path))
    return collected


def build(results: ResultCache, notebook: Path, collected: Collected) -> tuple[str, int]:
    """The bundle's root directory (pinned) and how many computations' attestations it has."""
    store = results.store
    results.flush()
    entries: dict[str, str] = {}
    keys: dict[str, str] = {}  # cache key -> record CID
    for record_cid, record in collected.records.items():
        entries[f"records/{record_cid}"] = record_cid
        usable = record.cacheable and record.key and record.recomputed_key() == record.key
        # The notebook's own record wins over a lineage one of the same computation.
        if usable and record.key and (record.key not in keys or record_cid in collected.cells):
            keys[record.key] = record_cid
    for key, record_cid in keys.items():
        entries[f"cache/{key}"] = record_cid
    attested = 0
    for key in keys:
        directory = store.mfs_hash(f"{ATTESTATIONS_DIR}/{key}")
        if directory is not None:
            entries[f"attestations/{key}"] = directory
            attested += 1
    for cid in collected.roles:
        if cid != EMPTY_FILE_CID:  # no block to carry (and no node need hold one)
            entries[f"content/{cid}"] = cid
    for cid, note in collected.compositions.items():
        entries[f"composed/{cid}"] = note
    if not keys:
        entries["cache"] = store.empty_directory()  # import_ tells a bundle by its cache/
    index = {
        "format": BUNDLE_FORMAT,
        "notebook": notebook.name,
        "records": {
            cid: {
                "cell": collected.cells.get(cid),
                "key": record.key,
                "output": record.output,
                "signer": (record.attestation or {}).get("signer"),
            }
            for cid, record in collected.records.items()
        },
        "cids": {cid: sorted(roles) for cid, roles in sorted(collected.roles.items())},
        "compositions": dict(sorted(collected.compositions.items())),
    }
    entries[INDEX_NAME] = store.add_bytes(
        json.dumps(index, indent=1, sort_keys=True).encode(), name=INDEX_NAME
    )
    try:
        notebook_bytes = notebook.read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read {notebook}: {error.strerror or error}") from None
    entries[NOTEBOOK_NAME] = store.add_bytes(notebook_bytes, name=NOTEBOOK_NAME)
    return store.compose(entries), attested


def share(
    runner: Runner,
    notebook: Path,
    *,
    out: Path | None = None,
    pin_remote: str | None = None,
) -> Shared:
    """Bundle what an executed notebook names; write it as a CAR file (OUT, by default the
    notebook's name with .car beside it) and/or ask a remote pinning service to pin its root.

    With `pin_remote` and no `out`, no file is written: the service fetches the bundle from
    this node, which must be online (IPFS_EXECUTE_ONLINE=1) until it has.
    """
    notebook = notebook.expanduser()
    if not notebook.is_file():
        raise UsageError(f"{notebook}: no such notebook")
    collected = collect(runner.results, notebook)
    root, attested = build(runner.results, notebook, collected)
    car, size = None, 0
    if out is not None or pin_remote is None:
        car = out.expanduser() if out is not None else notebook.with_suffix(".car")
        if car.is_dir():
            car = car / notebook.with_suffix(".car").name
        size = runner.store.dag_export(root, car)
    if pin_remote is not None:
        runner.store.pin_remote(root, pin_remote, name=f"ipfs-execute bundle {notebook.name}")
    return Shared(
        root,
        car,
        size,
        len(collected.records),
        len(collected.roles),
        attested,
        pin_remote,
    )


def import_bundle(runner: Runner, car: Path | str) -> BundleImport:
    """Import a bundle's CAR (pinned), then merge its records and attestations into the result
    cache with the checks of a cache import; and its compositions, for lineage.

    `car` may also be the bundle's root CID (one pinned to a remote service): it is pinned
    here, which fetches it through the network (an online node).
    """
    store = runner.store
    path = Path(car).expanduser()
    root_cid = str(car).removeprefix("/ipfs/")
    if not path.is_file() and is_cid(root_cid):
        store.pin(root_cid)
        root = root_cid
    elif not path.is_file():
        raise UsageError(
            f"{car}: no such bundle (a .car file written by `ipfs-execute share`, or its root CID)"
        )
    else:
        root = store.dag_import(path)[0]
    top = {entry.name: entry for entry in store.ls(root)}
    if INDEX_NAME not in top or "cache" not in top:
        raise UsageError(
            f"{car}: its root {root} is not an ipfs-execute bundle (no {INDEX_NAME}); import a "
            "cache export with `ipfs-execute cache import CID`"
        )
    try:
        index = json.loads(store.cat(top[INDEX_NAME].cid))
        if index.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"format {index.get('format')!r}")
    except (ValueError, AttributeError) as error:
        raise UsageError(f"{car}: its {INDEX_NAME} is not a bundle index ({error})") from None
    report = runner.results.import_(root)
    compositions = 0
    if "composed" in top:
        for entry in store.ls(top["composed"].cid):
            if runner.results.composition(entry.name) is None:
                store.mfs_link(f"{COMPOSED_DIR}/{entry.name}", entry.cid)
                compositions += 1
    policy: TrustPolicy = runner.trust_policy
    signers = sorted(
        {
            str(info.get("signer"))
            for info in (index.get("records") or {}).values()
            if isinstance(info, dict) and info.get("signer")
        }
    )
    notebook = top.get(NOTEBOOK_NAME)
    return BundleImport(
        root,
        report,
        notebook.cid if notebook is not None else None,
        str(index.get("notebook") or "") or None,
        tuple((key, policy.trusts(key)) for key in signers),
        compositions,
    )
