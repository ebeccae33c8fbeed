"""bwrap options as small typed objects, and a list of them as bwrap arguments.

Each option renders its own arguments (`.args()`), so a sandbox is described as a list of
values that tests can compare, and the argv is only made at the edge.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class BwrapOption(Protocol):
    def args(self) -> tuple[str, ...]: ...


def option_args(options: Iterable[BwrapOption]) -> list[str]:
    """The bwrap arguments of `options`, in order."""
    return [arg for option in options for arg in option.args()]


@dataclass(frozen=True)
class Flag:
    name: str  # e.g. "--unshare-all"

    def args(self) -> tuple[str, ...]:
        return (self.name,)


UNSHARE_ALL = Flag("--unshare-all")  # every namespace: no network, own pid tree, own mounts
# --unshare-all only *tries* a user namespace; demand one (and it is what --disable-userns needs).
UNSHARE_USER = Flag("--unshare-user")
DISABLE_USERNS = Flag("--disable-userns")  # no nested user namespaces: less kernel surface
DIE_WITH_PARENT = Flag("--die-with-parent")
NEW_SESSION = Flag("--new-session")  # no controlling terminal: TIOCSTI cannot inject input
CLEAR_ENV = Flag("--clearenv")


@dataclass(frozen=True)
class CapDrop:
    capability: str = "ALL"

    def args(self) -> tuple[str, ...]:
        return ("--cap-drop", self.capability)


@dataclass(frozen=True)
class Hostname:
    name: str

    def args(self) -> tuple[str, ...]:
        return ("--hostname", self.name)


@dataclass(frozen=True)
class Uid:
    uid: int

    def args(self) -> tuple[str, ...]:
        return ("--uid", str(self.uid))


@dataclass(frozen=True)
class Gid:
    gid: int

    def args(self) -> tuple[str, ...]:
        return ("--gid", str(self.gid))


@dataclass(frozen=True)
class RoBind:
    src: Path
    dest: str

    def args(self) -> tuple[str, ...]:
        return ("--ro-bind", str(self.src), self.dest)


@dataclass(frozen=True)
class Bind:
    src: Path
    dest: str

    def args(self) -> tuple[str, ...]:
        return ("--bind", str(self.src), self.dest)


@dataclass(frozen=True)
class Tmpfs:
    dest: str
    size_bytes: int  # always sized: tmpfs pages are memory
    perms: int = 0o1777

    def args(self) -> tuple[str, ...]:
        return ("--perms", f"{self.perms:o}", "--size", str(self.size_bytes), "--tmpfs", self.dest)


@dataclass(frozen=True)
class Proc:
    dest: str = "/proc"

    def args(self) -> tuple[str, ...]:
        return ("--proc", self.dest)


@dataclass(frozen=True)
class Dev:
    dest: str = "/dev"

    def args(self) -> tuple[str, ...]:
        return ("--dev", self.dest)


@dataclass(frozen=True)
class RoBindData:
    """A read-only file with the content of `fd`, bound over `dest` (e.g. a /proc entry)."""

    fd: int
    dest: str
    perms: int = 0o444

    def args(self) -> tuple[str, ...]:
        return ("--perms", f"{self.perms:o}", "--ro-bind-data", str(self.fd), self.dest)


@dataclass(frozen=True)
class RemountRo:
    dest: str

    def args(self) -> tuple[str, ...]:
        return ("--remount-ro", self.dest)


@dataclass(frozen=True)
class SetEnv:
    name: str
    value: str

    def args(self) -> tuple[str, ...]:
        return ("--setenv", self.name, self.value)


@dataclass(frozen=True)
class Chdir:
    path: str

    def args(self) -> tuple[str, ...]:
        return ("--chdir", self.path)


@dataclass(frozen=True)
class Seccomp:
    """The seccomp BPF program in `fd`, loaded by bwrap just before it execs the payload."""

    fd: int

    def args(self) -> tuple[str, ...]:
        return ("--seccomp", str(self.fd))


@dataclass(frozen=True)
class JsonStatusFd:
    fd: int

    def args(self) -> tuple[str, ...]:
        return ("--json-status-fd", str(self.fd))
