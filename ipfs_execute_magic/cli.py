"""The command-line tools `ipfs-execute` and `ipfs-mkdir`.

Contract: options come before ROOTFS; everything after INPUT goes to /sbin/init verbatim, even
when it looks like an option; only the output CID is printed on stdout; the payload's stdout
and stderr go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from . import arguments
from .errors import (
    EXIT_INTERRUPTED,
    EXIT_TIMEOUT,
    EXIT_TOOL_FAILURE,
    EXIT_USAGE,
    IpfsExecuteError,
    UsageError,
)
from .settings import Limits, Settings, check_home

if TYPE_CHECKING:
    from .store import AddProgress  # the store (and its HTTP client) loads only when used

DESCRIPTION = """\
Run /sbin/init ARG... of the root filesystem ROOTFS in a bubblewrap sandbox, with the directory
INPUT read-only at /input and an empty writable /output; add /output to IPFS, pin it and print
its CID. No network inside; limits on time, memory and processes.

ROOTFS is a .tar.gz, .tar.zst or .tar file in IPFS, or a directory used as the root itself.
INPUT is a directory. Both may be written CID, CID/sub/path, /ipfs/CID/sub/path or /ipns/NAME.
"""

EPILOG = f"""\
exit status:
  0         the payload exited 0
  1-255     the payload's own exit status (the output is still added and its CID printed)
  {EXIT_USAGE}         usage error (bad arguments, malformed CID or path)
  {EXIT_TIMEOUT}       the payload ran past --timeout and was killed (output still added)
  {EXIT_TOOL_FAILURE}       the tool itself failed: IPFS, staging or sandbox set-up
  {EXIT_INTERRUPTED}       interrupted (Ctrl-C); the sandbox was stopped

result cache:
  A successful run is recorded in IPFS; an identical run (same rootfs, input, arguments)
  returns the recorded output without running (a line on stderr says so).

other commands (each has --help):
  ipfs-execute add PATH...              add files or directories, print their CIDs
  ipfs-execute get CID DEST [--force]   write a file or directory from IPFS to DEST
  ipfs-execute verify RECORD [--runs N] re-run a recorded run and compare outputs
  ipfs-execute verify NOTEBOOK.ipynb    re-run every recorded run in an executed notebook
  ipfs-execute lineage CID              the runs that produced CID, back to the data
  ipfs-execute cache export|import CID|list   share the result cache as one CID
  ipfs-execute node status|start|stop   the IPFS node: API, gateway, repo size; start, stop
  ipfs-execute du                       what the data directory holds, part by part
  ipfs-execute gc [--images]            free staging cache, dead runs, unpinned blocks, templates
  ipfs-execute image build NAME|list    an example image's CID (built once: busybox, python ...)
  ipfs-execute share NOTEBOOK.ipynb     everything an executed notebook names, as one CAR file
  ipfs-execute import BUNDLE.car        import a shared notebook's bundle into this node
  ipfs-execute explain A B              why two runs differ, part by part

environment:
  IPFS_EXECUTE_API      use this Kubo RPC API (multiaddr) instead of the embedded node
  IPFS_EXECUTE_API_AUTH its credentials: bearer:TOKEN or basic:USER:PASSWORD
  IPFS_EXECUTE_HOME     data directory (embedded node repo, staging cache)
  IPFS_EXECUTE_TIMEOUT  default --timeout
  IPFS_EXECUTE_ONLINE   1: the embedded node joins the network (to share with other nodes)
  IPFS_EXECUTE_TRUST_ANY  1: serve cached results whatever key attests them (--trust-any)
  IPFS_EXECUTE_FETCH_TIMEOUT  default --fetch-timeout
  IPFS_EXECUTE_KUBO     the ipfs binary of the embedded node
  IPFS_EXECUTE_UID_RANGE  run as root: host uids for sandboxes, one per run (default 60578-61183)
  IPFS_EXECUTE_STAGING_LIMIT  default --staging-limit
  IPFS_EXECUTE_GATEWAY  HTTP gateway for links, e.g. https://dweb.link (default: the node's own)
  IPFS_EXECUTE_GATEWAY_STYLE  path (GATEWAY/ipfs/CID, default) or subdomain (CID.ipfs.GATEWAY)
  IPFS_EXECUTE_DEBUG    1: show the traceback of an internal error

example:
  ipfs-execute $BUSYBOX $EMPTY sh -c 'echo blabla > /output/test'
