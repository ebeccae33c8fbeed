"""Runner.run(request) -> RunResult: resolve, look up the cache, stage, run, add /output, record.

The one run path every front end calls: the CLI, the Python API and the notebook magic (and the
verifier, with other RunConditions).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import os
import secrets
import stat
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from . import __version__, sandbox
from .cid import EMPTY_DIRECTORY_CID, EMPTY_FILE_CID, IpfsPath, check_codecs
from .errors import IpfsError, OutputNotSavedError, UsageError
from .record import SCRIPT_DIR, SCRIPT_PATH, RunRecord, RunRequest, cache_key
from .result import TAIL_BYTES, RunResult, StreamTail
from .result_cache import ResultCache, StoredRecord
from .settings import Limits, Settings, check_home
from .store import AddProgress, AddProgressCallback, ComposedFile, PendingWrite, Store
from .trust import (
    Attestation,
    SigningKey,
    TrustedKeys,
    TrustPolicy,
    TrustSummary,
    parse_key_id,
)

if TYPE_CHECKING:
    from .staging import ProgressCallback
    from .staging_cache import StagingCache

OutputCallback = Callable[[bytes], None]


def sandbox_profile(request: RunRequest) -> dict[str, Any]:
    """What the payload sees of the sandbox, beyond its files: part of the cache key."""
    # A fresh dict each time (it goes into records), from one rendering per set of limits.
    return dict(json.loads(_profile_text(request.limits)))


@functools.lru_cache(maxsize=64)
def _profile_text(limits: Limits) -> str:
    return json.dumps(sandbox.payload_view(limits).profile(), sort_keys=True)


@dataclass(frozen=True)
class RunConditions:
    """How a run is carried out beyond its request: the result-cache policy and the
    conditions a verifier varies on purpose. The defaults are an ordinary run."""

    use_cache: bool = True  # False: run even when an identical run is recorded
    # False: store the record without indexing it by output and key (a verifier's re-run:
    # lineage and the cache keep naming the run being checked, whatever the re-run gave).
    index: bool = True
    # Show the payload its rootfs and input through a view that lists directories in a new
    # random order (exposes order dependence).
    shuffle_directories: bool = False
    clock_start_s: float | None = None  # where the payload's monotonic clock starts (None: default)
    staging_dir: Path | None = None  # stage into this directory instead of the staging cache


ORDINARY = RunConditions()


class ResolvedRequest(NamedTuple):
    """A request's paths resolved to CIDs, and its cache key (before any staging)."""

    rootfs_path: IpfsPath
    input_path: IpfsPath | None
    rootfs: str
    given_input: str  # the input as given (the empty directory when none)
    input: str  # what the payload sees: the given input with the script
    script: str | None
    argv: tuple[str, ...]
    key: str
    # The script's blocks being stored (resolve with write_behind), else None.
    written: PendingWrite | None = None


class SettledRun(NamedTuple):
    """A run that has ended, signed and recorded (`Runner._settle`)."""

    record: RunRecord  # signed with this data directory's key when cacheable
    record_cid: str | None
    disagreement: str | None  # how it differs from the cached result of its key, if it does
    trust: str | None  # who attests its output


