"""Replacing a small file whole: a reader meanwhile sees the old content or the new one."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path` and rename it over `path`.

    The temporary's name is this writer's alone, also among threads of one process (runs in
    threads may write the same file at once). If anything fails it is removed, and the error
    raised.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