"""


_size = arguments.size
_seconds = arguments.seconds
_count = arguments.count


def build_parser() -> argparse.ArgumentParser:
    defaults = Limits()
    parser = argparse.ArgumentParser(
        prog="ipfs-execute",
        description=DESCRIPTION,
        epilog=EPILOG,
        usage="ipfs-execute [OPTIONS] ROOTFS INPUT [ARG...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("rootfs", metavar="ROOTFS", help="root filesystem CID or IPFS path")
    parser.add_argument("input", metavar="INPUT", help="input directory CID or IPFS path")
    parser.add_argument(
        "args",
        metavar="ARG",
        nargs="*",
        help="arguments of /sbin/init, passed verbatim (options too)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help=f"wall-clock limit in seconds (default {defaults.timeout:g})",
    )
    parser.add_argument(
        "--memory",
        type=_size,
        default=None,
        metavar="SIZE",
        help="memory limit of the whole sandbox, e.g. 512M (default 2G)",
    )
    parser.add_argument(
        "--pids",
        type=_count,
        default=None,
        metavar="N",
        help=f"limit on processes and threads (default {defaults.pids})",
    )
    parser.add_argument(
        "--cpus",
        type=arguments.cpus,
        default=None,
        metavar="N",
        help="CPU time per second of wall clock, in CPUs, e.g. 0.5 (default: its one CPU)",
    )
    parser.add_argument(
        "--tmp-size",
        type=_size,
        default=None,
        metavar="SIZE",
        help="size of the /tmp tmpfs (default 256M)",
    )
    parser.add_argument(
        "--output-size",
        type=_size,
        default=None,
        metavar="SIZE",
        help="disk space the payload may fill in /output (default 10G)",
    )
    parser.add_argument(
        "--output-files",
        type=_count,
        default=None,
        metavar="N",
        help="files and directories the payload may make in /output "
        f"(default {defaults.output_files})",
    )
    parser.add_argument(
        "--staging-limit",
        type=_size,
        default=None,
        metavar="SIZE",
        help="disk the staging cache may take before least recently used trees no run is "
        "using are deleted (default 20G)",
    )
    parser.add_argument(
        "--api",
        metavar="MULTIADDR",
        help="use your own Kubo daemon at this RPC API address "
        "(default: $IPFS_EXECUTE_API, else the embedded node)",
    )
    parser.add_argument(
        "--api-auth",
        metavar="SECRET",
        help="credentials of that daemon, as in its API.Authorizations: bearer:TOKEN or "
        "basic:USER:PASSWORD (default: $IPFS_EXECUTE_API_AUTH, which other users cannot "
        "see in the process list)",
    )
    parser.add_argument(
        "--home",
        metavar="DIR",
        type=Path,
        help="data directory (default: $IPFS_EXECUTE_HOME or a per-user one)",
    )
    parser.add_argument(
        "--fetch-timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="how long to wait for a CID to be retrievable (default 60)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the run's record (and its CID) as JSON instead of the output CID",
    )
    parser.add_argument(
        "--no-stdin",
        action="store_true",
        help="stdin is /dev/null even from a terminal: the run stays pure, so "
        "it is cached (a run with a terminal on stdin never is)",
    )
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="run even when an identical run is recorded (a different output is reported)",
    )
    parser.add_argument(
        "--trust-any",
        action="store_true",
        help="serve a cached result whatever key attests it, and say so (default: only "
        "results a trusted key attests are hits; see `ipfs-execute trust`)",
    )
    parser.add_argument("-p", "--param", **arguments.PARAM_OPTION)
    parser.add_argument("--version", action="version", version=_version_text())
    return parser


def _version_text() -> str:
    from . import __version__

    return f"ipfs-execute {__version__}"


def value_options(parser: argparse.ArgumentParser) -> frozenset[str]:
    """The option strings that take a value, as the parser declares them."""
    return frozenset(
        option
        for action in parser._actions
        if action.option_strings and action.nargs != 0
        for option in action.option_strings
    )


def split_leading_options(
    argv: Sequence[str], takes_value: frozenset[str]
) -> tuple[list[str], list[str]]:
    """Options before the first positional word, and everything from that word on.

    Everything after INPUT belongs to the payload, so where ROOTFS starts must be found
    without guessing: an option in `takes_value` swallows the next word.
    """
    options: list[str] = []
    index = 0
    while index < len(argv):
        word = argv[index]
        if word == "--":
            return options, list(argv[index + 1 :])
        if not word.startswith("-") or word == "-":
            break
        options.append(word)
        if word in takes_value:
            if index + 1 < len(argv):
                options.append(argv[index + 1])
            index += 1
        index += 1
    return options, list(argv[index:])


def _settings(options: argparse.Namespace) -> Settings:
    base = Settings.from_env()
    limits = base.limits.overridden_by(options)
    return Settings.from_env(
        api=options.api,
        api_auth=options.api_auth,
        home=options.home,
        limits=limits,
        fetch_timeout=options.fetch_timeout,
        staging_limit_bytes=options.staging_limit,
        trust_any=options.trust_any or None,
    )


def _write_through(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


class _Finished(Exception):
    """argparse is done (help printed, or a usage error reported): exit with this status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def unknown_command(word: str, commands: Sequence[str]) -> str:
    """`unknown command 'lst' (did you mean list?)`, or the list of commands."""
    import difflib

    close = difflib.get_close_matches(word, list(commands), n=1)
    if close:
        return f"unknown command {word!r} (did you mean {close[0]}?)"
    return f"unknown command {word!r} (one of: {', '.join(commands)})"


