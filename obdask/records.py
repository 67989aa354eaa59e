"""Durable run records on fsspec: the per-job ledger and the per-run record.

Layout under the records URL::

    <plan_id>/<run_id>/jobs/<step_id>.json   ledger: written by the worker when a job
                                             completes, before its task returns
    <plan_id>/<run_id>/jobs/<step_id>.unit.jsonl
                                             ledger of a fused or batched task on local
                                             disk: one line per completed job, appended
                                             (named after the task's first job)
    <plan_id>/<run_id>/started.json          client host, pid, job count: written when the
                                             run starts (``obdask logs``, obdask.outputs)
    <plan_id>/<run_id>/records.jsonl         one line per job, written by the client
    <plan_id>/<run_id>/summary.json          counts, timings, ok

The ledger is what makes side effects happen at most once per recorded
completion: a task that Dask re-runs (worker lost after the job finished)
finds its ledger entry and returns it instead of running the payload again.
``--resume`` reads ledgers and records of earlier runs of the same plan.

Every file is written whole or not at all (:func:`write_atomic`: write then
rename on local disk; one-request object writes on object stores).  A record
that is damaged anyway (truncated by hand, a full disk on another writer) is
logged as a warning naming file and line and skipped, never fatal: its step
gets a ``status: "damaged"`` record, which ``--resume`` does not count as done.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import posixpath
import re
import secrets
from collections.abc import Iterable
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from obdask.redact import redact_all, redact_obj
from obdask.stores import open_fs, store_errors

logger = logging.getLogger(__name__)

# Statuses that mean "this job's work is complete" (resume and ledger replay).
COMPLETE = frozenset({"done", "deduplicated", "done-at-compile", "resumed"})
#: Status of a step whose record could not be read (truncated or not JSON): not complete.
DAMAGED = "damaged"
_STEP_RE = re.compile(r'"step":\s*("(?:[^"\\]|\\.)*")')


@functools.lru_cache(maxsize=64)
def _open_run_store(url: str, plan_id: str, run_id: str, options: str) -> RunStore:
    return RunStore(url, plan_id, run_id, json.loads(options))


class JobRecord(dict):
    """One job's record as a task returns it: a plain ``dict`` in every respect but type.

    Dask serializes a plain ``dict`` result item by item (it looks for buffers
    inside collections); a subclass travels as one pickle.  Gathering 500 job
    records took ~0.35 ms each as dicts and ~0.07 ms each as this type.
    """

    __slots__ = ()


def new_run_id() -> str:
    """Sortable unique run id: UTC timestamp plus random suffix."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    return f"{now}-{secrets.token_hex(3)}"


