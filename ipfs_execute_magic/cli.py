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

from .errors import (EXIT_INTERRUPTED, EXIT_TIMEOUT, EXIT_TOOL_FAILURE, EXIT_USAGE,
                     IpfsExecuteError, UsageError)
from .settings import Limits, Settings, parse_seconds, parse_size

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
  ipfs-execute verify RECORD [--runs N] re-run a recorded run and compare outputs
  ipfs-execute verify NOTEBOOK.ipynb    re-run every recorded run in an executed notebook
  ipfs-execute lineage CID              the runs that produced CID, back to the data
  ipfs-execute cache export|import CID|list   share the result cache as one CID
  ipfs-execute node status|start|stop   the embedded IPFS node (repo path and API address)

environment:
  IPFS_EXECUTE_API      use this Kubo RPC API (multiaddr) instead of the embedded node
  IPFS_EXECUTE_HOME     data directory (embedded node repo, staging cache)
  IPFS_EXECUTE_TIMEOUT  default --timeout
  IPFS_EXECUTE_ONLINE   1: the embedded node joins the network (to share with other nodes)
  IPFS_EXECUTE_FETCH_TIMEOUT  default --fetch-timeout
  IPFS_EXECUTE_KUBO     the ipfs binary of the embedded node
  IPFS_EXECUTE_DEBUG    1: show the traceback of an internal error

example:
  ipfs-execute $BUSYBOX $EMPTY sh -c 'echo blabla > /output/test'
"""

# Options that take a value: needed to find where ROOTFS starts without guessing.
_VALUE_OPTIONS = {"--timeout", "--api", "--home", "--memory", "--pids", "--tmp-size",
                  "--fetch-timeout"}
_SUBCOMMANDS = {"add", "node", "verify", "cache", "lineage"}


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _seconds(text: str) -> float:
    try:
        return parse_seconds(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    defaults = Limits()
    parser = argparse.ArgumentParser(
        prog="ipfs-execute", description=DESCRIPTION, epilog=EPILOG,
        usage="ipfs-execute [OPTIONS] ROOTFS INPUT [ARG...]",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rootfs", metavar="ROOTFS", help="root filesystem CID or IPFS path")
    parser.add_argument("input", metavar="INPUT", help="input directory CID or IPFS path")
    parser.add_argument("args", metavar="ARG", nargs="*",
                        help="arguments of /sbin/init, passed verbatim (options too)")
    parser.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                        help=f"wall-clock limit in seconds (default {defaults.timeout:g})")
    parser.add_argument("--memory", type=_size, default=None, metavar="SIZE",
                        help="memory limit of the whole sandbox, e.g. 512M (default 2G)")
    parser.add_argument("--pids", type=int, default=None, metavar="N",
                        help=f"limit on processes and threads (default {defaults.pids})")
    parser.add_argument("--tmp-size", type=_size, default=None, metavar="SIZE",
                        help="size of the /tmp tmpfs (default 256M)")
    parser.add_argument("--api", metavar="MULTIADDR",
                        help="use your own Kubo daemon at this RPC API address "
                             "(default: $IPFS_EXECUTE_API, else the embedded node)")
    parser.add_argument("--home", metavar="DIR", type=Path,
                        help="data directory (default: $IPFS_EXECUTE_HOME or a per-user one)")
    parser.add_argument("--fetch-timeout", type=_seconds, default=None, metavar="SECONDS",
                        help="how long to wait for a CID to be retrievable (default 60)")
    parser.add_argument("--json", action="store_true",
                        help="print the run's record (and its CID) as JSON instead of the "
                             "output CID")
    parser.add_argument("--no-stdin", action="store_true",
                        help="stdin is /dev/null even from a terminal: the run stays pure, so "
                             "it is cached (a run with a terminal on stdin never is)")
    parser.add_argument("--no-cache", action="store_true",
                        help="run even when an identical run is recorded (a different output "
                             "is reported)")
    parser.add_argument("--version", action="version", version=_version_text())
    return parser


def _version_text() -> str:
    from . import __version__

    return f"ipfs-execute {__version__}"


def split_leading_options(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Options before the first positional word, and everything from that word on."""
    options: list[str] = []
    index = 0
    while index < len(argv):
        word = argv[index]
        if word == "--":
            return options, list(argv[index + 1:])
        if not word.startswith("-") or word == "-":
            break
        options.append(word)
        if word in _VALUE_OPTIONS:
            if index + 1 < len(argv):
                options.append(argv[index + 1])
            index += 1
        index += 1
    return options, list(argv[index:])


