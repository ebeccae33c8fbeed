"""ipfs_execute_magic: pure, shareable computations on IPFS content in a bubblewrap sandbox."""

from __future__ import annotations

__version__ = "0.1.0"
