"""/output areas made before the runs that take them, and released after them, while idle.

Run by root, a run's /output is a loop-mounted image (output_area.py): copying the template,
attaching and mounting it costs about 2 ms, unmounting and deleting it about 1.5 ms, a fifth of
a warm run. In a process that runs more than once (a notebook kernel, a script calling
`ie.run`, a cluster worker) one background thread does both between runs: when a run ends, the
used area is released and one for the next run (with the same limits, and an empty file for its
script if this run had one) is made.

Only while the process is idle: the thread starts on its work once no run has started or ended
for `SETTLE_S`. Made beside a run that is starting, the same work slows it down more than it
saves (the mounts and loop devices contend with the sandbox's own, and the two threads for the
interpreter), so a run that comes sooner makes its area itself and releases the previous one
itself, as a one-off run (the CLI) always does.

At most one area waits, and only for `IDLE_S`: a mounted image and a loop device are not held
for a run that may never come. A waiting area is a run directory held by this process's flock
and marked UNUSED_MARKER until a run takes it: the runner's `close`, its garbage collection and
the process's exit release it, and if the process is killed (a kernel shut down with `now`,
say), the next run of any process (`release_stale`) or `gc` removes it whole. Threads only, no
concurrent.futures: importing it costs a CLI start about 5 ms.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..settings import Limits
from .output_area import UNUSED_MARKER, OutputArea

# Quiet time after a run's start or end before the background work begins.
SETTLE_S = 0.02
# How long a made area waits for its run before it is released.
IDLE_S = 60.0

_Key = tuple[int | None, int | None]


def _key(limits: Limits) -> _Key:
    return (limits.output_bytes, limits.output_files)


class _Waiting:
    """The area for the next run with `limits`: to be made, being made, or made."""

    def __init__(self, limits: Limits, script_name: str | None) -> None:
        self.limits = limits
        self.script_name = script_name  # the last run had a script: so will this one
        self.started = False  # the background thread took it on: wait for `done`
        self.area: OutputArea | None = None  # None once done: its making failed
        self.done = threading.Event()

    def fits(self, limits: Limits) -> bool:
        """Whether it was made for `limits`: the same size and file count."""
        return _key(self.limits) == _key(limits)


class OutputAreaPool:
    """Gives each run an /output area (`take`) and takes it back once its output is saved
    (`give_back`). From a process's second run on, the releasing and the making of the next
    area happen in the background while the process is idle. `close` waits for that work and
    releases a waiting area; it is idempotent."""

    def __init__(
        self,
        new_run_dir: Callable[[], Path],
        remove_run_dir: Callable[[Path], None],
        template_dir: Path | None = None,
        *,
        settle_s: float = SETTLE_S,
        idle_s: float = IDLE_S,
    ) -> None:
        self._new_run_dir = new_run_dir
        self._remove_run_dir = remove_run_dir
        self._template_dir = template_dir
        self._settle_s = settle_s
        self._idle_s = idle_s
        self._lock = threading.Condition()
        self._waiting: _Waiting | None = None
        self._used: OutputArea | None = None  # given back, not yet released
        self._last_activity = 0.0
        self._worker: threading.Thread | None = None
        self._runs = 0
        self._closed = False

    def take(self, limits: Limits) -> OutputArea:
        """A created, empty area for a run with `limits`. Hand it to `give_back` when the run's
        output is saved; to keep the output instead, `release` it and keep its directory."""
        with self._lock:
            self._runs += 1
            self._last_activity = time.monotonic()
            waiting = self._waiting
            if waiting is not None and waiting.fits(limits):
                self._waiting = None
            else:
                waiting = None
        if waiting is not None and waiting.started:
            waiting.done.wait()  # being made: the rest of that is shorter than a new one
            if waiting.area is not None:
                # From now on it is a run's: if the process dies, what the run wrote stays.
                (waiting.area.path.parent / UNUSED_MARKER).unlink(missing_ok=True)
                return waiting.area
        return self._make(limits)

    def give_back(self, area: OutputArea, limits: Limits) -> None:
        """Release `area` and remove its run directory (its output is in IPFS by now), and
        have the next run's area made: while idle, from the process's second run on."""
        earlier: OutputArea | None = None
        replaced: _Waiting | None = None
        with self._lock:
            background = self._runs >= 2 and not self._closed
            if background:
                self._last_activity = time.monotonic()
                # Still there: runs came too fast for the background. Released here, now.
                earlier, self._used = self._used, area
                if self._waiting is None or not self._waiting.fits(limits):
                    # The next run most likely has this run's limits.
                    replaced, self._waiting = self._waiting, _Waiting(limits, area.script_name)
                self._start_worker()
                self._lock.notify()
        if not background:
            self._discard(area, report=False)
            return
        if earlier is not None:
            self._discard(earlier, report=False)
        if replaced is not None:
            self._discard_waiting(replaced)

    def close(self) -> None:
        """Finish the background work and release a waiting area."""
        with self._lock:
            self._closed = True
            worker = self._worker
            self._lock.notify()
        if worker is not None and worker is not threading.current_thread():
            worker.join()
        with self._lock:
            used, self._used = self._used, None
            waiting, self._waiting = self._waiting, None
        if used is not None:
            self._discard(used)
        if waiting is not None:
            self._discard_waiting(waiting)

    # -- internal -------------------------------------------------------------------------

    def _make(self, limits: Limits, script_name: str | None = None) -> OutputArea:
        run_dir = self._new_run_dir()
        area = OutputArea(run_dir / "output", self._template_dir)
        try:
            area.create(limits)
            if script_name is not None:
                area.prepare_script(script_name)
        except BaseException:
            self._discard(area, report=False)
            raise
        return area

    def _discard(self, area: OutputArea, *, report: bool = True) -> None:
        try:
            area.release(self._remove_run_dir)
        except Exception as error:
            if not report:
                raise
            # In the background nobody would see it: said where the user looks.
            print(
                f"ipfs-execute: could not remove the finished run directory "
                f"{area.path.parent} ({error}); `ipfs-execute gc` removes it later",
                file=sys.stderr,
                flush=True,
            )

    def _discard_waiting(self, waiting: _Waiting) -> None:
        if waiting.started:
            waiting.done.wait()
        if waiting.area is not None:
            self._discard(waiting.area)

    def _start_worker(self) -> None:
        # Called with the lock held. A daemon thread: `close` (also at exit, see Runner) is
        # what waits for it, and an idle one must not hold up the interpreter's exit.
        if self._worker is None:
            self._worker = threading.Thread(
                target=self._work, name="ipfs-execute-output-areas", daemon=True
            )
            self._worker.start()

    def _next_job(self) -> tuple[OutputArea | None, _Waiting | None] | None:
        """The work to do once the process is quiet (None: closed). Waits for it; releases a
        made area nobody came for within `idle_s`."""
        with self._lock:
            while True:
                if self._closed:
                    return None
                pending = self._used is not None or (
                    self._waiting is not None and not self._waiting.started
                )
                quiet_for = time.monotonic() - self._last_activity
                if pending and quiet_for >= self._settle_s:
                    used, self._used = self._used, None
                    waiting = self._waiting
                    if waiting is not None and not waiting.started:
                        waiting.started = True
                    else:
                        waiting = None
                    return used, waiting
                if not pending and self._waiting is not None and quiet_for >= self._idle_s:
                    unused, self._waiting = self._waiting, None
                    return unused.area, None
                if pending:
                    self._lock.wait(self._settle_s - quiet_for)
                elif self._waiting is not None:
                    self._lock.wait(self._idle_s - quiet_for)
                else:
                    self._lock.wait()

    def _work(self) -> None:
        while (job := self._next_job()) is not None:
            used, waiting = job
            if used is not None:
                self._discard(used)
            if waiting is not None:
                area = None
                try:
                    area = self._make(waiting.limits, waiting.script_name)
                    # Should this process die, whoever finds the directory removes it whole.
                    (area.path.parent / UNUSED_MARKER).touch()
                    waiting.area = area
                except Exception:
                    # The run that comes makes its own, and reports what goes wrong then.
                    if area is not None:
                        self._discard(area)
                finally:
                    waiting.done.set()