class RunStore:
    """Ledger and records of one run of one plan.

    Picklable: it is shipped to workers inside every job's context.
    """

    def __init__(self, url: str, plan_id: str, run_id: str,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.plan_id = plan_id
        self.run_id = run_id
        self.storage_options = dict(storage_options or {})
        self.fs, root = open_fs("records", url, self.storage_options)
        self.plan_root = posixpath.join(root, plan_id)
        self.root = posixpath.join(self.plan_root, run_id)
        self._jobs_made = False
        # Local disk: plain file calls, a write-and-rename each (the ledger is on every
        # job's critical path; fsspec's local layer costs ~0.4 ms a call).
        self._local = isinstance(self.fs, LocalFileSystem)

    def __reduce__(self):
        # Every task carries the store: unpickle to one cached instance per process.
        return (_open_run_store, (self.url, self.plan_id, self.run_id,
                                  json.dumps(self.storage_options, sort_keys=True, default=str)))

    @property
    def location(self) -> str:
        """Human-readable location of this run's records."""
        return f"{self.url.rstrip('/')}/{self.plan_id}/{self.run_id}"

    def _ledger_path(self, step_id: str) -> str:
        return posixpath.join(self.root, "jobs", f"{step_id}.json")

    def ledger_get(self, step_id: str, units: bool = True) -> dict[str, Any] | None:
        """The completed record of ``step_id`` in this run, if any.

        ``units``: also look in the fused and batched tasks' ledgers
        (:class:`UnitLedger`; one listing of ``jobs/`` per call).  A task of one
        job only ever writes ``jobs/<step_id>.json`` and passes False.
        """
        path = self._ledger_path(step_id)
        try:
            if self._local:
                with open(path, "rb") as f:
                    data = f.read()
            else:
                data = self.fs.cat_file(path)
        except FileNotFoundError:
            return self._unit_records().get(step_id) if units else None
        return load_record(data, path)

    def ledger_many(self, step_ids: Iterable[str]) -> dict[str, dict[str, Any] | None]:
        """:meth:`ledger_get` of many steps, the unit ledgers read once."""
        in_units = self._unit_records()
        return {s: self.ledger_get(s, units=False) or in_units.get(s) for s in step_ids}

    def _unit_records(self) -> dict[Any, dict[str, Any]]:
        """The unit ledgers' records by step (the last line of a step wins); object
        stores have none (:meth:`unit_ledger`), so they are not listed."""
        if not self._local:
            return {}
        return {r.get("step"): r for r, _ in self.unit_entries(self.root)}

    def unit_ledger(self, first_step: str) -> UnitLedger | None:
        """The append-only ledger of a fused or batched task, on local disk; else None.

        One ``os.write`` of a JSON line per job instead of a file written and
        renamed per job (about 0.5 ms a job on this project's disks).  Object
        stores cannot append: their tasks keep one file per job.
        """
        if not self._local:
            return None
        return UnitLedger(posixpath.join(self.root, "jobs", f"{first_step}{UNIT_SUFFIX}"))

    def unit_entries(self, run_root: str) -> list[tuple[dict[str, Any], str]]:
        """Every complete line of the run's unit ledgers, as ``(record, "file:line")``."""
        try:
            paths = sorted(self.fs.glob(posixpath.join(run_root, "jobs", f"*{UNIT_SUFFIX}")))
        except FileNotFoundError:
            return []
        entries = []
        for path in paths:
            try:
                data = self.fs.cat_file(path)
            except FileNotFoundError:
                continue
            # a last line without its newline is being written, or was cut by a crash:
            # either way its job is not known to be done
            data = data[:data.rfind(b"\n") + 1]
            for lineno, line in enumerate(data.splitlines(), start=1):
                record = load_record(line, f"{path}:{lineno}") if line.strip() else None
                if record is not None:  # a damaged line (warned) is a job not done
                    entries.append((record, f"{path}:{lineno}"))
        return entries

    def ledger_put(self, step_id: str, record: dict[str, Any]) -> None:
        """Record a completed job (atomic where the filesystem allows)."""
        path = self._ledger_path(step_id)
        with store_errors("records", self.url, "write"):
            if not self._jobs_made:
                self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
                self._jobs_made = True
            write_atomic(self.fs, path, json.dumps(redact_obj(record), default=str).encode(),
                         local=self._local)

    def write_records(self, records: list[dict[str, Any]], summary: dict[str, Any],
                      redacted: bool = False) -> str:
        """Write the per-job lines and the summary; returns the records location.

        Each file is written whole or not at all (:func:`write_atomic`); the
        summary comes last, so a run with a summary has complete records.
        ``redacted=True``: the records were just masked (:func:`redact_all`) by
        the caller; the summary always is here.
        """
        lines = "".join(json.dumps(r, default=str) + "\n"
                        for r in (records if redacted else redact_all(records)))
        with store_errors("records", self.url, "write"):
            self.fs.makedirs(self.root, exist_ok=True)
            write_atomic(self.fs, posixpath.join(self.root, "records.jsonl"), lines.encode(),
                         local=self._local, sync=True)
            write_atomic(self.fs, posixpath.join(self.root, "summary.json"),
                         json.dumps(redact_obj(summary), default=str, indent=1).encode(),
                         local=self._local, sync=True)
        return self.location

    def previous_runs(self) -> list[str]:
        """Run ids of earlier runs of this plan, oldest first."""
        try:
            names = self.fs.ls(self.plan_root, detail=False)
        except FileNotFoundError:
            return []
        runs = sorted(posixpath.basename(n.rstrip("/")) for n in names)
        # beside the run folders: the plan's running.lock (obdask.runlock), dot files
        return [r for r in runs if r < self.run_id and not r.endswith(".lock")
                and not r.startswith(".")]

    def completed_before(self, steps: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Latest record per step id from earlier runs whose status was complete.

        Runs are read newest first and reading stops once every one of
        ``steps`` has a record, so a long history costs little.
        """
        wanted = set(steps) if steps is not None else None
        latest: dict[str, dict[str, Any]] = {}
        with store_errors("records", self.url, "read"):
            for run_id in reversed(self.previous_runs()):
                run_root = posixpath.join(self.plan_root, run_id)
                for record in self._read_run(run_root):
                    latest.setdefault(record["step"], record)
                if wanted is not None and wanted <= latest.keys():
                    break
        return {k: r for k, r in latest.items() if r.get("status") in COMPLETE}

    def _read_run(self, run_root: str) -> list[dict[str, Any]]:
        """Records of one run: ``records.jsonl``, completed by the ledger.

        A damaged line or ledger file is logged (file:line) and skipped; a step
        whose only record is damaged gets a ``status: "damaged"`` record, which
        is not complete (``--resume`` runs the step again).
        """
        records: list[dict[str, Any]] = []
        path = posixpath.join(run_root, "records.jsonl")
        try:
            text = self.fs.cat_file(path).decode("utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                records.append(_placeholder_record(line, f"{path}:{lineno}"))
        known = {r.get("step") for r in records if r.get("status") != DAMAGED}
        damaged = {r.get("step"): i for i, r in enumerate(records) if r.get("status") == DAMAGED}
        # A run that crashed before writing records still has its ledger.
        try:
            paths = self.fs.glob(posixpath.join(run_root, "jobs", "*.json"))
        except FileNotFoundError:
            paths = []
        ledger = [(_placeholder_record(self.fs.cat_file(path), path), path) for path in paths]
        for record, where in ledger + self.unit_entries(run_root):
            if record.get("status") == DAMAGED and where.endswith(".json"):
                record["step"] = posixpath.basename(where)[:-len(".json")]
            step = record.get("step")
            if step in known:
                continue
            if step in damaged:
                if record.get("status") != DAMAGED:  # the worker's own record stands in
                    records[damaged[step]] = record
                continue
            records.append(record)
            known.add(step)
        return [r for r in records if r.get("step") is not None]


#: File name suffix of a fused or batched task's ledger (:class:`UnitLedger`).
UNIT_SUFFIX = ".unit.jsonl"


class UnitLedger:
    """The ledger of one fused or batched task on local disk: a JSON-lines file.

    Each completed job is one line, written with a single ``os.write`` on an
    ``O_APPEND`` descriptor before the next job starts: a worker killed after it
    returns leaves the line in the file (the page cache outlives the process).
    A task re-run after its worker died opens the same file (named after its
    first job) and :meth:`get` returns what the earlier attempt recorded.  A
    line cut short by a crash mid-write is skipped (a warning) and its job
    counts as not done.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._records: dict[str, dict[str, Any]] = {}
        self._torn = False
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        self._torn = bool(data) and not data.endswith(b"\n")
        for lineno, line in enumerate(data.splitlines(), start=1):
            record = load_record(line, f"{path}:{lineno}") if line.strip() else None
            if record is not None and isinstance(record.get("step"), str):
                self._records[record["step"]] = record

    def get(self, step_id: str) -> dict[str, Any] | None:
        """The record an earlier attempt of this task wrote for ``step_id``, if any."""
        return self._records.get(step_id)

    def put(self, step_id: str, record: dict[str, Any]) -> None:
        """Append ``record`` (already redacted by the caller) as one line."""
        line = json.dumps(record, default=str).encode() + b"\n"
        if self._fd < 0:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            if self._torn:  # the next line must not be glued to a cut-off one
                line = b"\n" + line
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view):]
        self._records[step_id] = record

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> UnitLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_atomic(fs: Any, path: str, data: bytes, local: bool | None = None,
                 sync: bool = False) -> None:
    """Write ``data`` to ``path`` whole or not at all.

    On local disk the bytes go to a temporary file beside ``path`` that is
    then renamed over it (``os.replace``), so a crash or a full disk leaves
    the old file or none, never a truncated one; ``sync`` also flushes the
    file to disk before the rename.  Object stores (S3, GCS, ``memory://``)
    store an object in one request, which is atomic already.

    Parameters
    ----------
    fs
        The fsspec filesystem ``path`` is on.
    path
        Destination (a path of ``fs``).
    data
        The complete content.
    local
        Whether ``fs`` is local disk; default: looked up.
    sync
        ``fsync`` the file before renaming (records written once per run).
    """
    if local is None:
        local = isinstance(fs, LocalFileSystem)
    if not local:
        fs.pipe_file(path, data)
        return
    tmp = write_temp(path, data, sync)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def write_temp(path: str, data: bytes, sync: bool = False) -> str:
    """``data`` in a fresh temporary file beside ``path`` on local disk; its name.

    The name (``<path>.<pid>.<random>.tmp``) is unique to this write, so writers in
    other threads, processes or hosts sharing the folder never share one; listings
    skip ``.tmp`` names.  :func:`write_atomic` renames it over ``path``; the session
    store also links it to ``path`` to create a file exclusively.  On failure the
    temporary file is removed and the error raised.
    """
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _placeholder_record(data: bytes | str, where: str) -> dict[str, Any]:
    """:func:`load_record` with a placeholder for a damaged record (never None)."""
    record = load_record(data, where, placeholder=True)
    return record if record is not None else {"status": DAMAGED, "where": where}


