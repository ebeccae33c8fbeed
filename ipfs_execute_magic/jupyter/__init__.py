"""The Jupyter layer: the `%%ipfs_execute` magics, the result view, verdicts and lineage.

Only this package imports IPython, ipywidgets and traitlets; the core stays usable without them.
`%load_ext ipfs_execute_magic` registers the magics (see `magics.load_ipython_extension`).
"""

from __future__ import annotations

from ..verification import NotebookVerdict
from .magics import IpfsExecuteMagics, PayloadFailedError, load_ipython_extension

__all__ = ["IpfsExecuteMagics", "NotebookVerdict", "PayloadFailedError", "load_ipython_extension"]
