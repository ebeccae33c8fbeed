"""One exception tree for the whole tool.

Every error says what failed (which CID, which path) and what to do about it, in one line.
Front ends translate these at their edge: the CLI into a message and an exit status, the
notebook magic into a one-line UsageError or a short rendered error.
"""

from __future__ import annotations

# Exit statuses of the command-line tool. A payload's own status passes through unchanged,
# so these are chosen where shells and container tools already reserve them.
EXIT_USAGE = 2
EXIT_TIMEOUT = 124  # as timeout(1): the payload ran past --timeout and was killed
EXIT_TOOL_FAILURE = 125  # as `docker run`: the tool itself failed (IPFS, staging, sandbox set-up)
EXIT_INTERRUPTED = 130  # as shells: 128 + SIGINT


class IpfsExecuteError(Exception):
    """Base of every error this tool raises on purpose."""

    exit_status: int = EXIT_TOOL_FAILURE


class UsageError(IpfsExecuteError):
    """The user's arguments are wrong; nothing was run."""

    exit_status = EXIT_USAGE


class InvalidPathError(UsageError):
    """A CID or IPFS path that cannot be parsed."""


class IpfsError(IpfsExecuteError):
    """Talking to the IPFS daemon failed."""


class DaemonUnreachableError(IpfsError):
    """No daemon answers at the configured API address."""


class DaemonAuthError(IpfsError):
    """The daemon refused the request: its credentials are missing or wrong."""


class DaemonVersionError(IpfsError):
    """The daemon is too old (or not Kubo)."""


class NotRetrievableError(IpfsError):
    """A CID could not be fetched within the fetch timeout."""


class NodeError(IpfsError):
    """The embedded Kubo node could not be initialised, started or stopped."""


class StagingError(IpfsExecuteError):
    """A rootfs or input could not be made ready for the sandbox."""


class TruncatedStreamError(StagingError):
    """A fetched stream ended before its archive did: a cut download, or a cut archive."""


class BadRootfsError(StagingError):
    """The rootfs is not a usable root filesystem (not an archive, corrupt, no /sbin/init ...)."""


class UnsafeArchiveError(StagingError):
    """An archive member would escape or harm the host; nothing of it is kept."""

    def __init__(self, member: str, reason: str, *, source: str = "archive") -> None:
        self.member = member
        self.reason = reason
        self.source = source
        super().__init__(f"refusing {source}: member {member!r} {reason}")


class RetrievalError(IpfsExecuteError):
    """Content fetched from IPFS could not be written to the local destination."""


class SandboxError(IpfsExecuteError):
    """The sandbox could not be set up (the payload never ran)."""


class SandboxUnavailableError(SandboxError):
    """bubblewrap is missing or user namespaces are disabled."""


class OutputNotSavedError(IpfsError):
    """The payload produced output but it could not be added to IPFS.

    The output is kept on disk at `kept_path`; a retry with `ipfs-execute add` saves it.
    """

    def __init__(self, message: str, kept_path: str) -> None:
        self.kept_path = kept_path
        super().__init__(
            f"{message}; the output is kept at {kept_path} "
            f"(add it later with: ipfs-execute add {kept_path})"
        )


class ImageBuildError(IpfsExecuteError):
    """An example image could not be built (a package download, a pin, the host)."""


class ClusterError(IpfsExecuteError):
    """The Dask cluster could not be reached or used (scheduler, workers, their nodes)."""
