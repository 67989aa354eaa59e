"""Durable run records on fsspec: the per-job ledger and the per-run record.

Layout under the records URL::

    <plan_id>/<run_id>/jobs/<step_id>.json   ledger: written by the worker when a job
                                             completes, before its task returns
    <plan_id>/<run_id>/records.jsonl         one line per job, written by the client
    <plan_id>/<run_id>/summary.json          counts, timings, ok

The ledger is what makes side effects happen at most once per recorded
completion: a task that Dask re-runs (worker lost after the job finished)
finds its ledger entry and returns it instead of running the payload again.
``--resume`` reads ledgers and records of earlier runs of the same plan.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import posixpath
import secrets
from collections.abc import Iterable
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from obdask.exceptions import PayloadError

logger = logging.getLogger(__name__)

# Statuses that mean "this job's work is complete" (resume and ledger replay).
COMPLETE = frozenset({"done", "deduplicated", "done-at-compile", "resumed"})
STATUSES = ("done", "failed", "skipped", "deduplicated", "done-at-compile", "resumed")


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
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
        except (ImportError, ValueError) as exc:
            raise PayloadError(f"records store {url!r}: {exc}") from exc
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

    def ledger_get(self, step_id: str) -> dict[str, Any] | None:
        """The completed record of ``step_id`` in this run, if any."""
        path = self._ledger_path(step_id)
        try:
            if self._local:
                with open(path, "rb") as f:
                    return json.loads(f.read())
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None

    def ledger_put(self, step_id: str, record: dict[str, Any]) -> None:
        """Record a completed job (atomic where the filesystem allows)."""
        path = self._ledger_path(step_id)
        if not self._jobs_made:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            self._jobs_made = True
        data = json.dumps(record, default=str).encode()
        if self._local:
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def write_records(self, records: list[dict[str, Any]], summary: dict[str, Any]) -> str:
        """Write the per-job lines and the summary; returns the records location."""
        self.fs.makedirs(self.root, exist_ok=True)
        lines = "".join(json.dumps(r, default=str) + "\n" for r in records)
        self.fs.pipe_file(posixpath.join(self.root, "records.jsonl"), lines.encode())
        self.fs.pipe_file(posixpath.join(self.root, "summary.json"),
                          json.dumps(summary, default=str, indent=1).encode())
        return self.location

    def previous_runs(self) -> list[str]:
        """Run ids of earlier runs of this plan, oldest first."""
        try:
            names = self.fs.ls(self.plan_root, detail=False)
        except FileNotFoundError:
            return []
        runs = sorted(posixpath.basename(n.rstrip("/")) for n in names)
        return [r for r in runs if r < self.run_id]

    def completed_before(self, steps: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Latest record per step id from earlier runs whose status was complete.

        Runs are read newest first and reading stops once every one of
        ``steps`` has a record, so a long history costs little.
        """
        wanted = set(steps) if steps is not None else None
        latest: dict[str, dict[str, Any]] = {}
        for run_id in reversed(self.previous_runs()):
            run_root = posixpath.join(self.plan_root, run_id)
            for record in self._read_run(run_root):
                latest.setdefault(record["step"], record)
            if wanted is not None and wanted <= latest.keys():
                break
        return {k: r for k, r in latest.items() if r.get("status") in COMPLETE}

    def _read_run(self, run_root: str) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        try:
            text = self.fs.cat_file(posixpath.join(run_root, "records.jsonl")).decode()
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except FileNotFoundError:
            pass
        known = {r["step"] for r in records}
        # A run that crashed before writing records still has its ledger.
        try:
            paths = self.fs.glob(posixpath.join(run_root, "jobs", "*.json"))
        except FileNotFoundError:
            paths = []
        for path in paths:
            record = json.loads(self.fs.cat_file(path))
            if record.get("step") not in known:
                records.append(record)
        return records


def run_summaries(url: str, plan_id: str,
                  storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """``summary.json`` of every finished run of a plan, oldest first."""
    store = RunStore(url, plan_id, "~", storage_options)
    summaries = []
    for run_id in store.previous_runs():
        path = posixpath.join(store.plan_root, run_id, "summary.json")
        try:
            summaries.append(json.loads(store.fs.cat_file(path)))
        except FileNotFoundError:  # a run that died before writing its records
            summaries.append({"run_id": run_id, "plan": plan_id, "ok": None, "counts": {}})
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
