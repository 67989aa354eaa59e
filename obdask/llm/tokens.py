"""Count tokens the way the bundled test server does (an estimate for real models).

Production code (the prompt estimate of budget reservations) and the test
server share this, so the client never imports :mod:`obdask.llm.testing`.
"""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """Count tokens the way the test server does: words and punctuation marks.

    Parameters
    ----------
    text : str
        Any text.

    Returns
    -------
    int
        ``len(re.findall(r"\\w+|[^\\w\\s]", text))``.
    """
    return len(_TOKEN_RE.findall(text or ""))
