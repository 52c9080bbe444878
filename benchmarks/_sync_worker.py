"""`_worker.py` with the weight-sync case (`_sync.py`) added: one measured command, one JSON line.

    python benchmarks/_sync_worker.py '<json spec>'
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _worker  # noqa: E402
from _sync import setup_sync  # noqa: E402

_worker.SETUPS["sync"] = setup_sync

if __name__ == "__main__":
    _worker.main()
