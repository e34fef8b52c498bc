"""Process titles an operator recognises in ps and top."""

from __future__ import annotations

import setproctitle


def set_title(role: str) -> None:
    """Set the title to ``imgworker: <role>``; never put secrets or URLs in ``role``."""
    setproctitle.setproctitle(f"imgworker: {role}")
