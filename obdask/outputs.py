"""What jobs wrote, for people: stored outputs, stderr tails, following a run.

Job records hold only the sha1 of each stream (``stdout``, ``stderr``, a model's
``reply``, an applied ``diff``); the content lives in the artifact store
(:mod:`obdask.artifacts`).  This module turns records back into text, gives the
``.obdask/`` folder its ``.gitignore``, and follows a run as its workers write
ledger entries (``obdask logs``).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from obdask.artifacts import ArtifactStore
from obdask.exceptions import ObdaskError
from obdask.records import RunStore, load_record

logger = logging.getLogger(__name__)

#: Record fields that hold the sha1 of a stored output.
STREAMS = ("stdout", "stderr", "reply", "diff")
#: Integer record fields: pandas' nullable ``Int64`` in ``RunResult.frame``.
INTEGER_COLUMNS = ("exit_code", "attempts", "stdout_bytes", "stderr_bytes", "input_bytes",
                   "tokens", "prompt_eval_count", "eval_count", "model_attempts")
STARTED = "started.json"


def check_stream(which: str) -> str:
    """``which`` if it names a stored output, else an :class:`ObdaskError` saying the choices."""
    if which not in STREAMS:
        raise ObdaskError(f"{which!r} is not a stored output: use one of {', '.join(STREAMS)}")
    return which


def find_record(records: list[dict[str, Any]], job: str, where: str) -> dict[str, Any]:
    """The record of step ``job`` (or of its key ``plan::job``) among ``records``."""
    for record in records:
        if job in (record.get("id"), record.get("step"), record.get("key")):
            return record
    known = ", ".join(sorted(str(r.get("id") or r.get("step")) for r in records)[:10])
    raise ObdaskError(f"no job {job!r} in {where} (jobs: {known})")


def output_bytes(record: dict[str, Any], which: str, store: ArtifactStore) -> bytes | None:
    """Content of one output of a job; None when the job wrote nothing there.

    Raises
    ------
    ObdaskError
        The job's kind has no such output (a ``@cmd`` job has no ``reply``).
    """
    check_stream(which)
    job = record.get("id") or record.get("step")
    if which not in record:
        has = [s for s in STREAMS if s in record]
        hint = f"it has {', '.join('--' + s for s in has)}" if has else \
            f"its status is {record.get('status')!r} and it stored no output"
        raise ObdaskError(f"job {job!r} has no {which} ({hint})")
    digest = record.get(which)
    if not digest:
        return None
    return store.get(digest)


def output_text(record: dict[str, Any], which: str, store: ArtifactStore) -> str | None:
    """:func:`output_bytes` decoded as UTF-8 (undecodable bytes replaced)."""
    data = output_bytes(record, which, store)
    return None if data is None else data.decode("utf-8", errors="replace")


def stderr_tail(record: dict[str, Any], store: ArtifactStore, lines: int = 10) -> list[str]:
    """The last ``lines`` lines of a job's stored stderr ([] when none or unreadable)."""
    digest = record.get("stderr")
    if not digest:
        return []
    try:
        text = store.get(digest).decode("utf-8", errors="replace")
    except Exception as exc:  # noqa: BLE001 - a summary must not fail on a missing artifact
        logger.warning("stderr of job %s not readable: %s", record.get("id"), exc)
        return []
    return text.rstrip("\n").splitlines()[-lines:]


def ensure_gitignore(folder: str) -> None:
    """Create ``folder`` (local disk) with a ``.gitignore`` of ``*`` unless it has one.

    ``.obdask/`` then never shows up as untracked files in the user's repository.
    """
    path = os.path.join(folder, ".gitignore")
    if os.path.exists(path):
        return
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path, "x") as f:
            f.write("*\n")
    except FileExistsError:
        pass
    except OSError as exc:
        logger.warning("could not write %s: %s", path, exc)


def mark_started(store: RunStore, info: dict[str, Any]) -> None:
    """Write ``<run>/started.json`` (client host and pid) so ``obdask logs`` finds the run."""
    from obdask.records import write_atomic

    store.fs.makedirs(store.root, exist_ok=True)
    payload = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
               **info}
    write_atomic(store.fs, posixpath.join(store.root, STARTED),
                 json.dumps(payload, default=str).encode())


def _read_json(store: RunStore, name: str) -> dict[str, Any] | None:
    path = posixpath.join(store.root, name)
    try:
        return load_record(store.fs.cat_file(path), path, note="")
    except FileNotFoundError:
        return None


def _client_gone(started: dict[str, Any] | None) -> bool:
    """True when the run's client ran on this host and its process is gone."""
    if not started or started.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(started["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, KeyError, ValueError, TypeError):
        return False
    return False


def follow(url: str, plan_id: str, storage_options: dict[str, Any] | None = None,
           run_id: str | None = None, interval: float = 0.5,
           on_wait: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """Yield a run's job records as they are written, then its summary.

    Parameters
    ----------
    url, plan_id, storage_options
        Where the plan's run records are (``obdask.store.records``).
    run_id
        The run to follow; default: the latest run of the plan, or, when the
        plan has no run yet, the first one that starts.
    interval
        Seconds between looks at the store.
    on_wait
        Called once with a line when there is no run to follow yet.

    Yields
    ------
    dict
        Each job record once (``jobs/<step>.json`` and the lines of
        ``jobs/*.unit.jsonl`` as workers write them, then
        the records of ``records.jsonl`` not yet yielded), and last the run's
        summary with ``"summary": True``.  A run whose client process on this
        host is gone without a summary ends with ``{"summary": True, "ok": None}``.
    """
    probe = RunStore(url, plan_id, run_id or "~", storage_options)
    if run_id is None:
        waited = False
        while not (runs := probe.previous_runs()):
            if not waited and on_wait is not None:
                on_wait(f"waiting for a run of plan {plan_id!r} under {url}")
                waited = True
            time.sleep(interval)
        run_id = runs[-1]
    store = RunStore(url, plan_id, run_id, storage_options)
    seen: set[str] = set()
    while True:
        summary = _read_json(store, "summary.json")  # read before the ledger: nothing missed
        try:
            paths = sorted(store.fs.glob(posixpath.join(store.root, "jobs", "*.json")))
        except FileNotFoundError:
            paths = []
        for path in paths:
            step = posixpath.basename(path)[:-len(".json")]
            if step in seen:
                continue
            try:
                record = load_record(store.fs.cat_file(path), path, note="")
            except FileNotFoundError:
                continue
            if record is not None:
                seen.add(step)
                yield {"id": step, **record}
        for record, _ in store.unit_entries(store.root):  # fused and batched tasks' jobs
            step = record.get("step")
            if isinstance(step, str) and step not in seen:
                seen.add(step)
                yield {"id": step, **record}
        if summary is not None:
            for record in store._read_run(store.root):
                if record.get("step") not in seen:
                    seen.add(record["step"])
                    yield {"id": record["step"], **record}
            yield {**summary, "summary": True, "run_id": run_id}
            return
        if _client_gone(_read_json(store, STARTED)):
            yield {"summary": True, "ok": None, "run_id": run_id, "plan": plan_id}
            return
        time.sleep(interval)
