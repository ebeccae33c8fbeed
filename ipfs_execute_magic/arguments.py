"""The core's parsers as argparse types, shared by the front ends that parse options (the CLI
and the notebook magics): a bad value is reported by argparse with the core's own message."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .errors import UsageError
from .params import parse_param
from .settings import parse_count, parse_cpus, parse_seconds, parse_size


def argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` (raising UsageError) as an argparse type (raising ArgumentTypeError)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except UsageError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = parse.__name__  # argparse names the type in its messages
    return convert


seconds = argument_type(parse_seconds)
size = argument_type(parse_size)
count = argument_type(parse_count)
cpus = argument_type(parse_cpus)
param = argument_type(parse_param)

# The -p/--param option, the same in the CLI and the magic (argparse keywords).
PARAM_OPTION: dict[str, Any] = {
    "action": "append",
    "type": param,
    "default": [],
    "metavar": "NAME=VALUE",
    "help": "a parameter: the environment variable NAME of the payload ($NAME in a shell "
    "script); repeatable; part of what identifies the run, like the input",
}