def _settings(options: argparse.Namespace) -> Settings:
    limits = Settings.from_env().limits
    changes = {name: value for name, value in (
        ("timeout", options.timeout), ("memory_bytes", options.memory),
        ("pids", options.pids), ("tmp_bytes", options.tmp_size)) if value is not None}
    if changes:
        limits = Limits(**{**limits.__dict__, **changes})
    return Settings.from_env(api=options.api, home=options.home, limits=limits,
                             fetch_timeout=options.fetch_timeout)


def _write_through(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


def _fail(error: IpfsExecuteError) -> int:
    print(f"ipfs-execute: {error}", file=sys.stderr)
    return error.exit_status


class _Finished(Exception):
    """argparse is done (help printed, or a usage error reported): exit with this status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _parse(parser: argparse.ArgumentParser, words: Sequence[str]) -> argparse.Namespace:
    try:
        return parser.parse_args(list(words))
    except SystemExit as exit_:
        raise _Finished(0 if exit_.code in (0, None) else EXIT_USAGE) from None


def _guarded(prog: str, body: Callable[[list[str]], int], argv: Sequence[str] | None) -> int:
    """Run a command; any error becomes one line on stderr and an exit status."""
    try:
        return body(list(sys.argv[1:] if argv is None else argv))
    except _Finished as finished:
        return finished.status
    except IpfsExecuteError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return error.exit_status
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; any sandbox was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # a bug: one line; the traceback only when asked for
        if os.environ.get("IPFS_EXECUTE_DEBUG"):
            raise
        print(f"{prog}: internal error: {type(error).__name__}: {error} "
              "(IPFS_EXECUTE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_TOOL_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    return _guarded("ipfs-execute", _main, argv)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    option_words, rest = split_leading_options(argv)
    if "-h" in option_words or "--help" in option_words or (not rest and not option_words):
        parser.print_help()
        return 0 if rest or option_words else EXIT_USAGE
    if "--version" in option_words:
        print(_version_text())
        return 0
    if rest and rest[0] in _SUBCOMMANDS:
        return _subcommand(rest[0], option_words, rest[1:])
    if len(rest) < 2:
        parser.print_usage(sys.stderr)
        print("ipfs-execute: error: ROOTFS and INPUT are required", file=sys.stderr)
        return EXIT_USAGE
    options = _parse(parser, option_words + rest[:2])
    payload_args = rest[2:]

    from .record import RunRequest
    from .runner import Runner

    try:
        settings = _settings(options)
        request = RunRequest(rootfs=options.rootfs, input=options.input,
                             args=tuple(payload_args), limits=settings.limits,
                             interactive=sys.stdin.isatty() and not options.no_stdin)
        runner = Runner(settings)
        try:
            outcome = runner.run(request, on_stdout=_write_through, on_stderr=_write_through,
                                 use_cache=not options.no_cache)
            record = outcome.record
            if outcome.cache_hit:
                # Replay what the original run printed, then say nothing ran.
                for cid in (record.stdout, record.stderr):
                    if cid:
                        try:
                            _write_through(runner.store.cat(cid))
                        except IpfsExecuteError as error:
                            print(f"ipfs-execute: could not replay the recorded output: {error}",
                                  file=sys.stderr)
                print(f"ipfs-execute: cache hit: the recorded result of an identical run on "
                      f"{record.started_at} (record {outcome.record_cid}); nothing was run "
                      "(--no-cache runs it again)", file=sys.stderr)
        finally:
            runner.close()
    except IpfsExecuteError as error:
        return _fail(error)

    if outcome.disagreement:
        print(f"ipfs-execute: warning: {outcome.disagreement}", file=sys.stderr)
    if options.json:
        document = json.loads(record.to_json())
        document.update(record_cid=outcome.record_cid, cache_hit=outcome.cache_hit)
        print(json.dumps(document, indent=2, sort_keys=True), flush=True)
    else:
        print(record.output, flush=True)
    if record.timed_out:
        print(f"ipfs-execute: the payload ran past {request.limits.timeout:g} s and was killed; "
              f"its partial output is {record.output}", file=sys.stderr)
        return EXIT_TIMEOUT
    return record.exit_status if record.exit_status is not None else EXIT_TOOL_FAILURE


def _subcommand(name: str, option_words: list[str], words: list[str]) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--api", metavar="MULTIADDR")
    common.add_argument("--home", type=Path)
    try:
        options, unknown = common.parse_known_args(option_words)
        if unknown:
            raise UsageError(f"unknown option(s) before {name}: {' '.join(unknown)}")
        settings = Settings.from_env(api=options.api, home=options.home)
        handlers = {"add": _add, "node": _node, "verify": _verify, "cache": _cache,
                    "lineage": _lineage}
        return handlers[name](settings, words)
    except IpfsExecuteError as error:
        return _fail(error)


def _add(settings: Settings, words: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ipfs-execute add",
        description="Add files or directories to IPFS (dot-files included, symlinks kept as "
                    "symlinks, the same CID as `ipfs add -r --hidden` with the "
                    "unixfs-v1-2025 profile), pin them and print one CID per line.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    options = _parse(parser, words)
    from .store import Store

    with Store.connect(settings) as store:
        for path in options.paths:
            print(store.add_path(path, pin=True), flush=True)
    return 0


def _node(settings: Settings, words: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ipfs-execute node",
        description="Manage the embedded IPFS node: `status` shows its repo and API address "
                    "(to point the Kubo CLI at it), `start` starts it, `stop` stops it.")
    parser.add_argument("action", choices=["status", "start", "stop"])
    options = _parse(parser, words)
    if settings.api:
        print(f"using your own daemon at {settings.api} (IPFS_EXECUTE_API / --api); "
              "the embedded node is not used")
        return 0
    from .node import EmbeddedNode

    node = EmbeddedNode(settings)
    if options.action == "start":
        api = node.ensure_running()
        print(api)
    elif options.action == "stop":
        print("stopped" if node.stop() else "was not running")
    else:
        print(node.status().describe())
    return 0


def _verify(settings: Settings, words: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ipfs-execute verify",
        description="Re-run recorded runs without the cache and compare their outputs. TARGET "
                    "is a run record CID, the output CID of a recorded run, or an executed "
                    "notebook (.ipynb): every run recorded in it is checked. Exit status 0 "
                    "when everything reproduced, 1 when something did not.")
    parser.add_argument("target", metavar="TARGET")
    parser.add_argument("--runs", type=int, default=1,
                        help="runs per record, under varied conditions: another staging "
                             "location, shuffled directory order, another start time")
    options = _parse(parser, words)
    from .runner import Runner
    from .verify import records_in_notebook, verify

    runner = Runner(settings)
    try:
        if options.target.endswith(".ipynb"):
            targets = [(f"cell {index}", cid)
                       for index, cid in records_in_notebook(Path(options.target))]
            if not targets:
                raise UsageError(f"{options.target}: no recorded runs in it (was it executed "
                                 "and saved?)")
        else:
            targets = [("", options.target)]
        all_good = True
        for label, target in targets:
            stored = runner.results.find(target)
            verdict = verify(runner, stored, runs=options.runs)
            text = verdict.describe()
            print(f"{label}: {text}" if label else text, flush=True)
            all_good = all_good and verdict.reproducible
        return 0 if all_good else 1
    finally:
        runner.close()


def _cache(settings: Settings, words: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ipfs-execute cache",
        description="The result cache lives in the IPFS node (MFS /ipfs-execute/cache). "
                    "`export` prints one CID holding every cached record: give it to someone "
                    "whose node can reach yours; `import CID` merges such an export (each "
                    "record is checked against its key); `list` shows the cached runs.")
    parser.add_argument("action", choices=["export", "import", "list"])
    parser.add_argument("cid", nargs="?", metavar="CID")
    options = _parse(parser, words)
    from .result_cache import ResultCache
    from .store import Store

    with Store.connect(settings) as store:
        cache = ResultCache(store)
        if options.action == "export":
            print(cache.export())
        elif options.action == "import":
            if not options.cid:
                raise UsageError("cache import needs the CID of an export")
            report = cache.import_(options.cid)
            print(f"imported {report.added} cached runs ({report.already_present} already "
                  f"here, {len(report.rejected)} rejected)")
        else:
            for key in cache.entries():
                stored = cache.lookup(key)
                if stored:
                    record = stored.record
                    print(f"{record.started_at}  {record.output}  {' '.join(record.args)[:60]}")
    return 0


def _lineage(settings: Settings, words: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ipfs-execute lineage",
        description="Show how CID came to be: the recorded run that produced it, the runs that "
                    "produced that run's input and rootfs, back to data added by hand.")
    parser.add_argument("cid", metavar="CID")
    options = _parse(parser, words)
    from .lineage import lineage
    from .result_cache import ResultCache
    from .store import Store

    with Store.connect(settings) as store:
        print(lineage(ResultCache(store), options.cid).to_text())
    return 0


MKDIR_DESCRIPTION = """\
Print the CID of a new directory holding the given entries: each NAME is set to the IPFS PATH
(a CID or IPFS path). NAME may contain slashes (a/b) to make sub directories. The directory is
pinned. Use it to compose the INPUT of a run from several CIDs:

  ipfs-execute $BUSYBOX $(ipfs-mkdir rootfs.tar.gz $ALPINE packages $PKGS) sh /input/build.sh
"""


def mkdir_main(argv: Sequence[str] | None = None) -> int:
    return _guarded("ipfs-mkdir", _mkdir_main, argv)


def _mkdir_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ipfs-mkdir", description=MKDIR_DESCRIPTION,
                                     usage="ipfs-mkdir [--api MULTIADDR] NAME PATH [NAME PATH...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entries", nargs="*", metavar="NAME PATH",
                        help="entry name (a/b makes sub directories) and the CID or IPFS path "
                             "it points to")
    parser.add_argument("--api", metavar="MULTIADDR",
                        help="use your own Kubo daemon (default: $IPFS_EXECUTE_API, else the "
                             "embedded node)")
    parser.add_argument("--home", type=Path, metavar="DIR",
                        help="data directory of the embedded node (default: $IPFS_EXECUTE_HOME)")
    options = _parse(parser, argv)
    words = options.entries
    if len(words) % 2:
        parser.print_usage(sys.stderr)
        print("ipfs-mkdir: error: entries come in pairs NAME PATH", file=sys.stderr)
        return EXIT_USAGE
    from .result_cache import ResultCache
    from .store import IpfsPath, Store

    try:
        settings = Settings.from_env(api=options.api, home=options.home)
        pairs = list(zip(words[0::2], words[1::2]))
        for _name, path in pairs:
            IpfsPath.parse(path)  # a malformed path is a usage error before any daemon contact
        with Store.connect(settings) as store:
            results = ResultCache(store)
            print(results.compose(dict(pairs)))
            results.flush()
    except IpfsExecuteError as error:
        print(f"ipfs-mkdir: {error}", file=sys.stderr)
        return error.exit_status
    return 0



if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
