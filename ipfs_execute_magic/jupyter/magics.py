"""`%%ipfs_execute`, `%ipfs_add`, `%ipfs_mkdir`, `%ipfs_verify`, `%ipfs_lineage`, `%ipfs_node`,
`%ipfs_du`, `%ipfs_gc`, `%ipfs_rerun_stale`: the notebook front end of the core.

A thin layer: arguments become a RunRequest for the same Runner the Python API uses
(`ipfs_execute_magic.default_runner()`), the payload's output streams into the cell as it is
printed, and the result is bound to a variable. Errors are translated at this edge: arguments and
CIDs into IPython's one-line UsageError, a failing payload into a short error without a Python
traceback, an interrupt into one line and a re-raised KeyboardInterrupt (so Run All stops).
"""

from __future__ import annotations

import codecs
import keyword
import shlex
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, kwds, magic_arguments
from traitlets import Bool, Float, Int, List, TraitError, Unicode, Union, observe, validate

import ipfs_execute_magic as ie

from .. import arguments
from ..cid import IpfsPath
from ..errors import IpfsExecuteError
from ..errors import UsageError as CoreUsageError
from ..explanation import Explanation, compare, reason
from ..lineage_graph import LineageNode, lineage
from ..links import PUBLIC_GATEWAY, Gateway, link_gateway
from ..per_entry import EntriesProgress, EntryResults
from ..record import SCRIPT_PATH
from ..result import IpfsRef, RunResult
from ..settings import (
    DEFAULT_STAGING_LIMIT,
    LIMIT_FIELDS,
    LIMIT_OVERRIDES,
    Limits,
    Settings,
    parse_gateway,
    parse_gateway_style,
    parse_size,
)
from ..trust import parse_key_id
from ..verification import NotebookVerdict, RerunResult, Verdict, verify, verify_notebook
from .display import (
    AddProgressLine,
    EntriesStatus,
    LiveStatus,
    ResultView,
    entries_mimebundle,
    human_size,
    ref_mimebundle,
    result_metadata,
)
from .provenance import (
    ExplanationView,
    LineageView,
    NotebookVerdictView,
    VerdictView,
    VerifyProgress,
)
from .stale import CellRun, StaleLedger

if TYPE_CHECKING:
    from ..runner import Runner
    from ..store import Store

INTERRUPTED_LINE = "interrupted: the sandbox was stopped"
PROGRESS_DELAY = 0.5  # seconds of a run or an add before a progress line appears
STATUS_INTERVAL = 0.5  # seconds between updates of a running cell's status line
STDERR_TAIL_LINES = 12  # of a failing payload's stderr, in its error
_CORE_LIMITS = Limits()  # the defaults the traits fall back to, for their help
Bundle = tuple[dict[str, Any], dict[str, Any]]  # a mimebundle formatter: (data, metadata)


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' if count != 1 else ''}"


class PayloadFailedError(Exception):
    """The payload exited non-zero or ran past its timeout. `.result` is the finished run.

    Rendered without a Python traceback: the exit status and the tail of stderr say more.
    """

    def __init__(self, result: RunResult, bound_to: str | None = None) -> None:
        self.result = result
        self.bound_to = bound_to
        record = result.record
        if record.timed_out:
            limit = record.limits.get("timeout")
            what = f"the payload ran past the {limit:g} s timeout and was killed"
        elif record.killed_by == "memory":
            what = (
                f"{record.killed_text()}, exit status {record.exit_status}: the sandbox "
                "reached its memory limit (raise --memory)"
            )
        elif record.killed_by in ("output_bytes", "output_files"):
            option = "--output-size" if record.killed_by == "output_bytes" else "--output-files"
            what = (
                f"{record.killed_text()}, exit status {record.exit_status}: the payload wrote "
                f"more than /output may hold (raise {option})"
            )
        else:
            what = f"the payload exited with status {record.exit_status}"
        kept = (
            f"the result is bound to `{bound_to}`" if bound_to else "use -o NAME to keep the result"
        )
        super().__init__(f"{what} (output ipfs://{record.output}; {kept})")

    def stderr_tail(self, lines: int = STDERR_TAIL_LINES) -> list[str]:
        return self.result.stderr_text.rstrip("\n").splitlines()[-lines:]

    def _render_traceback_(self) -> list[str]:
        rendered = [f"{type(self).__name__}: {self}"]
        tail = self.stderr_tail()
        if tail:
            rendered.append(f"last {len(tail)} line{'s' if len(tail) > 1 else ''} of stderr:")
            rendered += [f"  {line}" for line in tail]
        return rendered


def _short(error: BaseException, text: str) -> BaseException:
    # IPython prints `_render_traceback_()` instead of a traceback. Set on the instance, so the
    # exception keeps its own type for code that catches it.
    error._render_traceback_ = lambda: [text]  # type: ignore[attr-defined]
    return error


@contextmanager
def core_errors() -> Iterator[None]:
    """Core errors as the notebook shows them: usage errors in one line, others short."""
    try:
        yield
    except CoreUsageError as error:
        raise UsageError(str(error)) from None
    except IpfsExecuteError as error:
        _short(error, f"{type(error).__name__}: {error}")
        raise


def shell_words(line: str) -> list[str]:
    """A magic line split as a shell would (quotes removed), unlike IPython's own splitting."""
    try:
        return shlex.split(line)
    except ValueError as error:
        raise UsageError(f"cannot split the line into words: {error}") from None


def split_payload_args(line: str) -> tuple[list[str], list[str]]:
    """Shell-like words of a magic line: (before `--`, after `--`)."""
    words = shell_words(line)
    if "--" in words:
        cut = words.index("--")
        return words[:cut], words[cut + 1 :]
    return words, []


def check_name(name: str | None) -> str | None:
    if name is not None and (not name.isidentifier() or keyword.iskeyword(name)):
        raise UsageError(f"-o {name!r}: not a Python variable name")
    return name


def check_ipfs_path(label: str, text: str) -> None:
    """Refuse a malformed CID or path before anything runs, hinting at unexpanded variables."""
    try:
        IpfsPath.parse(text)
    except CoreUsageError as error:
        hint = ""
        if "$" in text or "{" in text:
            # IPython leaves the whole line as written when any `$name`/`{expr}` fails.
            hint = " (a `$name` or `{expr}` was not expanded: is the variable defined?)"
        raise UsageError(f"{label}: {error}{hint}") from None


_seconds = arguments.seconds
_size = arguments.size
_positive_int = arguments.count


