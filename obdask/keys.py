"""Dask keys of obdask jobs: one task group per plan, ``plan::step`` for people.

A job's global id is ``{plan_id}::{step_id}`` (records, events, the CLI).  Its
Dask key is the tuple ``(group, job_id)``:

* Dask names task prefixes and groups after a tuple key's first element, so
  every job of a plan lands in one prefix and one group.  The dashboard then
  shows one progress bar per plan, Dask learns one duration average per plan,
  and the scheduler's per-prefix bookkeeping (``_calc_occupancy`` walks every
  prefix a worker holds) stays small.  With one prefix per job, a 15,000-job
  plan froze the scheduler's event loop for over a minute.
* ``group`` is the plan id, made to survive :func:`dask.utils.key_split`
  (which cuts ``nightly-2`` to ``nightly``): a hyphen that key_split would cut
  at becomes ``_``.

No Dask import here: plans compile without a cluster.
"""

from __future__ import annotations

import logging
import re
from typing import Any

logger = logging.getLogger(__name__)

SEPARATOR = "::"
_WORD = re.compile(r"^[A-Za-z]+$")
_HEX32 = re.compile(r"[a-f0-9]{32}")


def group_name(plan_id: str) -> str:
    """The first element of a plan's Dask keys: ``plan_id``, intact under key_split.

    ``key_split`` keeps the words after the first hyphen-separated word only
    while each is alphabetic and not eight letters starting with a-f, and stops
    at the first that is not.  A word joined with ``_`` glues onto the word
    before it (``a-b_2`` is the words ``a``, ``b_2``), so a hyphen is kept only
    when the word after it and every later word are kept too.
    """
    words = plan_id.split("-")
    # key_split keeps a first word as it is only when it starts with a letter
    # (otherwise it strips quotes, brackets and '_' and cuts at ','): prefix one.
    if not words[0][:1].isalpha():
        words[0] = "p" + words[0]
    kept_from = len(words)  # words[kept_from:] keep their hyphens
    while kept_from > 1 and _kept(words[kept_from - 1]):
        kept_from -= 1
    out = "_".join(words[:kept_from])
    if kept_from < len(words):
        out += "-" + "-".join(words[kept_from:])
    if _HEX32.fullmatch(out):  # key_split names a 32-hex-digit key "data"
        out += "_"
    return out


def _kept(word: str) -> bool:
    """Whether key_split keeps ``-word`` (dask.utils: alphabetic, and not 8 letters
    matching ``[a-f]+`` at the start: ``database`` is cut)."""
    return bool(_WORD.match(word)) and not (len(word) == 8 and word[0] in "abcdef")


def job_id(plan_id: str, step_id: str) -> str:
    """Global job id ``{plan_id}::{step_id}``."""
    return f"{plan_id}{SEPARATOR}{step_id}"


def dask_key(plan_id: str, step_id: str) -> tuple[str, str]:
    """Dask key ``(group_name(plan_id), job_id(plan_id, step_id))``."""
    return (group_name(plan_id), job_id(plan_id, step_id))


def dask_key_of(jid: str) -> tuple[str, str]:
    """The Dask key of global job id ``jid`` (plan ids hold no ``::``)."""
    plan_id = jid.split(SEPARATOR, 1)[0]
    return (group_name(plan_id), jid)


def job_id_of(key: Any) -> str | None:
    """The global job id inside a Dask key, or None when ``key`` is not an obdask job's.

    Accepts lists too: msgpack turns tuple keys into lists on the way to a
    scheduler handler.
    """
    if isinstance(key, (tuple, list)) and len(key) == 2:
        group, jid = key
        if isinstance(group, str) and isinstance(jid, str) and SEPARATOR in jid:
            return jid
    return None


def as_key(key: Any) -> Any:
    """A key that travelled through msgpack (lists) back as the tuple Dask uses."""
    if isinstance(key, list):
        return tuple(as_key(k) for k in key)
    return key
