"""run(request) -> record: resolve, stage, run in the sandbox, add /output, record.

The one function every front end calls: the CLI, the Python API and the notebook magic.
"""

from __future__ import annotations

import datetime as _dt
import platform
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from . import __version__, sandbox
from .cache import ContentCache, remove_tree
from .errors import IpfsError, OutputNotSavedError, UsageError
from .record import SCRIPT_DIR, SCRIPT_PATH, RunRecord, RunRequest
from .result import RunResult, StreamTail
from .settings import Settings
from .staging import EMPTY_DIRECTORY_CID, ProgressCallback, Stager
from .store import IpfsPath, Store

OutputCallback = Callable[[bytes], None]


class Runner:
    """Holds what is worth keeping between runs: the store connection and the cache."""

    def __init__(self, settings: Settings | None = None, store: Store | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self._store = store
        self.cache = ContentCache(self.settings.cache_dir)
        self._sandbox_checked = False

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.connect(self.settings)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def resolve_input(self, text: str | None) -> str:
        if text is None or text == "":
            return EMPTY_DIRECTORY_CID
        return self.store.resolve(IpfsPath.parse(text))

    def run(self, request: RunRequest, *, on_stdout: OutputCallback | None = None,
            on_stderr: OutputCallback | None = None,
            on_progress: ProgressCallback | None = None) -> RunRecord:
        started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
        t0 = time.monotonic()
        durations: dict[str, float] = {}

        if not self._sandbox_checked:
            sandbox.check_available()
            self._sandbox_checked = True

        rootfs_path = IpfsPath.parse(request.rootfs)  # syntax errors before any daemon contact
        input_path = IpfsPath.parse(request.input) if request.input else None
        rootfs_cid = self.store.resolve(rootfs_path)
        given_input = self.store.resolve(input_path) if input_path else EMPTY_DIRECTORY_CID
        input_cid, script_cid = given_input, None
        if request.script is not None:
            input_cid, script_cid = self.add_script(given_input, request.script)
        durations["resolve"] = time.monotonic() - t0

        stager = Stager(self.store, self.cache, on_progress=on_progress)
        rootfs = stager.stage_rootfs(rootfs_cid)
        durations["stage_rootfs"] = rootfs.seconds
        staged_input = stager.stage_input(input_cid)
        durations["stage_input"] = staged_input.seconds

        run_dir = self._new_run_dir()
        output_dir = run_dir / "output"
        output_dir.mkdir(mode=0o755)
        keep_output = False
        try:
            spec = sandbox.SandboxSpec(rootfs=rootfs.path, input_dir=staged_input.path,
                                       output_dir=output_dir, argv=request.argv(),
                                       limits=request.limits, interactive=request.interactive)
            t_run = time.monotonic()
            result = sandbox.run_sandbox(spec, on_stdout=on_stdout, on_stderr=on_stderr)
            durations["sandbox"] = time.monotonic() - t_run

            # From here on the output exists: it is kept on disk until it is safely in IPFS.
            keep_output = True
            t_add = time.monotonic()
            try:
                output_cid = self.store.add_path(output_dir, pin=True)
            except IpfsError as error:
                kept = self._keep(output_dir)
                raise OutputNotSavedError(f"the run finished (exit status {result.exit_status}) "
                                          f"but adding its output to IPFS failed: {error}",
                                          str(kept)) from None
            durations["add_output"] = time.monotonic() - t_add
            keep_output = False
        finally:
            if not keep_output:
                remove_tree(run_dir)
        durations["total"] = time.monotonic() - t0

        return RunRecord(
            rootfs=rootfs_cid, input=input_cid, output=output_cid, args=request.argv()[1:],
            exit_status=result.exit_status, timed_out=result.timed_out, started_at=started_at,
            durations={k: round(v, 6) for k, v in durations.items()},
            limits=asdict(request.limits), limits_enforced=dict(result.limits_enforced),
            versions=self.versions(),
            staged_from_cache={"rootfs": rootfs.was_cached, "input": staged_input.was_cached},
            given_input=given_input if script_cid else None, script=script_cid,
        )

    def add_script(self, input_cid: str, script: str) -> tuple[str, str]:
        """A new input: `input_cid` plus the script at SCRIPT_PATH. Returns (input, script) CIDs."""
        if any(entry.name == SCRIPT_DIR for entry in self.store.ls(input_cid)):
            raise UsageError(f"input {input_cid} already has a {SCRIPT_DIR}/ entry, the name "
                             "reserved for the cell's script: rename it in your input")
        script_cid = self.store.add_bytes(script.encode(), name="script")
        return self.store.compose({SCRIPT_PATH: script_cid}, base=input_cid), script_cid

    def execute(self, request: RunRequest, *, on_stdout: OutputCallback | None = None,
                on_stderr: OutputCallback | None = None,
                on_progress: ProgressCallback | None = None) -> RunResult:
        """`run`, keeping the tail of what the payload printed, as a RunResult."""
        stdout, stderr = StreamTail(on_stdout), StreamTail(on_stderr)
        record = self.run(request, on_stdout=stdout, on_stderr=stderr, on_progress=on_progress)
        return RunResult(record, stdout.value(), stderr.value(), store=self.store)

    def versions(self) -> dict[str, str]:
        return {"ipfs-execute": __version__, "kubo": self.store.version(),
                "bwrap": sandbox.bwrap_version(), "kernel": platform.release(),
                "machine": platform.machine()}

    def _new_run_dir(self) -> Path:
        runs = self.settings.runs_dir
        runs.mkdir(parents=True, exist_ok=True, mode=0o755)
        path = runs / f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
        path.mkdir(mode=0o755)
        return path

    def _keep(self, output_dir: Path) -> Path:
        kept_root = self.settings.kept_outputs_dir
        kept_root.mkdir(parents=True, exist_ok=True)
        kept = kept_root / output_dir.parent.name
        shutil.move(str(output_dir), kept)
        remove_tree(output_dir.parent)
        return kept


def run(request: RunRequest, settings: Settings | None = None, **callbacks: object) -> RunRecord:
    """One run with a fresh Runner (the Python API keeps one Runner for speed instead)."""
    runner = Runner(settings)
    try:
        return runner.run(request, **callbacks)  # type: ignore[arg-type]
    finally:
        runner.close()

