"""What a run was asked to do (RunRequest) and what it did (RunRecord), as versioned JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .settings import Limits

RECORD_FORMAT = "ipfs-execute/run-record/1"


@dataclass(frozen=True)
class RunRequest:
    """Everything the caller decides about a run. Paths may be CIDs or IPFS paths."""

    rootfs: str
    input: str | None = None  # None: an empty directory
    args: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    interactive: bool = False  # pass a terminal's stdin through (never for cached runs)


@dataclass(frozen=True)
class RunRecord:
    """The outcome of one run; `output` is None only when nothing could be saved."""

    rootfs: str
    input: str
    output: str | None
    args: tuple[str, ...]
    exit_status: int | None  # payload's status; None if it never finished (timeout)
    timed_out: bool
    started_at: str  # UTC, ISO 8601
    durations: dict[str, float]  # seconds: resolve, stage_rootfs, stage_input, sandbox, add_output, total
    limits: dict[str, Any]  # limits requested
    limits_enforced: dict[str, str]  # what was really enforced, and how
    versions: dict[str, str]
    staged_from_cache: dict[str, bool]
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