def _run_options(options: Any, script: str | None, interpreter: str) -> dict[str, Any]:
    """The keyword arguments of `ie.run` (and `ie.map_entries`) that a magic line sets."""
    return {
        "script": script,
        "interpreter": interpreter,
        **{limit: getattr(options, limit) for limit in LIMIT_OVERRIDES},
        "params": dict(options.param),
        "use_cache": not options.no_cache,
    }


def _on_cluster(*args: Any, on_progress: Any = None, **options: Any) -> RunResult:
    """`ie.run` on the configured Dask cluster; a LiveStatus as `on_progress` says whether
    the run is queued or on which worker it runs while it is pending."""
    future = ie.submit(*args, **options)
    cluster = ie.current_cluster()
    task = getattr(future, "dask", None)
    if isinstance(on_progress, LiveStatus) and cluster is not None and task is not None:
        ended = threading.Event()
        future.add_done_callback(lambda _future: ended.set())
        try:
            while not ended.is_set():
                # Asked no more often than the line is redrawn: two round trips each time.
                worker = cluster.where([task.key]).get(task.key)
                if not task.done():  # an ended task is on no worker: not "queued" again
                    on_progress.place(f"on worker {worker}" if worker else "queued")
                ended.wait(STATUS_INTERVAL)
        except KeyboardInterrupt:
            future.cancel()  # a run still queued never starts
            raise
    return future.result()


class _StreamForwarder:
    """The payload's bytes as text on the kernel's sys.stdout/sys.stderr, flushed per line.

    Written to the real streams (not an ipywidgets.Output) so the text is saved in the cell.
    Flushing only at line ends keeps `print(x)` (two writes from an unbuffered Python: the text,
    then the newline) one stream message; a partial line still goes out on the kernel's own
    flush interval.
    """

    def __init__(self, stream_name: str) -> None:
        self.stream_name = stream_name
        # A chunk may end inside a multi-byte character.
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def __call__(self, chunk: bytes) -> None:
        self._write(self._decoder.decode(chunk))

    def flush(self) -> None:
        self._write(self._decoder.decode(b"", final=True))
        getattr(sys, self.stream_name).flush()

    def _write(self, text: str) -> None:
        if text:
            stream = getattr(sys, self.stream_name)
            stream.write(text)
            if text.endswith("\n"):
                stream.flush()


# argparse %-formats the usage, and IPython puts one more "%" in front: shown as %%ipfs_execute
EXECUTE_USAGE = "%%ipfs_execute [options] ROOTFS [INPUT] [-- ARG...]"
EXECUTE_EPILOG = f"""\
The cell is written into the input tree at /input/{SCRIPT_PATH} (a reserved name:
an input that already has it is refused) and run as
`/sbin/init INTERPRETER /input/{SCRIPT_PATH} ARG...`.
The line form `%ipfs_execute ROOTFS [INPUT] -- ARG...` runs `/sbin/init ARG...` without a
script, like the ipfs-execute command.

`$name` and `{{expr}}` in the line are expanded by IPython (never in the cell body). A result
stands for its output CID: `{{counts}}/sub/file` or `{{counts / "sub/file"}}` is a sub path.

The result (a RunResult: .output .input .rootfs CIDs, .exit_status, .stdout, .stderr,
.read_text(path), .ls(path), .files()) is returned and, with -o, bound to NAME; str() of it is
the output CID. A failing payload raises PayloadFailedError (exit status and the tail of
stderr) after binding the result, unless --no-raise-error.

Defaults come from `%config IpfsExecuteMagics` (api, gateway, home, timeout, memory, pids,
cpus).

Examples:
  %%ipfs_execute $busybox $data -o counts
  sort /input/words.txt | uniq -c > /output/counts.txt

  %%ipfs_execute $pyimage $counts -o report --interpreter python3 --timeout 60
  print(open("/input/counts.txt").read())

  %ipfs_execute $busybox {{counts}} -o listing -- sh -c 'ls -l /input > /output/ls.txt'
"""

# Usages for argparse (see EXECUTE_USAGE): IPython puts "%" before the first line only.
VERIFY_USAGE = (
    "ipfs_verify [-o NAME] [--runs N] NAME_OR_RECORD\n"
    "  %%ipfs_verify [-o NAME] [--runs N] --notebook PATH.ipynb"
)
VERIFY_EPILOG = """\
Every run is recorded (`ipfs cat RECORD`: rootfs, input, arguments, output, versions). A
re-run repeats it exactly, without the result cache, and compares output CIDs. With
--runs N the conditions vary on purpose (another staging location, a directory order
shuffled by disorderfs, another start time) to expose what the output secretly depends on:
the wall clock, random bytes, the order of directory listings.

With --notebook, every run recorded in the saved outputs of an executed notebook is
re-run (each run's display carries its record CID in the output metadata); the report
lists each cell's verdict, and a run whose record cannot be found is reported, not fatal.
The command-line equivalent: `ipfs-execute verify RECORD|NOTEBOOK.ipynb [--runs N]`.

Examples:
  %ipfs_verify counts
  %ipfs_verify counts --runs 3 -o verdict
  %ipfs_verify bafy...record-or-output-cid
  %ipfs_verify --notebook analysis.ipynb
"""
LINEAGE_USAGE = "ipfs_lineage [-o NAME] NAME_OR_CID"
LINEAGE_EPILOG = """\
Runs are found through the node's index of outputs (/ipfs-execute/outputs in its MFS), so
the lineage reaches as far back as the runs recorded on this node or imported with
`ipfs-execute cache import`. A sub path ({counts}/sub/file) leads to the run whose output
it is part of. Shared ancestors appear once under each run that used them.
The command-line equivalent: `ipfs-execute lineage CID`.

Examples:
  %ipfs_lineage report
  %ipfs_lineage {counts}/counts.csv -o graph
"""