def _parse(parser: argparse.ArgumentParser, words: Sequence[str]) -> argparse.Namespace:
    # A mistyped action word (`cache lst`): one line naming the closest, not argparse's usage.
    positionals = [action for action in parser._actions if not action.option_strings]
    takes_value, first, skip = value_options(parser), None, False
    for word in words:
        if not skip and not word.startswith("-"):
            first = word
            break
        skip = not skip and word in takes_value
    choices = positionals[0].choices if positionals else None
    if choices is not None and first is not None and first not in choices:
        raise UsageError(unknown_command(first, [str(choice) for choice in choices]))
    try:
        return parser.parse_args(list(words))
    except SystemExit as exit_:
        raise _Finished(0 if exit_.code in (0, None) else EXIT_USAGE) from None


def _guarded(prog: str, body: Callable[[list[str]], int], argv: Sequence[str] | None) -> int:
    """Run a command; any error becomes one line on stderr and an exit status."""
    try:
        status = body(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # here, not at exit: a reader that went away is handled below
        return status
    except _Finished as finished:
        return finished.status
    except IpfsExecuteError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return error.exit_status
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; any sandbox was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # a bug: one line; the traceback only when asked for
        if isinstance(error, BrokenPipeError) and _stdout_closed():
            # Not a bug: the reader went away (`ipfs-execute cache list | head`). Stop quietly,
            # with the status of a command SIGPIPE stopped; stdout to /dev/null so that the
            # exit's own flush does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
        if os.environ.get("IPFS_EXECUTE_DEBUG"):
            raise
        print(
            f"{prog}: internal error: {type(error).__name__}: {error} "
            "(IPFS_EXECUTE_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_TOOL_FAILURE


EXIT_BROKEN_PIPE = 128 + 13  # as a shell reports a command stopped by SIGPIPE


def _stdout_closed() -> bool:
    """True when stdout is a pipe or socket nobody reads any more."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _fd, event in poller.poll(0))
    except (AttributeError, ValueError, OSError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    return _guarded("ipfs-execute", _main, argv)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    option_words, rest = split_leading_options(argv, value_options(parser))
    if "-h" in option_words or "--help" in option_words or (not rest and not option_words):
        parser.print_help()
        return 0 if rest or option_words else EXIT_USAGE
    if "--version" in option_words:
        print(_version_text())
        return 0
    if rest and rest[0] in SUBCOMMANDS:
        return _subcommand(rest[0], option_words, rest[1:])
    if rest and not _is_ipfs_path(rest[0]):
        import difflib

        # A mistyped subcommand (`ipfs-execute lst`), not a ROOTFS with a bad CID.
        if difflib.get_close_matches(rest[0], list(SUBCOMMANDS), n=1) or len(rest) < 2:
            raise UsageError(unknown_command(rest[0], list(SUBCOMMANDS)))
    if len(rest) < 2:
        parser.print_usage(sys.stderr)
        print("ipfs-execute: error: ROOTFS and INPUT are required", file=sys.stderr)
        return EXIT_USAGE
    options = _parse(parser, option_words + rest[:2])

    from .params import params_from
    from .record import RunRequest
    from .runner import RunConditions, Runner

    settings = _settings(options)
    request = RunRequest(
        rootfs=options.rootfs,
        input=options.input,
        args=tuple(rest[2:]),
        limits=settings.limits,
        interactive=sys.stdin.isatty() and not options.no_stdin,
        params=params_from(dict(options.param)),
    )
    with Runner(settings) as runner:
        result = runner.run(
            request,
            RunConditions(use_cache=not options.no_cache),
            on_stdout=_write_through,
            on_stderr=_write_through,
        )
    record = result.record
    if result.cache_hit:
        print(
            f"ipfs-execute: cache hit: the recorded result of an identical run on "
            f"{record.started_at} (record {result.record_cid}); nothing was run "
            f"(--no-cache runs it again); {result.trust}",
            file=sys.stderr,
        )
    if result.trust_note:
        print(f"ipfs-execute: warning: {result.trust_note}", file=sys.stderr)
    if result.disagreement:
        print(f"ipfs-execute: warning: {result.disagreement}", file=sys.stderr)
    for warning in record.output_warnings:
        print(f"ipfs-execute: warning: {warning}", file=sys.stderr)
    if options.json:
        document = json.loads(record.to_json())
        document.update(record_cid=result.record_cid, cache_hit=result.cache_hit)
        print(json.dumps(document, indent=2, sort_keys=True), flush=True)
    else:
        print(record.output, flush=True)
    if record.timed_out:
        print(
            f"ipfs-execute: the payload ran past {request.limits.timeout:g} s and was killed; "
            f"its partial output is {record.output}",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    if record.killed_by == "memory":
        print(
            f"ipfs-execute: {record.killed_text()}, exit status {record.exit_status}: the "
            f"sandbox reached its memory limit (raise --memory); its partial output is "
            f"{record.output}",
            file=sys.stderr,
        )
    if record.killed_by in ("output_bytes", "output_files"):
        option = "--output-size" if record.killed_by == "output_bytes" else "--output-files"
        print(
            f"ipfs-execute: {record.killed_text()}, exit status {record.exit_status}: the "
            f"payload wrote more than /output may hold (raise {option}); what it wrote until "
            f"then is {record.output}",
            file=sys.stderr,
        )
        # A payload that stopped by itself at a full /output may exit 0: still a failure.
        return record.exit_status or EXIT_TOOL_FAILURE
    return record.exit_status if record.exit_status is not None else EXIT_TOOL_FAILURE


def _is_ipfs_path(word: str) -> bool:
    from .cid import IpfsPath

    try:
        IpfsPath.parse(word)
    except UsageError:
        return False
    return True


def _subcommand(name: str, option_words: list[str], words: list[str]) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--api", metavar="MULTIADDR")
    common.add_argument("--api-auth", metavar="SECRET")
    common.add_argument("--home", type=Path)
    common.add_argument("--staging-limit", type=_size)
    options, unknown = common.parse_known_args(option_words)
    if unknown:
        raise UsageError(f"unknown option(s) before {name}: {' '.join(unknown)}")
    settings = Settings.from_env(
        api=options.api,
        api_auth=options.api_auth,
        home=options.home,
        staging_limit_bytes=options.staging_limit,
    )
    if settings.api is None:
        check_home(settings)  # the embedded node's repo is there
    return SUBCOMMANDS[name].handler(settings, words)


def _add(settings: Settings, words: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ipfs-execute add",
        description="Add files or directories to IPFS (dot-files included, symlinks kept as "
        "symlinks, the same CID as `ipfs add -r --hidden` with the "
        "unixfs-v1-2025 profile), pin them and print one CID per line.",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    options = _parse(parser, words)
    from .store import Store

    progress = _ProgressLine() if sys.stderr.isatty() else None
    with Store.connect(settings) as store:
        for path in options.paths:
            try:
                added = store.add_tree(
                    path, pin=True, on_progress=progress.added if progress else None
                )
            finally:
                if progress is not None:
                    progress.clear()
            for entry in added.left_out:
                print(f"ipfs-execute add: warning: {path}/{entry}", file=sys.stderr)
            print(added.cid, flush=True)
    return 0


def _node(settings: Settings, words: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ipfs-execute node",
        description="Manage the embedded IPFS node: `status` shows the node in use (the "
        "embedded one, or your own daemon given by --api / IPFS_EXECUTE_API), its API "
        "address (to point the Kubo CLI at it), its HTTP gateway, the gateway links point to, "
        "and the repo's size; `start` starts the embedded node, `stop` stops it.",
    )
    parser.add_argument("action", choices=["status", "start", "stop"])
    parser.add_argument(
        "--gateway",
        metavar="URL",
        help="gateway for links (default: $IPFS_EXECUTE_GATEWAY, else the node's own)",
    )
    parser.add_argument(
        "--gateway-style",
        choices=["path", "subdomain"],
        help="URL/ipfs/CID or CID.ipfs.HOST (default: $IPFS_EXECUTE_GATEWAY_STYLE, else path)",
    )
    options = _parse(parser, words)
    if options.gateway or options.gateway_style:
        settings = settings.with_changes(
            gateway=options.gateway or settings.gateway,
            gateway_style=options.gateway_style or settings.gateway_style,
        )
    if options.action == "status":
        from .node_info import node_status

        print(node_status(settings).describe())
        return 0
    if settings.api:
        print(
            f"using your own daemon at {settings.api} (IPFS_EXECUTE_API / --api); "
            "the embedded node is not used"
        )
        return 0
    from .node import EmbeddedNode

    node = EmbeddedNode(settings)
    if options.action == "start":
        api = node.ensure_running()
        print(api)
    else:
        print("stopped" if node.stop() else "was not running")
    return 0


def _verify(settings: Settings, words: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ipfs-execute verify",
        description="Re-run recorded runs without the cache and compare their outputs. TARGET "
        "is a run record CID, the output CID of a recorded run, or an executed "
        "notebook (.ipynb): every run recorded in it is checked, and cells whose "
        "results read a variable that an earlier cell now binds to another CID are "
        "reported as stale. Exit status 0 when everything reproduced, 1 when something "
        "did not.",
    )
    parser.add_argument("target", metavar="TARGET")
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="runs per record, under varied conditions: another staging "
        "location, shuffled directory order, another start time",
    )
    options = _parse(parser, words)
    from .runner import Runner
    from .verification import verify, verify_notebook

    with Runner(settings) as runner:
        if options.target.endswith(".ipynb"):
            verdict = verify_notebook(
                runner,
                Path(options.target),
                runs=options.runs,
                on_cell=lambda cell: print(cell.describe(), flush=True),
            )
            for line in verdict.stale_lines():  # shown, but reproducibility decides the status
                print(line, flush=True)
            return 0 if verdict.reproducible else 1
        single = verify(runner, runner.results.find(options.target), runs=options.runs)
        print(single.describe(), flush=True)
        return 0 if single.reproducible else 1


def _cache(settings: Settings, words: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ipfs-execute cache",
        description="The result cache lives in the IPFS node (MFS /ipfs-execute/cache). "
        "`export` prints one CID holding every cached record: give it to someone "
        "whose node can reach yours; `import CID` merges such an export (each "
        "record is checked against its key); `list` shows the cached runs.",
    )
    parser.add_argument("action", choices=["export", "import", "list"])
    parser.add_argument("cid", nargs="?", metavar="CID")
    options = _parse(parser, words)
    from .result_cache import ResultCache
    from .store import Store

    with Store.connect(settings) as store, ResultCache(store) as cache:
        if options.action == "export":
            print(cache.export())
        elif options.action == "import":
            if not options.cid:
                raise UsageError("cache import needs the CID of an export")
            report = cache.import_(options.cid)
            for problem in report.problems:
                print(f"ipfs-execute: rejected: {problem}", file=sys.stderr)
            print(
                f"imported {report.added} cached runs ({report.already_present} already "
                f"here, {len(report.rejected)} rejected) and {report.attestations} "
                "attestations; hits need a trusted key (`ipfs-execute trust`)"
            )
        else:
            for key in cache.entries():
                stored = cache.lookup(key)
                if stored:
                    record = stored.record
                    print(f"{record.started_at}  {record.output}  {' '.join(record.args)[:60]}")
    return 0


def _du(settings: Settings, words: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ipfs-execute du",
        description="Show what the data directory holds: the staging cache (trees staged "
        "from CIDs; in use: held by a run now), the embedded node's repo, kept outputs "
        "(outputs not yet in IPFS, each listed: add them with `ipfs-execute add PATH`), "
        "run directories (those of processes that died can go), the /output templates "
        "(formatted images each run copies) and the example images' built tarballs. "
        "Needs no daemon.",
    )
    _parse(parser, words)
    from .disk_space import usage

    print(usage(settings))
    return 0


def _gc(settings: Settings, words: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ipfs-execute gc",
        description="Free disk and say how much, part by part: staging cache entries no "
        "run is using (re-staged from their CIDs when needed), directories of runs whose "
        "process died, and the embedded node's unpinned blocks (copies of others' content; "
        "outputs, records and the result index are pinned and kept, so no result a record "
        "or notebook names is lost), and the /output templates (made again by the next run "
        "that needs one; left while a run is taking one). Kept outputs stay unless "
        "--kept-outputs is given, the example images' tarballs unless --images is.",
    )
    parser.add_argument(
        "--staging-keep",
        type=_size,
        default=None,
        metavar="SIZE",
        help="keep the most recently used staging entries up to SIZE (default: keep none)",
    )
    parser.add_argument(
        "--kept-outputs",
        action="store_true",
        help="also delete kept outputs: outputs that were never added to IPFS (their only copy)",
    )
    parser.add_argument(
        "--images",
        action="store_true",
        help="also delete the example images' built tarballs (HOME/images; their CIDs stay "
        "pinned): the next `image build NAME` builds again, to the same CID, in seconds from "
        "the cached Debian packages, or with apt-get, which needs the network, when those "
        "are gone too",
    )
    options = _parse(parser, words)
    from .disk_space import collect
    from .store import Store

    store = None if settings.api else Store.connect(settings)
    try:
        report = collect(
            settings,
            store,
            staging_keep_bytes=options.staging_keep or 0,
            kept_outputs=options.kept_outputs,
            images=options.images,
        )
    finally:
        if store is not None:
            store.close()
    print(report)
    return 0


def _lineage(settings: Settings, words: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ipfs-execute lineage",
        description="Show how CID came to be: the recorded run that produced it, the runs that "
        "produced that run's input and rootfs, back to data added by hand.",
    )
    parser.add_argument("cid", metavar="CID")
    options = _parse(parser, words)
    from .lineage_graph import lineage
    from .result_cache import ResultCache
    from .store import Store
    from .trust import Attestation, SigningKey, TrustedKeys, TrustPolicy

    with Store.connect(settings) as store, ResultCache(store) as results:
        graph = lineage(results, options.cid)
        print(graph.to_text())
        # Who attests each recorded run's output: the runs a result rests on, and on whose word.
        policy = TrustPolicy(
            SigningKey.public_id_at(settings.signing_key_path),
            [*TrustedKeys(settings.trusted_keys_path).load(), *settings.trusted_keys],
        )
        for _depth, _role, node in graph.walk():
            if node.record is not None and node.record.key and node.record.output:
                known = results.attestations(node.record.key)
                if node.record.attestation:
                    known.append(Attestation.from_dict(node.record.attestation))
                summary = policy.summarize(node.record.output, known)
                print(f"attestations of {node.record.output}: {summary.describe()}")
    return 0


def _get(settings: Settings, words: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ipfs-execute get",
        description="Write the file or directory at CID (or CID/sub/path, /ipfs/..., "
        "/ipns/...) to DEST, through the safe extractor: a directory becomes DEST itself (a "
        "new or empty directory), a file becomes DEST, or DEST/NAME when DEST is a "
        "directory. Nothing is left behind on an error. Progress goes to stderr on a "
        "terminal; a last line says what was written.",
    )
    parser.add_argument("path", metavar="CID")
    parser.add_argument("dest", metavar="DEST", type=Path)
    parser.add_argument(
        "--force", action="store_true", help="replace DEST if it exists (a whole directory)"
    )
    parser.add_argument(
        "--fetch-timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help=f"how long to wait for the content (default {settings.fetch_timeout:g})",
    )
    options = _parse(parser, words)
    from .cid import IpfsPath
    from .retrieval import retrieve
    from .store import Store

    IpfsPath.parse(options.path)  # a malformed path is a usage error before any daemon contact
    if options.fetch_timeout is not None:
        settings = settings.with_changes(fetch_timeout=options.fetch_timeout)
    progress = _ProgressLine() if sys.stderr.isatty() else None
    try:
        with Store.connect(settings) as store:
            got = retrieve(
                store, options.path, options.dest, overwrite=options.force, on_progress=progress
            )
    finally:
        if progress is not None:
            progress.clear()
    files = "1 file" if got.files == 1 else f"{got.files} files"
    print(f"wrote {files}, {got.bytes} bytes to {got.path}", flush=True)
    return 0


class _ProgressLine:
    """One line on the terminal's stderr, rewritten in place as data arrives."""

    def __init__(self) -> None:
        self._shown = False

    def __call__(self, what: str, done: int, total: int | None) -> None:
        text = f"{what}: {done / 1e6:.1f} MB"
        if total:
            text += f" of {total / 1e6:.1f} MB ({100 * done // total}%)"
        self._show(text)

    def added(self, progress: AddProgress) -> None:
        """An add's progress (Store.add_tree's on_progress): files, bytes and rate."""
        share = (
            f" ({100 * progress.bytes // progress.bytes_total}%)" if progress.bytes_total else ""
        )
        self._show(
            f"adding {progress.path}: {progress.files:,} of {progress.files_total:,} files, "
            f"{progress.bytes / 1e6:.1f} of {progress.bytes_total / 1e6:.1f} MB{share}, "
            f"{progress.rate / 1e6:.1f} MB/s"
        )

    def _show(self, text: str) -> None:
        width = max(20, os.get_terminal_size(sys.stderr.fileno()).columns - 1)
        sys.stderr.write(f"\r\x1b[K{text[-width:]}")
        sys.stderr.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._shown = False


def _image(settings: Settings, words: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ipfs-execute image",
        description="The example images that come with the package. `build NAME` prints the "
        "CID of the image NAME (busybox, empty, python, pkg-install), building it on first use "
        "into the data directory from pinned Debian packages (the same bytes, hence the same "
        "CID, on every machine) and adding it to IPFS; later calls only look it up. Progress "
        "goes to stderr. `list` shows each image and its CID when built here.",
    )
    parser.add_argument("action", choices=["build", "list"])
    parser.add_argument("name", nargs="?", metavar="NAME")
    options = _parse(parser, words)
    if options.action == "list":
        from .images.catalog import list_images

        for info in list_images(settings):
            print(info.describe())
        return 0
    if not options.name:
        raise UsageError("image build needs a NAME: busybox, empty, python or pkg-install")
    from .images.catalog import canonical_name, ensure
    from .store import Store

    name = canonical_name(options.name)  # before the node starts: a typo costs nothing
    with Store.connect(settings) as store:
        cid = ensure(
            name,
            settings,
            store,
            on_progress=lambda text: print(f"ipfs-execute image: {text}", file=sys.stderr),
        )
    print(cid, flush=True)
    return 0


class Subcommand(NamedTuple):
    handler: Callable[[Settings, list[str]], int]
    summary: str


def _trust(settings: Settings, words: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ipfs-execute trust",
        description="Every record this node writes is signed with its key (`trust key` prints "
        "it: give it to whoever should trust your results). A cached result is a hit only "
        "when a trusted key attests it: this node's own, or one added here; others are run "
        "again, and an agreeing run adds this node's attestation (docs/trust.md).",
    )
    parser.add_argument("action", choices=["key", "list", "add", "remove"])
    parser.add_argument("key", nargs="?", metavar="KEY", help="ed25519:... (add), or its name")
    parser.add_argument("--name", default="", help="a name to show beside the key (add)")
    options = _parse(parser, words)
    from .trust import SigningKey, TrustedKeys

    trusted = TrustedKeys(settings.trusted_keys_path)
    if options.action == "key":
        print(SigningKey.load_or_create(settings.signing_key_path).public_id)
    elif options.action == "list":
        own = SigningKey.load_or_create(settings.signing_key_path).public_id
        print(f"{own}  (this data directory's own key)")
        for key, name in trusted.load().items():
            print(f"{key}  {name}".rstrip())
    elif not options.key:
        raise UsageError(f"trust {options.action} needs a KEY")
    elif options.action == "add":
        trusted.add(options.key, options.name)
        print(f"trusted: {options.key}")
    else:
        print(f"no longer trusted: {trusted.remove(options.key)}")
    return 0


def _share(settings: Settings, words: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ipfs-execute share",
        description="Bundle everything an executed notebook names (rootfs, inputs, scripts, "
        "outputs, the run records with their attestations, the records behind their inputs, "
        "compositions) and write it as one CAR file beside the notebook (NOTEBOOK.car). "
        "The recipient needs no network: `ipfs-execute import NOTEBOOK.car`, then "
        "`ipfs-execute verify NOTEBOOK.ipynb`.",
    )
    parser.add_argument("notebook", type=Path, metavar="NOTEBOOK.ipynb")
    parser.add_argument(
        "-o", "--output", type=Path, metavar="BUNDLE.car", help="where to write the CAR file"
    )
    parser.add_argument(
        "--pin-remote",
        metavar="SERVICE",
        help="ask this remote pinning service (configured in the node with `ipfs pin remote "
        "service add`) to pin the bundle instead of writing a file (with -o: both); the "
        "node must be online (IPFS_EXECUTE_ONLINE=1) until the service has it",
    )
    options = _parse(parser, words)
    from .bundle import share
    from .runner import Runner

    with Runner(settings) as runner:
        shared = share(runner, options.notebook, out=options.output, pin_remote=options.pin_remote)
    print(shared.describe(), flush=True)
    return 0


def _import(settings: Settings, words: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ipfs-execute import",
        description="Import a notebook's bundle (a CAR file written by `ipfs-execute share`): "
        "its blocks are added and pinned, its run records and attestations merged into the "
        "result cache with the checks of `cache import` (one line on stderr per rejected "
        "entry). Hits need a trusted key: `ipfs-execute trust add KEY`, or verify the "
        "notebook (`ipfs-execute verify NOTEBOOK.ipynb`).",
    )
    parser.add_argument(
        "car",
        metavar="BUNDLE.car",
        help="the CAR file, or the bundle's root CID (pinned to a remote service by `share "
        "--pin-remote`: fetched by this node, which must then be online)",
    )
    options = _parse(parser, words)
    from .bundle import import_bundle
    from .runner import Runner

    with Runner(settings) as runner:
        imported = import_bundle(runner, options.car)
    for problem in imported.report.problems:
        print(f"ipfs-execute: rejected: {problem}", file=sys.stderr)
    print(imported.describe(), flush=True)
    return 0


def _explain(settings: Settings, words: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ipfs-execute explain",
        description="Why two runs differ: A and B are run records, outputs of recorded "
        "runs, or NOTEBOOK.ipynb:N (the run cell N of an executed notebook shows). Compares what makes up the cache key, part by part (rootfs, input files, the "
        "script as a diff, arguments, parameters, environment, sandbox profile) and the tool "
        "versions, then lists the output files that differ.",
    )
    parser.add_argument("a", metavar="A")
    parser.add_argument("b", metavar="B")
    options = _parse(parser, words)
    from .explanation import explain
    from .result_cache import ResultCache
    from .store import Store

    with Store.connect(settings) as store, ResultCache(store) as results:
        print(explain(results, options.a, options.b).describe(), flush=True)
    return 0


SUBCOMMANDS: dict[str, Subcommand] = {
    "add": Subcommand(_add, "add files or directories, print their CIDs"),
    "get": Subcommand(_get, "write a file or directory from IPFS to a local path"),
    "verify": Subcommand(_verify, "re-run recorded runs and compare outputs"),
    "lineage": Subcommand(_lineage, "the runs that produced a CID, back to the data"),
    "cache": Subcommand(_cache, "share the result cache as one CID"),
    "node": Subcommand(_node, "the embedded IPFS node"),
    "du": Subcommand(_du, "what the data directory holds"),
    "gc": Subcommand(_gc, "free staging cache, dead runs, unpinned blocks, templates"),
    "image": Subcommand(_image, "the example images: build one (print its CID), list them"),
    "trust": Subcommand(_trust, "this node's signing key and the keys it trusts"),
    "share": Subcommand(_share, "an executed notebook and all it names, as one CAR file"),
    "import": Subcommand(_import, "import a notebook's bundle (CAR) into this node"),
    "explain": Subcommand(_explain, "why two runs differ, part by part"),
}


MKDIR_DESCRIPTION = """\
Print the CID of a new directory holding the given entries: each NAME is set to the IPFS PATH
(a CID or IPFS path). NAME may contain slashes (a/b) to make sub directories. The directory is
pinned. Use it to compose the INPUT of a run from several CIDs:

  ipfs-execute $BUSYBOX $(ipfs-mkdir rootfs.tar.gz $ALPINE packages $PKGS) sh /input/build.sh
"""


def mkdir_main(argv: Sequence[str] | None = None) -> int:
    return _guarded("ipfs-mkdir", _mkdir_main, argv)


def _mkdir_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ipfs-mkdir",
        description=MKDIR_DESCRIPTION,
        usage="ipfs-mkdir [--api MULTIADDR] NAME PATH [NAME PATH...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "entries",
        nargs="*",
        metavar="NAME PATH",
        help="entry name (a/b makes sub directories) and the CID or IPFS path it points to",
    )
    parser.add_argument(
        "--api",
        metavar="MULTIADDR",
        help="use your own Kubo daemon (default: $IPFS_EXECUTE_API, else the embedded node)",
    )
    parser.add_argument(
        "--api-auth",
        metavar="SECRET",
        help="that daemon's credentials: bearer:TOKEN or basic:USER:PASSWORD "
        "(default: $IPFS_EXECUTE_API_AUTH)",
    )
    parser.add_argument(
        "--home",
        type=Path,
        metavar="DIR",
        help="data directory of the embedded node (default: $IPFS_EXECUTE_HOME)",
    )
    options = _parse(parser, argv)
    words = options.entries
    if len(words) % 2:
        parser.print_usage(sys.stderr)
        print("ipfs-mkdir: error: entries come in pairs NAME PATH", file=sys.stderr)
        return EXIT_USAGE
    from .cid import IpfsPath
    from .result_cache import ResultCache
    from .store import Store

    settings = Settings.from_env(api=options.api, api_auth=options.api_auth, home=options.home)
    if settings.api is None:
        check_home(settings)
    pairs = list(zip(words[0::2], words[1::2], strict=True))
    for _name, path in pairs:
        IpfsPath.parse(path)  # a malformed path is a usage error before any daemon contact
    with Store.connect(settings) as store, ResultCache(store) as results:
        print(results.compose(dict(pairs)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
