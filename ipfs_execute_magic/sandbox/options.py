"""bwrap options as small typed objects, and a list of them as bwrap arguments.

Each option renders its own arguments (`.args()`), so a sandbox is described as a list of
values that tests can compare, and the argv is only made at the edge. They are NamedTuples, not
frozen dataclasses: the cache key needs them, so every start of the CLI defines them, and on
Python 3.11 a frozen dataclass costs about 0.7 ms to define (six generated methods, each
compiled), a NamedTuple a fifth of that. (Two options of different kinds with equal fields
compare equal, as tuples do; nothing compares options across kinds.)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple, Protocol


class BwrapOption(Protocol):
    def args(self) -> tuple[str, ...]: ...


def option_args(options: Iterable[BwrapOption]) -> list[str]:
    """The bwrap arguments of `options`, in order."""
    return [arg for option in options for arg in option.args()]


class Flag(NamedTuple):
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


class CapDrop(NamedTuple):
    capability: str = "ALL"

    def args(self) -> tuple[str, ...]:
        return ("--cap-drop", self.capability)


class Hostname(NamedTuple):
    name: str

    def args(self) -> tuple[str, ...]:
        return ("--hostname", self.name)


class Uid(NamedTuple):
    uid: int

    def args(self) -> tuple[str, ...]:
        return ("--uid", str(self.uid))


class Gid(NamedTuple):
    gid: int

    def args(self) -> tuple[str, ...]:
        return ("--gid", str(self.gid))


class RoBind(NamedTuple):
    src: Path
    dest: str

    def args(self) -> tuple[str, ...]:
        return ("--ro-bind", str(self.src), self.dest)


class Bind(NamedTuple):
    src: Path
    dest: str

    def args(self) -> tuple[str, ...]:
        return ("--bind", str(self.src), self.dest)


class Tmpfs(NamedTuple):
    dest: str
    size_bytes: int  # always sized: tmpfs pages are memory
    perms: int = 0o1777

    def args(self) -> tuple[str, ...]:
        return ("--perms", f"{self.perms:o}", "--size", str(self.size_bytes), "--tmpfs", self.dest)


class Proc(NamedTuple):
    dest: str = "/proc"

    def args(self) -> tuple[str, ...]:
        return ("--proc", self.dest)


class Dev(NamedTuple):
    dest: str = "/dev"

    def args(self) -> tuple[str, ...]:
        return ("--dev", self.dest)


class RoBindData(NamedTuple):
    """A read-only file with the content of `fd`, bound over `dest` (e.g. a /proc entry)."""

    fd: int
    dest: str
    perms: int = 0o444

    def args(self) -> tuple[str, ...]:
        return ("--perms", f"{self.perms:o}", "--ro-bind-data", str(self.fd), self.dest)


class RemountRo(NamedTuple):
    dest: str

    def args(self) -> tuple[str, ...]:
        return ("--remount-ro", self.dest)


class SetEnv(NamedTuple):
    name: str
    value: str

    def args(self) -> tuple[str, ...]:
        return ("--setenv", self.name, self.value)


class Chdir(NamedTuple):
    path: str

    def args(self) -> tuple[str, ...]:
        return ("--chdir", self.path)


class Seccomp(NamedTuple):
    """The seccomp BPF program in `fd`, loaded by bwrap just before it execs the payload."""

    fd: int

    def args(self) -> tuple[str, ...]:
        return ("--seccomp", str(self.fd))


class JsonStatusFd(NamedTuple):
    fd: int

    def args(self) -> tuple[str, ...]:
        return ("--json-status-fd", str(self.fd))