@magics_class
class IpfsExecuteMagics(Magics):
    """Run cells in a bubblewrap sandbox on IPFS content; bind the results."""

    api = Unicode(
        "",
        help="RPC API multiaddr of your own Kubo daemon "
        "(empty: $IPFS_EXECUTE_API, else the embedded node)",
    ).tag(config=True)
    api_auth = Unicode(
        "",
        help="credentials of that daemon, as in its API.Authorizations: bearer:TOKEN or "
        "basic:USER:PASSWORD (empty: $IPFS_EXECUTE_API_AUTH); set it in ipython_config.py "
        "or the environment, not in a cell that is saved with the notebook",
    ).tag(config=True)
    gateway = Unicode(
        "",
        help="base URL of the HTTP gateway for links, e.g. https://dweb.link (empty: "
        "$IPFS_EXECUTE_GATEWAY, else the embedded node's gateway on the port kept for its "
        f"data directory, else your daemon's, else {PUBLIC_GATEWAY})",
    ).tag(config=True)
    gateway_style = Unicode(
        "",
        help="how links put a CID in the gateway's URL: 'path' (GATEWAY/ipfs/CID) or "
        "'subdomain' (CID.ipfs.GATEWAY-HOST) (empty: $IPFS_EXECUTE_GATEWAY_STYLE, else path)",
    ).tag(config=True)
    home = Unicode(
        "",
        help="data directory: embedded node, staging cache "
        "(empty: $IPFS_EXECUTE_HOME, else the default)",
    ).tag(config=True)
    timeout = Float(
        None,
        allow_none=True,
        help="default wall-clock limit of a run, seconds (None: "
        f"$IPFS_EXECUTE_TIMEOUT, else {_CORE_LIMITS.timeout:g})",
    ).tag(config=True)
    memory = Union(
        [Int(), Unicode()],
        default_value=None,
        allow_none=True,
        help="default memory limit of a run: bytes or a size like '512M' (None: "
        f"{human_size(_CORE_LIMITS.memory_bytes or 0)})",
    ).tag(config=True)
    pids = Int(
        None,
        allow_none=True,
        help=f"default limit on processes and threads of a run (None: {_CORE_LIMITS.pids})",
    ).tag(config=True)
    cpus = Float(
        None,
        allow_none=True,
        help="default CPU time per second of wall clock of a run, in CPUs, e.g. 0.5 (None: "
        "its one CPU)",
    ).tag(config=True)
    tmp_size = Union(
        [Int(), Unicode()],
        default_value=None,
        allow_none=True,
        help="default size of a run's /tmp tmpfs: bytes or a size like '64M' (None: "
        f"{human_size(_CORE_LIMITS.tmp_bytes)})",
    ).tag(config=True)
    output_size = Union(
        [Int(), Unicode()],
        default_value=None,
        allow_none=True,
        help="default disk space a run may fill in /output: bytes or a size like '1G' (None: "
        f"{human_size(_CORE_LIMITS.output_bytes or 0)})",
    ).tag(config=True)
    output_files = Int(
        None,
        allow_none=True,
        help="default number of files and directories a run may make in /output (None: "
        f"{_CORE_LIMITS.output_files})",
    ).tag(config=True)

    trusted_keys = List(
        Unicode(),
        default_value=[],
        help="public keys (ed25519:...) whose attested results are cache hits, beside this "
        "data directory's own and those of `ipfs-execute trust add`",
    ).tag(config=True)
    trust_any = Bool(
        False,
        help="serve cached results whatever key attests them (and say so on the result)",
    ).tag(config=True)
    dask = Unicode(
        "",
        help="run cells on a Dask cluster: a scheduler address (tcp://HOST:8786) or 'local' "
        "(worker processes on this machine); empty: run here (docs/cluster.md)",
    ).tag(config=True)
    staging_limit = Union(
        [Int(), Unicode()],
        default_value=None,
        allow_none=True,
        help="disk the staging cache may take before least recently used trees no run is "
        "using are deleted: bytes or a size like '50G' (None: $IPFS_EXECUTE_STAGING_LIMIT, "
        f"else {human_size(DEFAULT_STAGING_LIMIT)})",
    ).tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        # Before super().__init__: configured values notify the observers during it.
        self._gateways: weakref.WeakKeyDictionary[Store, Gateway] = weakref.WeakKeyDictionary()
        # This kernel's runs: what each read, to mark results stale (stale.py).
        self.ledger = StaleLedger()
        self._cell: tuple[str, str | None] = ("", None)  # the cell running: (source, cell id)
        super().__init__(shell=shell, **kwargs)

    @property
    def user_ns(self) -> dict[str, Any]:
        """The namespace results are bound in (a loaded extension always has a shell)."""
        assert self.shell is not None
        namespace: dict[str, Any] = self.shell.user_ns
        return namespace

    # -- configuration -----------------------------------------------------------------------

    @validate(*LIMIT_OVERRIDES)
    def _valid_limit(self, proposal: dict[str, Any]) -> Any:
        """A limit is parsed by the core, as the same option would be ("512M" -> bytes)."""
        value = proposal["value"]
        name = proposal["trait"].name
        if value is None:
            return None
        try:
            parsed = Limits().with_overrides(**{name: value})
        except CoreUsageError as error:
            raise TraitError(f"{name}: {error}") from None
        return getattr(parsed, LIMIT_FIELDS[name])

    @validate("staging_limit")
    def _valid_staging_limit(self, proposal: dict[str, Any]) -> Any:
        value = proposal["value"]
        if value is None:
            return None
        try:
            return parse_size(value)
        except CoreUsageError as error:
            raise TraitError(f"staging_limit: {error}") from None

    @validate("gateway", "gateway_style")
    def _valid_gateway(self, proposal: dict[str, Any]) -> Any:
        value, name = proposal["value"], proposal["trait"].name
        if not value:
            return ""
        try:
            return parse_gateway(value) if name == "gateway" else parse_gateway_style(value)
        except CoreUsageError as error:
            raise TraitError(f"{name}: {error}") from None

    @validate("trusted_keys")
    def _valid_trusted_keys(self, proposal: dict[str, Any]) -> Any:
        try:
            return [parse_key_id(key) for key in proposal["value"]]
        except CoreUsageError as error:
            raise TraitError(f"trusted_keys: {error}") from None

    @observe(
        "api", "api_auth", "home", "staging_limit", "trusted_keys", "trust_any", *LIMIT_OVERRIDES
    )
    def _settings_changed(self, _change: dict[str, Any]) -> None:
        self.apply_settings()

    @observe("dask")
    def _dask_changed(self, _change: dict[str, Any]) -> None:
        with core_errors():
            ie.configure(self.settings(), dask=self.dask or False)
        cluster = ie.current_cluster()
        if cluster is not None:
            link = cluster.dashboard_link
            print(f"Dask cluster: {cluster.client}" + (f", dashboard {link}" if link else ""))

    def settings(self) -> Settings:
        """The core's settings: the environment's, changed by this object's config."""
        with core_errors():
            limits = Settings.from_env().limits.overridden_by(self)
            return Settings.from_env(
                api=self.api or None,
                api_auth=self.api_auth or None,
                home=self.home or None,
                limits=limits,
                staging_limit_bytes=self.staging_limit,
                gateway=self.gateway or None,
                gateway_style=self.gateway_style or None,
                trusted_keys=tuple(self.trusted_keys) or None,
                trust_any=self.trust_any or None,
            )

    def apply_settings(self) -> None:
        """Rebuild the process's Runner (the one the Python API uses too)."""
        ie.configure(self.settings())

    def gateway_for(self, store: Store | None) -> Gateway:
        """Where links point: the core decides (`links.link_gateway`); a daemon's own gateway
        is asked once per connection."""
        settings = self.settings()
        if settings.gateway or settings.api is None or store is None:
            return link_gateway(settings, store)
        if store not in self._gateways:
            self._gateways[store] = link_gateway(settings, store)
        return self._gateways[store]

    # -- display (registered as IPython formatters by load_ipython_extension) ----------------

    def result_bundle(self, result: RunResult) -> Bundle:
        run = self.ledger.find(result)
        view = ResultView(
            result, self.gateway_for(result.store), stale=run.stale_text() if run else None
        )
        data = view.mimebundle()
        if run is None:
            return data, view.metadata()
        if view.browser is not None:
            run.listeners.append(view.browser.set_stale)  # rebound later: the header says so
        return data, result_metadata(result, reads=run.reads, binds=run.binds)

    # -- stale results (stale.py) ------------------------------------------------------------

    def cell_started(self, info: Any) -> None:
        """pre_run_cell: the cell as written, to know which `$name`s a magic line read."""
        self._cell = (str(info.raw_cell or ""), getattr(info, "cell_id", None))

    def refresh_stale(self, *_args: Any) -> None:
        """post_run_cell (and after each binding): mark the results whose inputs moved on."""
        self.ledger.refresh(self.user_ns)

    def _line_as_written(self, line: str, cell: str | None) -> str:
        """The magic line before IPython expanded `$name` and `{expr}` in it, found in the
        source of the cell running; the expanded line when it is not there."""
        source = self._cell[0]
        if cell is not None:
            first, _, body = source.lstrip().partition("\n")
            if first.startswith("%%ipfs_execute") and body.rstrip() == cell.rstrip():
                return first.removeprefix("%%ipfs_execute").strip()
            return line
        written = [
            text.strip().split("ipfs_execute", 1)[1].strip()
            for text in source.splitlines()
            if text.strip().startswith(("%ipfs_execute ", "%ipfs_execute\t"))
        ]
        return written[0] if len(written) == 1 else line

    def ref_bundle(self, ref: IpfsRef) -> dict[str, Any]:
        return ref_mimebundle(ref, self.gateway_for(ref._store))

    def entries_bundle(self, each: EntryResults) -> dict[str, Any]:
        run = self.ledger.find(each)
        stale = run.stale_text() if run is not None else None
        return entries_mimebundle(each, self.gateway_for(each.output._store), stale=stale)

    def _node_gateway(self) -> Gateway:
        # Verdicts and lineage hold no store: they were made with the process's Runner.
        return self.gateway_for(ie.default_runner().store)

    def verdict_bundle(self, verdict: Verdict) -> Bundle:
        return VerdictView(verdict, self._node_gateway()).mimebundle()

    def notebook_verdict_bundle(self, result: NotebookVerdict) -> Bundle:
        return NotebookVerdictView(result, self._node_gateway()).mimebundle()

    def lineage_bundle(self, node: LineageNode) -> Bundle:
        return LineageView(node, self._node_gateway()).mimebundle()

    def explanation_bundle(self, explanation: Explanation) -> Bundle:
        return ExplanationView(explanation, self._node_gateway()).mimebundle()

    # -- magics ------------------------------------------------------------------------------

    @magic_arguments()
    @kwds(usage=EXECUTE_USAGE, epilog=EXECUTE_EPILOG)
    @argument(
        "rootfs",
        metavar="ROOTFS",
        help="root filesystem: CID or IPFS path of a .tar.gz/.tar.zst/.tar file, or of a "
        "directory used as the root itself",
    )
    @argument(
        "input",
        metavar="INPUT",
        nargs="?",
        default=None,
        help="directory mounted read-only at /input (default: an empty directory)",
    )
    @argument(
        "-o",
        "--out",
        metavar="NAME",
        help="bind the result to this variable (also when the payload fails)",
    )
    @argument(
        "--interpreter",
        metavar="COMMAND",
        default=None,
        help="what runs the cell: /sbin/init COMMAND /input/SCRIPT (default: sh); "
        "Python runs unbuffered (the sandbox sets PYTHONUNBUFFERED=1)",
    )
    @argument(
        "--timeout",
        metavar="SECONDS",
        type=_seconds,
        default=None,
        help="wall-clock limit; the whole sandbox is killed after it",
    )
    @argument(
        "--memory",
        metavar="SIZE",
        type=_size,
        default=None,
        help="memory limit of the whole sandbox, e.g. 512M, 2G",
    )
    @argument(
        "--pids",
        metavar="N",
        type=_positive_int,
        default=None,
        help="limit on processes and threads",
    )
    @argument(
        "--cpus",
        metavar="N",
        type=arguments.cpus,
        default=None,
        help="CPU time per second of wall clock, in CPUs, e.g. 0.5",
    )
    @argument(
        "--tmp-size",
        metavar="SIZE",
        type=_size,
        default=None,
        help="size of the /tmp tmpfs, e.g. 64M",
    )
    @argument(
        "--output-size",
        metavar="SIZE",
        type=_size,
        default=None,
        help="disk space the payload may fill in /output, e.g. 1G",
    )
    @argument(
        "--output-files",
        metavar="N",
        type=_positive_int,
        default=None,
        help="files and directories the payload may make in /output",
    )
    @argument(
        "--no-cache",
        action="store_true",
        help="run even if an identical run is recorded (by default its result is "
        "returned and its output shown again, without running)",
    )
    @argument("-p", "--param", **arguments.PARAM_OPTION)
    @argument(
        "--each",
        action="store_true",
        help="run once per top-level entry of INPUT (the entry NAME at /input/NAME), in "
        "parallel (on the Dask cluster when one is configured); -o binds a directory of "
        "the outputs, one entry NAME each; each entry's run is cached on its own",
    )
    @argument(
        "--no-raise-error",
        action="store_true",
        help="a failing payload returns its result instead of raising",
    )
    @argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no live output and no progress; display the result only if it failed",
    )
    @line_cell_magic
    def ipfs_execute(self, line: str, cell: str | None = None) -> RunResult | EntryResults | None:
        """Run the cell in a sandbox: ROOTFS as /, INPUT read-only at /input, an empty /output.

        /output is added to IPFS; its CID is the result. The payload's stdout and stderr
        stream into the cell while it runs; there is no network inside.
        """
        words, payload_args = split_payload_args(line)
        try:
            options = self.ipfs_execute.parser.parse_args(words)
        except UsageError as error:
            hint = (
                " (arguments for the payload go after --)" if "unrecognized" in str(error) else ""
            )
            raise UsageError(f"{error}{hint}") from None
        name = check_name(options.out)
        check_ipfs_path("ROOTFS", options.rootfs)
        if options.input is not None:
            check_ipfs_path("INPUT", options.input)

        script: str | None = None
        interpreter = options.interpreter or "sh"
        if cell is None:
            if options.interpreter is not None:
                raise UsageError("--interpreter needs a cell to run (use %%ipfs_execute)")
        else:
            if not cell.strip():
                raise UsageError(
                    "the cell is empty: write the script below the magic line, or "
                    "use the line form %ipfs_execute ROOTFS INPUT -- ARG..."
                )
            script = cell if cell.endswith("\n") else cell + "\n"

        if options.each:
            return self._run_each(line, cell, options, payload_args, script, interpreter, name)
        stdout = None if options.quiet else _StreamForwarder("stdout")
        stderr = None if options.quiet else _StreamForwarder("stderr")
        progress = None if options.quiet else LiveStatus(PROGRESS_DELAY, STATUS_INTERVAL)

        def flush_output() -> None:
            for forwarder in (stdout, stderr):
                if forwarder is not None:
                    forwarder.flush()

        outcome = "failed"
        try:
            with core_errors():
                # The same call as the Python API's: on a cache hit it replays what the
                # recorded run printed, so the cell reads the same either way. With a Dask
                # cluster the run goes to a worker (what it printed comes when it ends).
                result = (ie.run if ie.current_cluster() is None else _on_cluster)(
                    options.rootfs,
                    options.input,
                    *payload_args,
                    **_run_options(options, script, interpreter),
                    on_stdout=stdout,
                    on_stderr=stderr,
                    on_progress=progress,
                )
            outcome = ""
        except KeyboardInterrupt as interrupt:
            # The core has killed the sandbox already; say so once and stop Run All.
            outcome = "interrupted"
            flush_output()  # the payload's last words before the line saying it was stopped
            print(INTERRUPTED_LINE, file=sys.stderr, flush=True)
            _short(interrupt, "KeyboardInterrupt")
            raise
        finally:
            flush_output()
            if progress is not None:
                progress.finish(outcome)

        written = self._line_as_written(line, cell)
        self._say_why_it_ran(result, self._last_run_of(written, cell, name))
        self._record_cell_run(written, cell, name, result)
        if not result.ok and not options.no_raise_error:
            raise PayloadFailedError(result, name)
        if options.quiet and result.ok:
            return None
        return result

    def _record_cell_run(
        self, line: str, cell: str | None, name: str | None, result: RunResult | EntryResults
    ) -> None:
        """Put a run of the magic (one run or an --each cell) in the ledger, stale when an
        input it read moves on, and bind its result to -o NAME: what read the old value of
        NAME is stale now."""
        run = self.ledger.add(
            line,
            cell,
            self.user_ns,
            binds=name,
            cell_id=self._cell[1],
            execution_count=getattr(self.shell, "execution_count", None),
        )
        run.result = result
        if name is not None:
            self.user_ns[name] = result
            self.refresh_stale()

    def _last_run_of(self, line: str, cell: str | None, binds: str | None) -> CellRun | None:
        """The latest earlier run of this cell in this kernel (by the front end's cell id,
        else by its -o NAME, else by its line and script), or None."""
        cell_id = self._cell[1]
        for earlier in reversed(self.ledger.runs):
            if cell_id is not None and earlier.cell_id is not None:
                if earlier.cell_id == cell_id:
                    return earlier
            elif (binds is not None and earlier.binds == binds) or (earlier.line, earlier.cell) == (
                line,
                cell,
            ):
                return earlier
        return None

    @staticmethod
    def _say_why_it_ran(result: RunResult, earlier: CellRun | None) -> None:
        """A cache miss of a cell that ran before: which part of the run changed, one line."""
        before = earlier.result if earlier is not None else None
        if result.cache_hit or not isinstance(before, RunResult) or before.record.key is None:
            return
        try:
            why = reason(ie.default_runner().store, before.record, result.record)
        except IpfsExecuteError:
            return  # the line is a courtesy: never fail a run for it
        if why is not None:
            print(f"ran: {why} since this cell's last run", flush=True)

    def _run_each(
        self,
        line: str,
        cell: str | None,
        options: Any,
        payload_args: list[str],
        script: str | None,
        interpreter: str,
        name: str | None,
    ) -> EntryResults | None:
        """`--each`: one run per entry of INPUT; a line per entry as it ends, then the
        composed output. A failed entry is named; the others' results stay bound."""
        if options.input is None:
            raise UsageError("--each needs an INPUT directory: its entries are what runs")
        done = 0

        def on_entry(entry: str, result: RunResult | None, error: str | None) -> None:
            nonlocal done
            done += 1
            if options.quiet and error is None:
                return
            how = "cached" if result is not None and result.cache_hit else "ran"
            if result is not None and not result.cache_hit and result.record.node:
                how += f" on node …{result.record.node[-6:]}"  # a cluster worker's
            state = f"✗ {error}" if error else f"✓ {how}"
            print(f"[{done}] {entry}: {state}", flush=True)

        progress = EntriesProgress()
        cluster = ie.current_cluster()
        status = (
            None
            if options.quiet
            else EntriesStatus(
                lambda: progress.snapshot(cluster.where if cluster is not None else None),
                PROGRESS_DELAY,
                STATUS_INTERVAL,
            )
        )
        outcome = "failed"
        try:
            with core_errors():
                each = ie.map_entries(
                    options.rootfs,
                    options.input,
                    *payload_args,
                    **_run_options(options, script, interpreter),
                    on_entry=on_entry,
                    progress=progress,
                )
            outcome = ""
        except KeyboardInterrupt:
            outcome = "interrupted"
            raise
        finally:
            if status is not None:
                status.finish(outcome)
        self._record_cell_run(self._line_as_written(line, cell), cell, name, each)
        if each.failed and not options.no_raise_error:
            names = ", ".join(each.failed)
            bound = f"; the others' outputs are bound to {name}" if name else ""
            raise UsageError(f"{len(each.failed)} of {done} entries failed: {names}{bound}")
        return None if options.quiet else each

    @line_magic
    def ipfs_rerun_stale(self, line: str) -> None:
        """Re-run, in order, every %%ipfs_execute cell of this kernel whose inputs changed.

        A cell is stale when a `$name` or `{name}` its magic line read now holds another CID
        (an upstream cell ran again). Each is run again from the source kept when it ran, its
        variables expanded anew (a cache hit where the run is recorded); a cell that reads a
        result re-run here is re-run after it. Prints what it re-ran.
        """
        if line.strip():
            raise UsageError("%ipfs_rerun_stale takes no arguments")
        self.refresh_stale()
        last = 0
        rerun = 0
        while True:
            pending = [run for run in self.ledger.stale_runs() if run.number > last]
            if not pending:
                break
            run = pending[0]
            last = run.number
            rerun += 1
            shown = f"In [{run.execution_count}]" if run.execution_count else f"run {run.number}"
            changed = run.stale_text() or ""
            print(f"re-running {shown} ({changed}): {run.source().splitlines()[0]}", flush=True)
            result = self._rerun(run)
            if result is not None:
                from IPython.display import display

                display(result)
        print(f"re-ran {plural(rerun, 'stale cell')}" if rerun else "no stale cells", flush=True)

    def _rerun(self, run: CellRun) -> RunResult | EntryResults | None:
        from IPython.utils.text import DollarFormatter

        try:
            # IPython's own expansion of a magic line, over the namespace as it is now.
            line = DollarFormatter().vformat(run.line, args=[], kwargs=dict(self.user_ns))
        except Exception:
            line = run.line  # as IPython does: a line that cannot be expanded stays as written
        before = self._cell
        self._cell = (run.source(), run.cell_id)
        try:
            result: RunResult | EntryResults | None = self.ipfs_execute(line, run.cell)
            return result
        finally:
            self._cell = before

    @magic_arguments()
    @argument(
        "path",
        metavar="PATH",
        help="local file or folder (relative to the kernel's working directory)",
    )
    @argument("-o", "--out", metavar="NAME", help="bind the CID to this variable")
    @line_magic
    def ipfs_add(self, line: str) -> IpfsRef:
        """Add a local file or folder to IPFS (pinned); return its CID (the same as `ie.add`).

        Dot-files are included and symlinks kept as symlinks; the CID is the one
        `ipfs add -r --hidden` gives with the unixfs-v1-2025 profile.
        """
        options = self.ipfs_add.parser.parse_args(shell_words(line))
        name = check_name(options.out)
        progress = AddProgressLine(PROGRESS_DELAY)
        outcome = "failed"
        try:
            with core_errors():
                ref = ie.add(Path(options.path).expanduser(), on_progress=progress)
            outcome = ""
        except KeyboardInterrupt:
            outcome = "interrupted"
            raise
        finally:
            progress.finish(outcome)
        if name is not None:
            self.user_ns[name] = ref
        return ref

    @magic_arguments()
    @argument(
        "entries",
        metavar="NAME=PATH",
        nargs="+",
        help="an entry of the new directory: NAME (may be a/b) set to PATH, a CID, IPFS "
        "path or bound value ($data, {counts}/sub)",
    )
    @argument("-o", "--out", metavar="NAME", help="bind the CID to this variable")
    @line_magic
    def ipfs_mkdir(self, line: str) -> IpfsRef:
        """Compose a new IPFS directory from existing content; return its CID (as `ie.mkdir`).

        Example: %ipfs_mkdir words.txt=$words code={repo}/src -o data
        """
        options = self.ipfs_mkdir.parser.parse_args(shell_words(line))
        name = check_name(options.out)
        entries: dict[str, str] = {}
        for word in options.entries:
            entry, sep, path = word.partition("=")
            if not sep or not entry or not path:
                raise UsageError(f"{word!r}: expected NAME=PATH")
            if entry in entries:
                raise UsageError(f"{entry!r} is given twice")
            check_ipfs_path(entry, path)
            entries[entry] = path
        with core_errors():
            ref = ie.mkdir(entries)
        if name is not None:
            self.user_ns[name] = ref
        return ref

    @magic_arguments()
    @argument(
        "image",
        metavar="NAME",
        help="an example image: busybox, empty, python or pkg-install",
    )
    @argument(
        "-o",
        "--out",
        metavar="VAR",
        help="bind the CID to this variable (default: NAME with - as _, e.g. pkg_install)",
    )
    @line_magic
    def ipfs_image(self, line: str) -> IpfsRef:
        """The CID of an example image (as `ie.images.build(NAME)`), bound to a variable.

        Built on first use into the data directory from pinned Debian packages (the same
        CID on every machine), then only looked up. Example: %ipfs_image python -o pyimage
        """
        from ..images.catalog import canonical_name

        options = self.ipfs_image.parser.parse_args(shell_words(line))
        with core_errors():
            image = canonical_name(options.image)  # a typo is named before anything else
        name = check_name(options.out or image.replace("-", "_"))
        with core_errors():
            ref = ie.images.build(image, on_progress=lambda text: print(text, flush=True))
        if name is not None:
            self.user_ns[name] = ref
        return ref

    @magic_arguments()
    @argument(
        "source",
        metavar="NAME_OR_PATH",
        help="a bound result or CID, or a CID or IPFS path ($name and {expr}/sub work too)",
    )
    @argument(
        "dest",
        metavar="DEST",
        help="local path (relative to the kernel's working directory)",
    )
    @argument("--force", action="store_true", help="replace DEST if it exists")
    @line_magic
    def ipfs_get(self, line: str) -> Path:
        """Write a file or directory from IPFS to a local path; return it (as `ie.get`).

        A directory becomes DEST itself (new or empty); a file becomes DEST, or DEST/NAME when
        DEST is a directory. Example: %ipfs_get {result}/counts.csv counts.csv
        """
        options = self.ipfs_get.parser.parse_args(shell_words(line))
        source = self._target(options.source, "NAME_OR_PATH")
        with core_errors():
            return ie.get(source, Path(options.dest).expanduser(), overwrite=options.force)

    # -- verification and lineage ------------------------------------------------------------

    def _target(self, word: str, option: str) -> Any:
        """A bound name's value, else the word itself, which must be a CID or IPFS path."""
        if word.isidentifier() and word in self.user_ns:
            return self.user_ns[word]
        try:
            IpfsPath.parse(word)
        except CoreUsageError as error:
            if word.isidentifier():
                raise UsageError(
                    f"{option}: no variable {word!r} is defined, and it is not a CID"
                ) from None
            check_ipfs_path(option, word)  # its message, with the hint for `$name`
            raise UsageError(f"{option}: {error}") from None
        return word

    @magic_arguments()
    @kwds(usage=VERIFY_USAGE, epilog=VERIFY_EPILOG)
    @argument(
        "target",
        metavar="NAME_OR_RECORD",
        nargs="?",
        default=None,
        help="a bound result (from %%%%ipfs_execute -o NAME or ie.run), or a run record "
        "CID, or the output CID of a recorded run ($name and {expr} work too)",
    )
    @argument(
        "--notebook",
        metavar="PATH.ipynb",
        default=None,
        help="verify every recorded run in this executed, saved notebook instead",
    )
    @argument(
        "--runs",
        metavar="N",
        type=_positive_int,
        default=1,
        help="re-runs per record, under varied conditions: the same staging, another "
        "staging location, a shuffled directory order, another start time "
        "(default 1)",
    )
    @argument("-o", "--out", metavar="NAME", help="bind the verdict to this variable")
    @line_magic
    def ipfs_verify(self, line: str) -> Verdict | NotebookVerdict:
        """Re-run a recorded run without the cache and check that the output is the same.

        Shows the verdict: each re-run's condition and whether its output matched the
        recorded one; for a mismatch, the files that differ (added, removed, changed, with
        their sizes), not just two CIDs. Returns the Verdict (.reproducible, .reruns); with
        --notebook a NotebookVerdict (.cells, one per recorded run, and .reproducible).
        """
        options = self.ipfs_verify.parser.parse_args(shell_words(line))
        name = check_name(options.out)
        if (options.target is None) == (options.notebook is None):
            raise UsageError("give either NAME_OR_RECORD or --notebook PATH.ipynb")
        runner = ie.default_runner()
        record_cid = None if options.target is None else self._record_cid_of(options.target)
        progress = VerifyProgress()
        summary = "stopped by an error"
        try:
            with core_errors():
                if record_cid is None:
                    whole = self._verify_notebook(
                        runner, Path(options.notebook).expanduser(), options.runs, progress
                    )
                    summary = f"verified {len(whole.cells)} recorded runs"
                    result: Verdict | NotebookVerdict = whole
                else:
                    result = self._verify_record(runner, record_cid, options.runs, progress)
                    summary = f"re-ran {plural(options.runs, 'time')}"
        except KeyboardInterrupt as interrupt:
            # The core has killed the sandbox already; say so once and stop Run All.
            summary = "interrupted"
            print(INTERRUPTED_LINE, file=sys.stderr, flush=True)
            _short(interrupt, "KeyboardInterrupt")
            raise
        finally:
            progress.finish(summary)
        if name is not None:
            self.user_ns[name] = result
        return result

    @staticmethod
    def _verify_record(
        runner: Runner, record_cid: str, runs: int, progress: VerifyProgress
    ) -> Verdict:
        stored = runner.results.find(record_cid)
        done = 0

        def report(rerun: RerunResult) -> None:
            nonlocal done
            done += 1
            matched = "same output" if rerun.matches else "DIFFERENT output"
            progress(f"re-run {done} of {runs} ({rerun.condition}): {matched}")

        progress(f"re-running without the cache ({plural(runs, 'run')})")
        return verify(runner, stored, runs=runs, on_rerun=report)

    @staticmethod
    def _verify_notebook(
        runner: Runner, path: Path, runs: int, progress: VerifyProgress
    ) -> NotebookVerdict:
        return verify_notebook(runner, path, runs=runs, on_progress=progress)

    def _record_cid_of(self, word: str) -> str:
        value = self._target(word, "NAME_OR_RECORD")
        if isinstance(value, RunResult):
            if not value.record_cid:
                raise UsageError(
                    f"{word}: this run has no record (it could not be stored), "
                    "so there is nothing to verify it against"
                )
            return value.record_cid
        text = str(value)
        try:
            IpfsPath.parse(text)
        except CoreUsageError:
            raise UsageError(
                f"NAME_OR_RECORD: {word} is {type(value).__name__} "
                f"{text[:40]!r}, not a run result, record CID or output "
                "CID"
            ) from None
        return text

    @magic_arguments()
    @kwds(usage=LINEAGE_USAGE, epilog=LINEAGE_EPILOG)
    @argument(
        "target",
        metavar="NAME_OR_CID",
        help="a bound result or CID (from %%%%ipfs_execute, %%ipfs_add, ...), a CID or "
        "an IPFS path ($name and {expr} work too)",
    )
    @argument("-o", "--out", metavar="NAME", help="bind the lineage to this variable")
    @line_magic
    def ipfs_lineage(self, line: str) -> LineageNode:
        """Show how a result came to be: the recorded runs behind it, back to the data.

        Walks run records back from the content: the run that produced it, the runs that
        produced that run's input and rootfs, and so on, to content no recorded run made
        (data added by hand, an image built elsewhere). Shown as a graph of runs (command,
        start time, exit status, record CID) and data, edges labelled rootfs, input and
        script. Returns the LineageNode (.record, .parents, .walk(), .to_text()).
        """
        options = self.ipfs_lineage.parser.parse_args(shell_words(line))
        name = check_name(options.out)
        value = self._target(options.target, "NAME_OR_CID")
        if isinstance(value, RunResult) and value.record.output is None:
            raise UsageError(f"{options.target}: this run has no output")
        text = str(value)
        check_ipfs_path("NAME_OR_CID", text)
        with core_errors():
            node = lineage(ie.default_runner().results, text)
        if name is not None:
            self.user_ns[name] = node
        return node

    @magic_arguments()
    @argument(
        "a",
        metavar="A",
        help="a bound result, run record CID or output CID ($name and {expr} work too)",
    )
    @argument(
        "b",
        metavar="B",
        nargs="?",
        default=None,
        help="the run to compare A with (default: the run of A's cell before A, in this kernel)",
    )
    @argument("-o", "--out", metavar="NAME", help="bind the explanation to this variable")
    @line_magic
    def ipfs_explain(self, line: str) -> Explanation:
        """Why two runs differ, part by part: rootfs, input files (added, removed, changed,
        with sizes), the script (a unified diff), arguments, parameters, environment, sandbox
        profile, tool versions; then the output files that differ. With one result, it is
        compared with the previous run of the same cell in this kernel. Returns the
        Explanation (.differences, .output_diffs, .reason(), .describe()); the command-line
        equivalent is `ipfs-execute explain A B`.
        """
        options = self.ipfs_explain.parser.parse_args(shell_words(line))
        name = check_name(options.out)
        runner = ie.default_runner()
        with core_errors():
            if options.b is None:
                first, second = self._previous_of(options.a), options.a
            else:
                first, second = options.a, options.b
            explanation = compare(
                runner.store,
                runner.results.find(self._record_cid_of(first)),
                runner.results.find(self._record_cid_of(second)),
            )
        if name is not None:
            self.user_ns[name] = explanation
        return explanation

    def _previous_of(self, word: str) -> str:
        """The record CID of the run of the same cell before the result bound to `word`."""
        value = self._target(word, "A")
        run = self.ledger.find(value) if isinstance(value, RunResult) else None
        if run is None:
            raise UsageError(
                f"{word}: not a result of %%ipfs_execute in this kernel; give two runs "
                "(%ipfs_explain A B)"
            )
        index = self.ledger.runs.index(run)
        for earlier in reversed(self.ledger.runs[:index]):
            same = (
                earlier.cell_id == run.cell_id
                if run.cell_id is not None and earlier.cell_id is not None
                else (run.binds is not None and earlier.binds == run.binds)
                or (earlier.line, earlier.cell) == (run.line, run.cell)
            )
            if same and isinstance(earlier.result, RunResult) and earlier.result.record_cid:
                return earlier.result.record_cid
        raise UsageError(
            f"{word}: its cell has not run before in this kernel; give two runs (%ipfs_explain A B)"
        )

    @magic_arguments()
    @argument(
        "path",
        metavar="PATH.ipynb",
        nargs="?",
        default=None,
        help="the executed, saved notebook (default: the one this kernel runs, when known)",
    )
    @argument("-o", "--output", metavar="BUNDLE.car", help="where to write the CAR file")
    @argument(
        "--pin-remote",
        metavar="SERVICE",
        help="ask this remote pinning service (configured in the node) to pin the bundle",
    )
    @line_magic
    def ipfs_share(self, line: str) -> None:
        """Bundle everything a saved, executed notebook names (rootfs, inputs, outputs, run
        records with their attestations, compositions) into one CAR file beside it, for
        `ipfs-execute import` elsewhere (no network needed). Save the notebook first: the
        bundle holds what the file on disk shows. As `ipfs-execute share` and `ie.share`.
        """
        from ..bundle import share

        options = self.ipfs_share.parser.parse_args(shell_words(line))
        path = options.path or self._notebook_path()
        with core_errors():
            shared = share(
                ie.default_runner(),
                Path(path).expanduser(),
                out=Path(options.output).expanduser() if options.output else None,
                pin_remote=options.pin_remote,
            )
        print(shared.describe(), flush=True)

    def _notebook_path(self) -> str:
        """The notebook this kernel runs, as JupyterLab and VS Code tell it (__session__,
        __vsc_ipynb_file__); a UsageError when neither does."""
        for variable in ("__vsc_ipynb_file__", "__session__"):
            value = self.user_ns.get(variable)
            if isinstance(value, str) and value.endswith(".ipynb"):
                return value
        raise UsageError("give the notebook's path: %ipfs_share PATH.ipynb")

    @line_magic
    def ipfs_node(self, line: str) -> None:
        """Show the IPFS node in use (as `ie.node_status()` and `ipfs-execute node status`):
        embedded or your own daemon, its API and gateway, the gateway links point to (this
        object's `gateway` config), the repo's size. Does not start the embedded node."""
        if line.strip():
            raise UsageError("%ipfs_node takes no arguments")
        from ..node_info import node_status

        with core_errors():
            print(node_status(self.settings()).describe())

    @line_magic
    def ipfs_du(self, line: str) -> None:
        """Show what the data directory holds: staging cache, node repo, kept outputs, runs,
        /output templates, the example images' tarballs (as `ie.du()` and `ipfs-execute du`)."""
        if line.strip():
            raise UsageError("%ipfs_du takes no arguments")
        with core_errors():
            print(ie.du())

    @magic_arguments()
    @argument(
        "--staging-keep",
        metavar="SIZE",
        help="keep the most recently used staging entries up to SIZE (default: keep none)",
    )
    @argument(
        "--kept-outputs",
        action="store_true",
        help="also delete kept outputs: outputs never added to IPFS (their only copy)",
    )
    @argument(
        "--images",
        action="store_true",
        help="also delete the example images' built tarballs: the next %%ipfs_image NAME "
        "builds again, to the same CID (apt-get needs the network if the cached Debian "
        "packages are gone too)",
    )
    @line_magic
    def ipfs_gc(self, line: str) -> None:
        """Free disk and say how much (as `ie.gc()` and `ipfs-execute gc`): staging entries no
        run is using, directories of runs whose process died, the node's unpinned blocks, the
        /output templates. Outputs, records and the result index are pinned, so every result a
        notebook names stays. Kept outputs are deleted only with --kept-outputs, the example
        images' tarballs only with --images."""
        options = self.ipfs_gc.parser.parse_args(shell_words(line))
        with core_errors():
            print(
                ie.gc(
                    options.staging_keep,
                    kept_outputs=options.kept_outputs,
                    images=options.images,
                )
            )


