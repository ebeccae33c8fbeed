"""Parameters of a run (`-p n=10`, `params={"n": 10}`): environment variables of the payload.

Kept apart from record.py so that the command line can parse them without importing it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from .errors import UsageError

# A parameter is an environment variable of the payload: a shell name, and none that the
# sandbox itself sets (PATH, HOME, ...) or that changes how a program starts (LD_*, PYTHON*).
_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_RESERVED_PARAM_PREFIXES = ("LD_", "PYTHON", "BASH_", "IPFS_EXECUTE")
_RESERVED_PARAM_NAMES = frozenset(
    {"PATH", "HOME", "LANG", "LC_ALL", "TZ", "SOURCE_DATE_EPOCH", "IFS", "ENV", "SHELL", "PWD"}
)


def check_params(params: tuple[tuple[str, str], ...]) -> None:
    """Refuse a parameter that could not be, or must not be, an environment variable."""
    seen: set[str] = set()
    for name, value in params:
        if not _PARAM_NAME.fullmatch(name):
            raise UsageError(
                f"parameter name {name!r} is not a variable name: use letters, digits and "
                "_, not starting with a digit (e.g. -p n_rows=10)"
            )
        if name in _RESERVED_PARAM_NAMES or name.startswith(_RESERVED_PARAM_PREFIXES):
            raise UsageError(
                f"parameter {name} would change the sandbox's own environment: pick another "
                "name (PATH, HOME, LANG, TZ, LD_*, PYTHON* ... are the sandbox's)"
            )
        if name in seen:
            raise UsageError(f"parameter {name} is given twice: give it once")
        if "\0" in value:
            raise UsageError(f"parameter {name} holds a NUL byte, which no variable can hold")
        seen.add(name)


def params_from(values: Mapping[str, object] | None) -> tuple[tuple[str, str], ...]:
    """Parameters as a request holds them: strings kept as they are, anything else as JSON
    (10 -> "10", True -> "true", [1, 2] -> "[1, 2]"), in name order."""
    if not values:
        return ()
    params = tuple(
        (str(name), value if isinstance(value, str) else json.dumps(value))
        for name, value in sorted(values.items())
    )
    check_params(params)
    return params


def parse_param(text: str) -> tuple[str, str]:
    """`NAME=VALUE` from a command line (`-p n=10`)."""
    name, equals, value = text.partition("=")
    if not equals:
        raise UsageError(f"parameter {text!r} has no value: write it as NAME=VALUE (-p n=10)")
    check_params(((name, value),))
    return name, value
