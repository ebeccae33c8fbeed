"""What a run was asked to do (RunRequest) and what it did (RunRecord), as versioned JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .settings import Limits

RECORD_FORMAT = "ipfs-execute/run-record/1"

# Where a script given with the request lands in the input tree. Reserved: an input that already
# has this name is refused rather than silently shadowed.
SCRIPT_DIR = ".ipfs-execute"
SCRIPT_PATH = f"{SCRIPT_DIR}/script"


@dataclass(frozen=True)
class RunRequest:
    """Everything the caller decides about a run. Paths may be CIDs or IPFS paths."""

    rootfs: str
    input: str | None = None  # None: an empty directory
    args: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    interactive: bool = False  # pass a terminal's stdin through (never for cached runs)
    # A script written into the input tree at SCRIPT_PATH and run as
    # `/sbin/init INTERPRETER /input/SCRIPT_PATH ARGS...` (the notebook cell body).
    script: str | None = None
    interpreter: str = "sh"

    def argv(self) -> tuple[str, ...]:
        if self.script is not None:
            return ("/sbin/init", *self.interpreter.split(), f"/input/{SCRIPT_PATH}", *self.args)
        return ("/sbin/init", *self.args)


@dataclass(frozen=True)
class RunRecord:
    """The outcome of one run; `output` is None only when nothing could be saved."""

    rootfs: str
    input: str  # the input the payload saw (with the script, when there is one)
    output: str | None
    args: tuple[str, ...]  # /sbin/init's arguments, as run
    exit_status: int | None  # payload's status; None if it never finished (timeout)
    timed_out: bool
    started_at: str  # UTC, ISO 8601
    durations: dict[str, float]  # seconds: resolve, stage_rootfs, stage_input, sandbox, add_output, total
    limits: dict[str, Any]  # limits requested
    limits_enforced: dict[str, str]  # what was really enforced, and how
    versions: dict[str, str]
    staged_from_cache: dict[str, bool]
    given_input: str | None = None  # the input before the script was added
    script: str | None = None  # CID of the script file
    format: str = RECORD_FORMAT

    @property
    def succeeded(self) -> bool:
        return self.exit_status == 0 and not self.timed_out

    def to_json(self, indent: int | None = 2) -> str:
        data = asdict(self)
        data["args"] = list(self.args)
        return json.dumps(data, indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        data = json.loads(text)
        data["args"] = tuple(data["args"])
        return cls(**data)