def load_ipython_extension(ipython: Any) -> None:
    """Register the magics, their config and the result formatters."""
    magics = IpfsExecuteMagics(ipython)
    ipython.register_magics(magics)
    for old in ipython.configurables:  # a reload: the old object stops listening
        if isinstance(old, IpfsExecuteMagics):
            with suppress(ValueError):
                ipython.events.unregister("pre_run_cell", old.cell_started)
                ipython.events.unregister("post_run_cell", old.refresh_stale)
    ipython.events.register("pre_run_cell", magics.cell_started)
    ipython.events.register("post_run_cell", magics.refresh_stale)
    # `%config IpfsExecuteMagics...` finds configurables here; keep one (reloads).
    ipython.configurables[:] = [
        c for c in ipython.configurables if not isinstance(c, IpfsExecuteMagics)
    ] + [magics]
    formatter = ipython.display_formatter.mimebundle_formatter
    formatter.for_type(RunResult, magics.result_bundle)
    formatter.for_type(IpfsRef, magics.ref_bundle)
    formatter.for_type(EntryResults, magics.entries_bundle)
    formatter.for_type(Verdict, magics.verdict_bundle)
    formatter.for_type(NotebookVerdict, magics.notebook_verdict_bundle)
    formatter.for_type(LineageNode, magics.lineage_bundle)
    formatter.for_type(Explanation, magics.explanation_bundle)