class Runner:
    """Holds what is worth keeping between runs: the store connection and the caches."""

    def __init__(self, settings: Settings | None = None, store: Store | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self._store = store
        self._staging_cache: StagingCache | None = None  # made at the first run
        self._results: ResultCache | None = None
        self._sandbox_checked = False
        # (input, script hash) -> input with the script: composing costs several RPCs.
        self._scripted_inputs: dict[tuple[str, str], ComposedFile] = {}
        self._script_bases: set[str] = set()  # inputs known to take a script
        self._signing_key: SigningKey | None = None
        self._trust_policy: TrustPolicy | None = None
        # The peer ID records name as the node that ran them: set on a cluster worker.
        self.node: str | None = None
        self._areas: sandbox.OutputAreaPool | None = None  # made at the first run

    @property
    def staging_cache(self) -> StagingCache:
        # Staging's modules load when something is staged: a cache hit needs none of them.
        if self._staging_cache is None:
            from .staging_cache import StagingCache

            self._staging_cache = StagingCache(
                self.settings.staging_dir, limit_bytes=self.settings.staging_limit_bytes
            )
        return self._staging_cache

    @property
    def store(self) -> Store:
        if self._store is None:
            if self.settings.api is None:
                check_home(self.settings)  # the embedded node lives there
            self._store = Store.connect(self.settings)
        return self._store

    @property
    def _output_areas(self) -> sandbox.OutputAreaPool:
        """Where runs get their /output (not made for a cache hit: it loads the sandbox)."""
        if self._areas is None:
            from .staging_cache import remove_tree

            # Nothing in it refers back to the runner: the finalizer must not keep it alive.
            self._areas = sandbox.OutputAreaPool(
                functools.partial(_new_run_dir, self.settings),
                remove_tree,
                self.settings.output_templates_dir,
            )
            # An area made ahead for a run that never came goes with the runner, or at exit.
            weakref.finalize(self, self._areas.close)
        return self._areas

    @property
    def results(self) -> ResultCache:
        """The result cache and run index, kept in the node."""
        if self._results is None:
            self._results = ResultCache(self.store)
        return self._results

    def close(self) -> None:
        if self._areas is not None:
            self._areas.close()
        if self._results is not None:
            self._results.close()
        if self._store is not None:
            self._store.close()
            self._store = None
            self._results = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the run ---------------------------------------------------------------------------

    def run(
        self,
        request: RunRequest,
        conditions: RunConditions = ORDINARY,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> RunResult:
        """Run a request, or return the recorded result of an identical earlier run.

        The one run path of every front end. What the payload prints goes to the callbacks as
        it comes; on a cache hit, what the recorded run printed is replayed through them, so a
        hit reads like the run it stands for.
        """
        t0 = time.monotonic()
        # The script's blocks are stored while the run stages and starts; waited for before
        # anything relies on them, and before this returns.
        resolved = self.resolve(request, write_behind=True)
        try:
            result = self._run_resolved(
                request, conditions, resolved, t0, on_stdout, on_stderr, on_progress
            )
        except BaseException:
            if resolved.written is not None:
                resolved.written.join()  # its error, if any, is not what the caller hears
            raise
        self._script_written(resolved.written)
        return result

    def _run_resolved(
        self,
        request: RunRequest,
        conditions: RunConditions,
        resolved: ResolvedRequest,
        t0: float,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        on_progress: ProgressCallback | None,
    ) -> RunResult:
        rootfs_path, input_path = resolved.rootfs_path, resolved.input_path
        rootfs_cid, given_input = resolved.rootfs, resolved.given_input
        input_cid, script_cid = resolved.input, resolved.script
        argv, key = resolved.argv, resolved.key
        resolve_s = time.monotonic() - t0

        cached = self.results.lookup(key) if not request.interactive else None
        cached_trust = self._trust_of(cached) if cached is not None else None
        if cached is not None and cached_trust is not None and conditions.use_cache:
            if cached_trust.trusted:
                return self._replay(cached, on_stdout, on_stderr, cached_trust)
            if self.settings.trust_any:
                note = (
                    f"served on the word of untrusted keys only ({cached_trust.describe()}): "
                    f"check it with `ipfs-execute verify {cached.cid}`"
                )
                return self._replay(cached, on_stdout, on_stderr, cached_trust, note=note)
        # Not trusted: the run executes, and its own (trusted) record becomes the answer.
        stdout, stderr = _Capture(on_stdout), _Capture(on_stderr)
        record = self._execute(
            request,
            conditions,
            argv=argv,
            key=key,
            rootfs_cid=rootfs_cid,
            input_cid=input_cid,
            given_input=given_input if script_cid else None,
            script_cid=script_cid,
            rootfs_path=_lineage_path(rootfs_path, rootfs_cid),
            input_path=_lineage_path(input_path, given_input) if input_path else None,
            t0=t0,
            resolve_s=resolve_s,
            stdout=stdout,
            stderr=stderr,
            on_progress=on_progress,
            written=resolved.written,
        )
        settled = self._settle(record, cached, cached_trust, conditions)
        return RunResult(
            settled.record,
            stdout.value(),
            stderr.value(),
            store=self.store,
            record_cid=settled.record_cid,
            disagreement=settled.disagreement,
            trust=settled.trust,
        )

    def _settle(
        self,
        record: RunRecord,
        cached: StoredRecord | None,
        cached_trust: TrustSummary | None,
        conditions: RunConditions,
    ) -> SettledRun:
        """Sign a run that has just ended (here or on a cluster worker), store and index its
        record, and weigh it against the cache's record of its key (`cached`, None when there
        is none): a disagreeing run never replaces a trusted cached result, and says so."""
        if record.cacheable and record.output and record.key:
            attestation = self.signing_key.attest(record.key, record.output)
            record = replace(record, attestation=attestation.to_dict())
        # Not trusted: this run's own (trusted) record becomes the answer.
        untrusted = cached is not None and cached_trust is not None and not cached_trust.trusted
        disagrees = (
            cached is not None and record.succeeded and cached.record.output != record.output
        )
        # A disagreeing forced run does not replace a trusted cached result: the first one
        # recorded stays the answer, and the disagreement is reported instead of hidden. An
        # untrusted one is replaced by this run's, and kept beside it as the other's word.
        record_cid = (
            self.results.save(record, index=conditions.index, cache=untrusted or not disagrees)
            if record.output
            else None
        )
        if cached is not None and conditions.index and record.cacheable and record.output:
            if untrusted and cached.record.attestation:
                self._keep_attestation(cached.record.attestation)
            elif disagrees and not untrusted and record.attestation:
                self._keep_attestation(record.attestation)  # a conflict, on the record
        disagreement = None
        if disagrees and cached is not None and untrusted and cached_trust is not None:
            signers = ", ".join(cached_trust.signers) or "no key"
            disagreement = (
                f"CONFLICT: the cached record {cached.cid}, attested by {signers} (not "
                f"trusted here), says output {cached.record.output}; this run gave "
                f"{record.output}. The untrusted result was not used"
            )
        elif disagrees and cached is not None:
            disagreement = (
                f"this run's output {record.output} differs from the cached output "
                f"{cached.record.output} of the same computation (record "
                f"{cached.cid}, run {cached.record.started_at}): it is not "
                f"deterministic; `ipfs-execute verify {record_cid}` shows the "
                "differing files"
            )
        trust = None
        if record.attestation is not None and record.output:
            known = [Attestation.from_dict(record.attestation)]
            if untrusted and cached is not None and cached.record.attestation:
                known.append(Attestation.from_dict(cached.record.attestation))
            trust = self.trust_policy.summarize(record.output, known).describe()
        return SettledRun(record, record_cid, disagreement, trust)

    def resolve(self, request: RunRequest, *, write_behind: bool = False) -> ResolvedRequest:
        """The request's content CIDs (the script added to the input) and its cache key.
        `write_behind`: the script's blocks may still be being stored when this returns
        (`.written`); the caller waits for them (`_script_written`)."""
        rootfs_path = IpfsPath.parse(request.rootfs)  # syntax errors before any daemon contact
        input_path = IpfsPath.parse(request.input) if request.input else None
        rootfs_cid = self.store.resolve(rootfs_path)
        given_input = self.store.resolve(input_path) if input_path else EMPTY_DIRECTORY_CID
        check_codecs(rootfs_cid, given_input)
        input_cid, script_cid, written = given_input, None, None
        if request.script is not None:
            input_cid, script_cid, written = self._add_script(given_input, request.script)
            if not write_behind:
                self._script_written(written)
                written = None
        argv = request.argv()
        key = cache_key(
            rootfs=rootfs_cid,
            input=input_cid,
            argv=argv,
            env=request.env(sandbox.DEFAULT_ENV),
            sandbox=sandbox_profile(request),
        )
        return ResolvedRequest(
            rootfs_path,
            input_path,
            rootfs_cid,
            given_input,
            input_cid,
            script_cid,
            argv,
            key,
            written,
        )

    # -- trust -----------------------------------------------------------------------------

    @property
    def signing_key(self) -> SigningKey:
        """This data directory's key, made on first use."""
        if self._signing_key is None:
            self._signing_key = SigningKey.load_or_create(self.settings.signing_key_path)
        return self._signing_key

    def reload_trust(self) -> None:
        """Read the trusted keys again at the next lookup (they were changed)."""
        self._trust_policy = None

    @property
    def trust_policy(self) -> TrustPolicy:
        if self._trust_policy is None:
            trusted = {
                *TrustedKeys(self.settings.trusted_keys_path).load(),
                *(parse_key_id(key) for key in self.settings.trusted_keys),
            }
            self._trust_policy = TrustPolicy(
                SigningKey.public_id_at(self.settings.signing_key_path),
                trusted,
                trust_any=self.settings.trust_any,
            )
        return self._trust_policy

    def _trust_of(self, cached: StoredRecord) -> TrustSummary:
        """Who attests a cached result: its record's own attestation first (no round trip),
        then, only when that is not a trusted key's, every attestation kept for it."""
        output = cached.record.output or ""
        known: list[Attestation] = []
        if cached.record.attestation:
            try:
                known.append(Attestation.from_dict(cached.record.attestation))
            except ValueError:
                pass
        # The index holds only records signed here or verified on import: no need to verify
        # the signature again on the hit path (that would load cryptography on every hit).
        known = [a for a in known if a.key == cached.record.key and a.output == output]
        summary = self.trust_policy.summarize(output, known, checked=True)
        if summary.trusted or cached.record.key is None:
            return summary
        return self.trust_policy.summarize(output, self.results.attestations(cached.record.key))

    def _keep_attestation(self, attestation: dict[str, str]) -> None:
        try:
            self.results.attest(Attestation.from_dict(attestation))
        except (ValueError, UsageError):
            pass  # an attestation that does not verify is worth nothing to keep

    def _replay(
        self,
        cached: StoredRecord,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        trust: TrustSummary,
        *,
        note: str | None = None,
    ) -> RunResult:
        """The result of a cache hit, its recorded output printed again through the callbacks."""
        printed = []
        for cid, forward in ((cached.record.stdout, on_stdout), (cached.record.stderr, on_stderr)):
            data = b""
            if cid and cid != EMPTY_FILE_CID:
                try:
                    data = self.store.cat(cid)
                except IpfsError:
                    pass  # the output is what counts: a hit stays a hit
            if data and forward is not None:
                forward(data)
            printed.append(data)
        return RunResult(
            cached.record,
            printed[0],
            printed[1],
            store=self.store,
            record_cid=cached.cid,
            cache_hit=True,
            trust=trust.describe(),
            trust_note=note,
        )

    def _execute(
        self,
        request: RunRequest,
        conditions: RunConditions,
        *,
        argv: tuple[str, ...],
        key: str,
        rootfs_cid: str,
        input_cid: str,
        given_input: str | None,
        script_cid: str | None,
        rootfs_path: str,
        input_path: str | None,
        t0: float,
        resolve_s: float,
        stdout: _Capture,
        stderr: _Capture,
        on_progress: ProgressCallback | None,
        written: PendingWrite | None,
    ) -> RunRecord:
        from . import staging
        from .staging_cache import StagingCache

        started_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")
        durations: dict[str, float] = {"resolve": resolve_s}
        if not self._sandbox_checked:
            check_home(self.settings)  # before anything is staged there
            sandbox.check_available(self.settings.home)  # remembered there: no probe next time
            sandbox.remember_filters_in(self.settings.home)  # the seccomp program, the same way
            self._sandbox_checked = True

        # Held until the sandbox has ended: an entry a run uses is never evicted.
        with contextlib.ExitStack() as in_use:
            staging_cache = (
                self.staging_cache
                if conditions.staging_dir is None
                else StagingCache(conditions.staging_dir)
            )
            stager = staging.Stager(self.store, staging_cache, on_progress=on_progress)
            in_use.enter_context(staging_cache.use("rootfs", rootfs_cid))
            rootfs = stager.stage_rootfs(rootfs_cid)
            durations["stage_rootfs"] = rootfs.seconds

            # Its own size-limited file system when root may make one (sandbox/output_area.py).
            output = self._output_areas.take(request.limits)
            keep_output = False
            try:
                script_dir = None
                if script_cid is not None and request.script is not None:
                    # Written beside /output, not fetched: the script's directory in the input
                    # is exactly this one file (add_script), with a staged tree's modes and times.
                    script_dir = output.write_script(
                        SCRIPT_PATH.rpartition("/")[2],
                        request.script.encode(),
                        sandbox.SOURCE_DATE_EPOCH,
                    )
                # A shuffled view shows one directory tree: the input is staged whole for it.
                staged_input = stager.stage_input(
                    input_cid,
                    hold=in_use,
                    by_parts=not conditions.shuffle_directories,
                    base=given_input if script_cid else None,
                    script_dir=script_dir,
                )
                durations["stage_input"] = staged_input.seconds
                output_dir = output.path
                with contextlib.ExitStack() as views:
                    rootfs_dir, input_dir = rootfs.path, staged_input.path
                    if conditions.shuffle_directories:
                        rootfs_dir = views.enter_context(staging.shuffled_view(rootfs_dir))
                        input_dir = views.enter_context(staging.shuffled_view(input_dir))
                    spec = sandbox.SandboxSpec(
                        rootfs=rootfs_dir,
                        input_dir=input_dir,
                        input_parts=staged_input.parts,
                        output_dir=output_dir,
                        argv=argv,
                        limits=request.limits,
                        interactive=request.interactive,
                        env=request.env(sandbox.DEFAULT_ENV),
                        clock_start_s=(
                            sandbox.CLOCK_START_S
                            if conditions.clock_start_s is None
                            else conditions.clock_start_s
                        ),
                    )
                    t_run = time.monotonic()
                    if on_progress is not None:
                        on_progress(staging.PHASE_RUNNING, 0, None)
                    result = sandbox.run_sandbox(spec, on_stdout=stdout, on_stderr=stderr)
                    durations["sandbox"] = time.monotonic() - t_run

                # From here on the output exists: it is kept on disk until it is safely in IPFS.
                keep_output = True
                t_add = time.monotonic()
                try:
                    self._script_written(written)  # stored while the sandbox ran
                    # Root reads whatever the payload left, whatever its modes.
                    if os.geteuid() != 0:
                        _make_readable(output_dir)
                    added = self.store.add_tree(
                        output_dir, pin=True, on_progress=_adding(on_progress)
                    )
                    stdout_cid = self._add_printed(stdout.value(), "stdout")
                    stderr_cid = self._add_printed(stderr.value(), "stderr")
                except IpfsError as error:
                    kept = self._keep(output)
                    raise OutputNotSavedError(
                        f"the run finished (exit status {result.exit_status}) "
                        f"but adding its output to IPFS failed: {error}",
                        str(kept),
                    ) from None
                except BaseException:
                    # Ctrl-C (or anything else) during the add: the output is not lost, and the
                    # user is told where it is before the interrupt goes on.
                    kept = self._keep(output)
                    print(
                        f"ipfs-execute: the run's output was not added to IPFS; it is kept at "
                        f"{kept} (add it later with: ipfs-execute add {kept})",
                        file=sys.stderr,
                        flush=True,
                    )
                    raise
                output_cid = added.cid
                durations["add_output"] = time.monotonic() - t_add
                keep_output = False
            finally:
                if keep_output:
                    if output.image is not None:
                        self._keep(output)  # interrupted: an image cannot stay mounted
                    output.release()
                else:
                    # Released, and its run directory removed (in the background once the
                    # process has run more than once: sandbox/output_pool.py).
                    self._output_areas.give_back(output, request.limits)
        durations["total"] = time.monotonic() - t0

        return RunRecord(
            rootfs=rootfs_cid,
            input=input_cid,
            output=output_cid,
            args=argv[1:],
            exit_status=result.exit_status,
            timed_out=result.timed_out,
            started_at=started_at,
            durations={k: round(v, 6) for k, v in durations.items()},
            limits=asdict(request.limits),
            limits_enforced=dict(result.limits_enforced),
            versions=self.versions(),
            staged_from_cache={"rootfs": rootfs.was_cached, "input": staged_input.was_cached},
            given_input=given_input,
            script=script_cid,
            rootfs_path=rootfs_path,
            input_path=input_path,
            env=dict(spec.env),
            sandbox=sandbox_profile(request),
            limits_not_enforced=dict(result.limits_not_enforced),
            determinism=dict(result.determinism),
            determinism_not_fixed=dict(result.determinism_not_fixed),
            key=key,
            stdout=stdout_cid,
            stderr=stderr_cid,
            output_truncated=stdout.truncated or stderr.truncated,
            pure=not request.interactive,
            killed_by=result.killed_by,
            output_warnings=[f"/output/{entry}" for entry in added.left_out],
            params=dict(request.params),
            node=self.node,
        )

    def _add_printed(self, data: bytes, name: str) -> str:
        # Most payloads print nothing on one of the streams: no round trip for that.
        return EMPTY_FILE_CID if not data else self.store.add_bytes(data, name=name)

    # -- helpers ---------------------------------------------------------------------------

    def add_script(self, input_cid: str, script: str) -> tuple[str, str]:
        """A new input: `input_cid` plus the script at SCRIPT_PATH. Returns (input, script) CIDs."""
        composed = self._add_script(input_cid, script)
        self._script_written(composed.written)
        return composed.directory, composed.file

    def _script_written(self, written: PendingWrite | None) -> None:
        """Wait for a script's blocks to be stored; forget the composition if they were not
        (the next run with that script composes it again)."""
        if written is None:
            return
        try:
            written.wait()
        except Exception:
            # Other threads may add meanwhile (`--each` runs share a runner): a copy is walked.
            for key, composed in list(self._scripted_inputs.items()):
                if composed.written is written:
                    self._scripted_inputs.pop(key, None)
            raise

    def _add_script(self, input_cid: str, script: str) -> ComposedFile:
        """add_script, its blocks maybe still being stored (`.written`)."""
        memo_key = (input_cid, hashlib.sha256(script.encode()).hexdigest())
        if memo_key in self._scripted_inputs:
            return self._scripted_inputs[memo_key]
        if input_cid not in self._script_bases:  # facts about a CID: checked once
            from .staging import check_input_is_directory

            check_input_is_directory(self.store, input_cid)
            # Its names from its root block: `ls` would read each entry's block too (a data
            # set of a hundred big directories: tens of ms).
            links = self.store.directory_links(input_cid)
            names = (
                [name for name, _ in links]
                if links is not None
                else [entry.name for entry in self.store.ls(input_cid)]
            )
            if SCRIPT_DIR in names:
                raise UsageError(
                    f"input {input_cid} already has a {SCRIPT_DIR}/ entry, the name "
                    "reserved for the cell's script: rename it in your input"
                )
            self._script_bases.add(input_cid)
        composed = self.store.add_file_behind(input_cid, SCRIPT_PATH, script.encode())
        self._scripted_inputs[memo_key] = composed
        return composed

    def versions(self) -> dict[str, str]:
        system = os.uname()  # what platform.release() and .machine() say, without its import
        return {
            "ipfs-execute": __version__,
            "kubo": self.store.version(),
            "bwrap": sandbox.bwrap_version(),
            "kernel": system.release,
            "machine": system.machine,
        }

    def _keep(self, output: sandbox.OutputArea) -> Path:
        kept_root = _private_dir(self.settings.kept_outputs_dir)
        kept = kept_root / output.path.parent.name
        output.keep(kept)
        from .staging_cache import remove_tree

        remove_tree(output.path.parent)
        return kept


def _new_run_dir(settings: Settings) -> Path:
    # Private all the way down: the sandbox reaches its directories through binds made for
    # it (sandbox.PrivateBinds), so no other host user needs to traverse any of them.
    _private_dir(settings.home)
    runs = _private_dir(settings.runs_dir)
    sandbox.release_stale_outputs(runs)
    path = runs / f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    return path


class _Capture(StreamTail):
    """Forwards a stream and keeps its tail for the record; knows whether it cut anything."""

    def __init__(self, forward: OutputCallback | None) -> None:
        super().__init__(forward)
        self.total = 0

    def __call__(self, chunk: bytes) -> None:
        self.total += len(chunk)
        super().__call__(chunk)

    @property
    def truncated(self) -> bool:
        return self.total > TAIL_BYTES


def _private_dir(path: Path) -> Path:
    """`path` as a directory only its owner can enter, made (with its parents) if need be.

    In-progress outputs and staged inputs are nobody else's business. A directory of another
    owner is left as it is: the tool never changes what it does not own.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(stat.S_IMODE(info.st_mode) & 0o700)
    return path


def _make_readable(root: Path) -> None:
    """Give the owner read (and search) access to everything a payload left in /output.

    A payload may `chmod 000` its files; as an ordinary user the tool cannot read them then,
    and the output could never be added. Symlinks are left alone (never followed).
    """
    pending = [str(root)]
    while pending:
        folder = pending.pop()
        try:
            os.chmod(folder, stat.S_IMODE(os.lstat(folder).st_mode) | 0o700)
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
                        if mode & 0o400 == 0:
                            os.chmod(entry.path, mode | 0o400)
        except OSError:
            continue  # add_path reports whatever is still unreadable


def _adding(on_progress: ProgressCallback | None) -> AddProgressCallback | None:
    """The add of /output reported as the phase PHASE_ADDING_OUTPUT: (files sent, total)."""
    if on_progress is None:
        return None  # and the add keeps its shortcut for an empty /output
    from .staging import PHASE_ADDING_OUTPUT

    callback = on_progress

    def report(progress: AddProgress) -> None:
        callback(PHASE_ADDING_OUTPUT, progress.files, progress.files_total)

    return report


def _lineage_path(path: IpfsPath, resolved: str) -> str:
    """An /ipfs/ path whose root is the CID the content came from (IPNS resolved)."""
    if path.namespace == "ipfs":
        return str(path)
    return f"/ipfs/{resolved}"


__all__ = ["ORDINARY", "ResolvedRequest", "RunConditions", "Runner", "sandbox_profile"]