def load_record(data: bytes | str, where: str, placeholder: bool = False,
                 note: str = "; its job counts as not done") -> dict[str, Any] | None:
    """Decode one JSON record; a damaged one is logged and skipped.

    Returns None for a damaged record, or with ``placeholder`` a record
    ``{"step": <id if readable>, "status": "damaged", "error": ...}``.
    """
    try:
        record = json.loads(data)
        if isinstance(record, dict):
            return record
        problem = f"not a JSON object ({type(record).__name__})"
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        problem = str(exc)
    if ":" not in where.rsplit("/", 1)[-1]:
        where = f"{where}:1"
    logger.warning("%s: damaged record skipped (%s)%s", where, problem, note)
    if not placeholder:
        return None
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    step = None
    if m := _STEP_RE.search(text):
        try:
            step = json.loads(m.group(1))
        except ValueError:
            step = None
    return {"step": step, "status": DAMAGED, "error": f"damaged record at {where}: {problem}"}


def run_summaries(url: str, plan_id: str,
                  storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """``summary.json`` of every finished run of a plan, oldest first."""
    store = RunStore(url, plan_id, "~", storage_options)
    summaries = []
    for run_id in store.previous_runs():
        path = posixpath.join(store.plan_root, run_id, "summary.json")
        summary = None
        try:
            summary = load_record(store.fs.cat_file(path), path,
                                   note="; the run is listed as incomplete")
        except FileNotFoundError:  # a run that died before writing its records
            pass
        summaries.append(summary if summary is not None else
                         {"run_id": run_id, "plan": plan_id, "ok": None, "counts": {}})
    return summaries


def read_run(url: str, plan_id: str, run_id: str | None = None,
             storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Records of a run (the latest one when ``run_id`` is None)."""
    store = RunStore(url, plan_id, run_id or "~", storage_options)
    if run_id is None:
        runs = store.previous_runs()
        if not runs:
            return []
        store = RunStore(url, plan_id, runs[-1], storage_options)
    return store._read_run(store.root)
