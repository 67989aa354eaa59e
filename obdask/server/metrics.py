"""Scheduler extension: job, token and resource records in bounded tables.

Workers send three kinds of record over their batched stream (no extra
round trip; see :func:`obdask.server.worker.send_record`), all to the stream
handler ``obdask_metrics_record(worker, kind, record)``:

* ``job``: one per obdask job run (kind, lane, model, duration, status,
  exit code, warm hit), sent by :func:`obdask.execute.run_job`;
* ``tokens``: one per model call (model, endpoint, plan/job, session, prompt
  and output tokens, durations, re-spent flag), sent by
  :func:`obdask.llm.client.call_model`;
* ``sample``: the worker's resources every ``obdask.metrics.interval``
  (host CPU/RAM/disk from psutil, every GPU's utilization and VRAM from NVML);
* ``elapsed``: a running job past the warning fraction of its timeout (for
  :mod:`obdask.server.pressure` only; not stored).

Records are queued on the worker and sent every half second as
one ``batch`` message (``records``: ``[[kind, record], ...]``; the job records
packed apart, ``jobs``: :func:`obdask.server.jobtable.pack_jobs`), so a busy worker
adds at most two messages a second, not one per job, and the scheduler does not
decode a dict per job (it keeps them packed until read: :mod:`obdask.server.jobtable`).

Each goes into a ring buffer (``obdask.metrics.max-records`` records; job records
in a :class:`~obdask.server.jobtable.JobTable`; samples: the latest per worker plus
a bounded history), and into running
totals whose keys are low-cardinality labels (model, endpoint, status), so
memory stays bounded however long the scheduler runs.  The extension adds the
attempt count it sees in the scheduler's transitions to each job record.

Scheduler handlers: ``obdask_metrics_jobs``, ``obdask_metrics_tokens``,
``obdask_metrics_workers``, ``obdask_metrics_events`` (``since``, ``limit``)
return plain lists of dicts; :mod:`obdask.metrics` turns them into pandas
frames on the client.  :class:`PrometheusCollector` serves the totals on the
scheduler's ``/metrics`` under the OpenTelemetry GenAI names.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import dask

from obdask.keys import SEPARATOR, job_id_of
from obdask.server.jobtable import JobTable, unpack_jobs
from obdask.server.pressure import Pressure

logger = logging.getLogger(__name__)

RECORD_OP = "obdask_metrics_record"
KINDS = ("job", "tokens", "sample", "elapsed")
#: OpenTelemetry GenAI advisory bucket bounds: token usage and operation duration (s).
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
#: Seconds after which the sample of a worker the scheduler no longer has is dropped.
STALE = 60.0
#: Event topics :meth:`MetricsExtension.events` reads from the scheduler's event log.
EVENT_PREFIX = "obdask"


class _Histogram:
    """Cumulative-style histogram: per-bucket counts, sum and count."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def buckets(self) -> list[tuple[str, int]]:
        """``[(le, cumulative count), ...]`` ending with ``+Inf``, Prometheus style."""
        out, total = [], 0
        for bound, n in zip((*map(str, map(float, self.bounds)), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class MetricsExtension:
    """Bounded job, token and resource tables of the cluster (see the module docstring)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.jobs = JobTable(1)
        self.tokens: deque[dict[str, Any]] = deque()
        self.samples: deque[dict[str, Any]] = deque()
        self.configure()
        #: Latest sample per worker (workers that left are dropped).
        self.latest: dict[str, dict[str, Any]] = {}
        #: ``(model, endpoint) -> {calls, input, output, duration}`` since start.
        self.token_totals: dict[tuple[str, str], dict[str, float]] = {}
        self.histograms: dict[tuple[str, str, str], _Histogram] = {}
        #: Attempts of obdask jobs still held by the scheduler.
        self._attempts: dict[str, int] = {}
        #: Those of them that ran more than once (few: copied with each packed chunk).
        self._retried: set[str] = set()
        #: Task groups (one per plan) that held obdask jobs; pruned when Dask drops them.
        self._groups: dict[str, str] = {}
        #: Pressure events at the configured fractions of limits.
        self.pressure = Pressure(scheduler)
        _register_collector(scheduler)
        self._start_snapshots()
        self._start_clock()

    def configure(self) -> None:
        """(Re)read the buffer sizes from ``obdask.metrics``; keeps the newest records."""
        size = max(1, int(dask.config.get("obdask.metrics.max-records", 50_000)))
        history = max(1, int(dask.config.get("obdask.metrics.max-samples", 10_000)))
        self.jobs.resize(size)
        self.tokens = deque(self.tokens, maxlen=size)
        self.samples = deque(self.samples, maxlen=min(size, history))

    def _start_clock(self) -> None:
        """Session wall times against their limit every ``pressure-interval`` (pressure.py)."""
        from dask.utils import parse_timedelta
        from tornado.ioloop import PeriodicCallback

        interval = parse_timedelta(
            dask.config.get("obdask.metrics.pressure-interval", "1s"), default="s")
        if not interval or interval <= 0:
            return
        pc = PeriodicCallback(lambda: self._pressure("tick", time.time()),
                              max(0.05, float(interval)) * 1000)
        # stopped with the scheduler's own periodic callbacks (distributed's extension way)
        self.scheduler.periodic_callbacks["obdask-metrics-pressure"] = pc
        if self.scheduler.status.name == "running":
            pc.start()

    # -- parquet snapshots (obdask.server.snapshots) -------------------------------------
    def _start_snapshots(self) -> None:
        """Load the last snapshot and snapshot every ``snapshot-interval`` (with a URL)."""
        self.snapshot_url = dask.config.get("obdask.metrics.snapshot-url", None)
        self._snapshotting = False
        if not self.snapshot_url:
            return
        from dask.utils import parse_timedelta
        from tornado.ioloop import PeriodicCallback

        try:
            self.load_snapshot()
        except Exception:  # a damaged or unreadable snapshot must not stop the scheduler
            logger.exception("obdask: could not load metrics snapshot from %s",
                             self.snapshot_url)
        interval = parse_timedelta(
            dask.config.get("obdask.metrics.snapshot-interval", "60s"), default="s")
        pc = PeriodicCallback(self.snapshot, max(0.05, float(interval)) * 1000)
        # stopped with the scheduler's own periodic callbacks (distributed's extension way)
        self.scheduler.periodic_callbacks["obdask-metrics-snapshot"] = pc
        if self.scheduler.status.name == "running":
            pc.start()

    def load_snapshot(self) -> int:
        """Read the tables at ``snapshot-url`` into the buffers and totals; records read."""
        from obdask.server.snapshots import read_tables

        tables = read_tables(self.snapshot_url)
        for record in tables.get("tokens", []):
            self._add_tokens(record)
        for record in tables.get("jobs", []):
            self.jobs.append(record)
        n = sum(map(len, tables.values()))
        logger.info("obdask: %d metrics records loaded from %s", n, self.snapshot_url)
        return n

    async def snapshot(self) -> None:
        """Write the job and token tables to ``snapshot-url`` (in a thread; one at a time)."""
        if self._snapshotting or not self.snapshot_url:
            return
        import asyncio

        from obdask.server.snapshots import write_tables

        self._snapshotting = True
        try:
            tables = {"jobs": self.jobs.read(), "tokens": list(self.tokens)}
            await asyncio.get_running_loop().run_in_executor(
                None, write_tables, self.snapshot_url, tables)
        except Exception:  # the store is down: the next tick tries again
            logger.exception("obdask: metrics snapshot to %s failed", self.snapshot_url)
        finally:
            self._snapshotting = False

    @property
    def handlers(self) -> dict[str, Any]:
        """Scheduler handlers this extension answers."""
        return {"obdask_metrics_jobs": self.get_jobs,
                "obdask_metrics_tokens": self.get_tokens,
                "obdask_metrics_workers": self.get_workers,
                "obdask_metrics_events": self.events}

    @property
    def stream_handlers(self) -> dict[str, Any]:
        """Worker stream handlers: records arrive over the batched stream."""
        return {RECORD_OP: self._stream_record}

    # -- intake -----------------------------------------------------------------
    def _stream_record(self, worker: str | None = None, kind: str = "",
                       record: dict[str, Any] | None = None,
                       records: list[list[Any]] | None = None,
                       jobs: dict[str, Any] | None = None, **_: Any) -> None:
        # An exception in a stream handler would close the worker's stream.
        if jobs is not None:
            try:
                self.add_packed(jobs, worker)
            except Exception:
                logger.exception("obdask: bad packed job records from %s", worker)
        items = records if kind == "batch" else [[kind, record]]
        for item_kind, item in items or ():
            try:
                self.add(item_kind, dict(item or {}), worker)
            except Exception:
                logger.exception("obdask: bad metrics record %r %r", item_kind, item)

    def add(self, kind: str, record: dict[str, Any], worker: str | None = None) -> None:
        """Take one record of ``kind`` (``job``, ``tokens`` or ``sample``)."""
        if worker is not None:
            record.setdefault("worker", worker)
        if kind == "tokens":
            self._add_tokens(record)
            self._pressure("on_tokens", record, time.time())
        elif kind == "job":
            job = record.get("job")
            if job is not None and "attempts" not in record:
                record["attempts"] = self._attempts.get(job, 1)
            if job is not None and self.pressure.levels:
                self.pressure.job_ended(str(job))
            self.jobs.append(record)
        elif kind == "sample":
            record.setdefault("ts", time.time())
            self.samples.append(record)
            self.latest[str(record.get("worker"))] = record
            self._pressure("on_sample", str(record.get("worker")), record)
        elif kind == "elapsed":  # a running job near its timeout: pressure only, not stored
            self._pressure("on_elapsed", record)
        else:
            raise ValueError(f"unknown metrics record kind {kind!r}; use one of {KINDS}")

    def add_packed(self, packed: dict[str, Any], worker: str | None = None) -> None:
        """Take a worker's packed job records (:func:`~obdask.server.jobtable.pack_jobs`).

        Nothing is decoded here but while a job's time pressure level is up.
        """
        attempts = {job: self._attempts[job] for job in self._retried
                    if job in self._attempts} or None
        self.jobs.extend_packed(packed, worker, attempts)
        if any(scope.startswith("job:") for scope, _ in self.pressure.levels):
            for record in unpack_jobs(packed):
                self.pressure.job_ended(str(record.get("job")))

    @property
    def job_totals(self) -> dict[str, int]:
        """Jobs per status since start (past the buffer too)."""
        return self.jobs.totals

    def _pressure(self, method: str, *args: Any) -> None:
        try:
            getattr(self.pressure, method)(*args)
        except Exception:  # pressure is advice: never lose the record over it
            logger.exception("obdask: pressure check %s failed", method)

    def _add_tokens(self, record: dict[str, Any]) -> None:
        self.tokens.append(record)
        label = (str(record.get("model")), str(record.get("endpoint")))
        totals = self.token_totals.get(label)
        if totals is None:
            totals = self.token_totals[label] = {"calls": 0, "input": 0, "output": 0,
                                                 "duration": 0.0}
        inp, out = int(record.get("prompt_eval_count") or 0), int(record.get("eval_count") or 0)
        seconds = float(record.get("total_duration") or 0) / 1e9
        totals["calls"] += 1
        totals["input"] += inp
        totals["output"] += out
        totals["duration"] += seconds
        for kind, value, bounds in (("input", inp, TOKEN_BUCKETS), ("output", out, TOKEN_BUCKETS),
                                    ("duration", seconds, DURATION_BUCKETS)):
            key = (*label, kind)
            hist = self.histograms.get(key)
            if hist is None:
                hist = self.histograms[key] = _Histogram(bounds)
            hist.observe(value)

    # -- scheduler hooks (forwarded by ObdaskPlugin) ------------------------------
    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        """Count the attempts of obdask jobs (bounded: only jobs the scheduler holds)."""
        if finish == "processing":
            jid = job_id_of(key)
            if jid is not None:
                attempts = self._attempts[jid] = self._attempts.get(jid, 0) + 1
                if attempts > 1:
                    self._retried.add(jid)
                group = key[0] if isinstance(key, tuple) else None
                if group is not None and group not in self._groups:
                    self._groups[group] = jid.split(SEPARATOR, 1)[0]
        elif finish == "forgotten" and self._attempts:
            jid = job_id_of(key)
            if jid is not None:
                self._attempts.pop(jid, None)
                self._retried.discard(jid)

    def held_by_plan(self) -> dict[str, dict[str, int]]:
        """Jobs the scheduler holds now, per plan and task state (its per-group counts)."""
        out: dict[str, dict[str, int]] = {}
        groups = self.scheduler.task_groups
        for name, plan in list(self._groups.items()):
            tg = groups.get(name)
            if tg is None:
                del self._groups[name]
                continue
            counts = out.setdefault(plan, {})
            for state, n in tg.states.items():
                if n:
                    counts[state] = counts.get(state, 0) + n
        return out

    def held_states(self) -> dict[str, int]:
        """Jobs the scheduler holds now, by task state."""
        counts: dict[str, int] = {}
        for per_plan in self.held_by_plan().values():
            for state, n in per_plan.items():
                counts[state] = counts.get(state, 0) + n
        return counts

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        """Forget the latest sample and the pressure levels of a worker that left."""
        self.latest.pop(worker, None)
        self.pressure.forget(f"worker:{worker}")

    # -- handlers ---------------------------------------------------------------
    @staticmethod
    def _recent(rows: Sequence[dict[str, Any]], since: float | None, limit: int | None,
                field: str) -> list[dict[str, Any]]:
        if since is None and limit is not None:  # the newest only: no copy of the buffer
            newest = list(itertools.islice(reversed(rows), max(0, int(limit))))
            newest.reverse()
            return newest
        out = list(rows)
        if since is not None:
            out = [r for r in out if (r.get(field) or 0) >= since]
        if limit is not None:
            out = out[-int(limit):] if int(limit) > 0 else []
        return out

    def get_jobs(self, since: float | None = None, limit: int | None = None,
                 plan: str | None = None, columns: list[str] | None = None,
                 as_columns: bool = False) -> list[dict[str, Any]] | dict[str, list[Any]]:
        """Handler ``obdask_metrics_jobs``: job records, oldest first.

        ``plan``: only that plan's records (``limit`` counts those); ``columns``: only
        these fields of each; ``as_columns`` (with ``columns``): ``{field: values}``
        instead of a dict per record.  They cut what is decoded and serialized,
        which is most of the handler's cost: a runner sizing batches needs one
        plan's steps and durations, not the last 5000 records of every plan.
        """
        if as_columns and columns is not None:
            return self.jobs.read_columns(columns, since, limit, plan)
        return self.jobs.read(since, limit, plan, columns)

    def get_tokens(self, since: float | None = None, limit: int | None = None
                   ) -> list[dict[str, Any]]:
        """Handler ``obdask_metrics_tokens``: token records, oldest first."""
        return self._recent(self.tokens, since, limit, "ts")

    def get_workers(self) -> list[dict[str, Any]]:
        """Handler ``obdask_metrics_workers``: one row per worker, latest sample.

        Columns summarise the GPUs (count, mean utilization, VRAM used/total) and
        add what the scheduler knows (models loaded, Dask's own CPU/memory).
        """
        workers = self.scheduler.workers
        stale = time.time() - STALE
        for address, sample in list(self.latest.items()):
            if address not in workers and (sample.get("ts") or 0) < stale:
                del self.latest[address]  # a sample that arrived after its worker left
                self.pressure.forget(f"worker:{address}")
        addresses = list(workers) + [a for a in self.latest if a not in workers]
        return [worker_row(a, self.latest.get(a) or {}, workers.get(a)) for a in addresses]

    def events(self, since: float | None = None, limit: int | None = 1000
               ) -> list[dict[str, Any]]:
        """Handler ``obdask_metrics_events``: the scheduler's ``obdask*`` events, oldest first."""
        out = []
        for topic, events in self.scheduler.get_events().items():
            if not topic.startswith(EVENT_PREFIX):
                continue
            for ts, msg in events:
                if since is None or ts >= since:
                    row = dict(msg) if isinstance(msg, dict) else {"message": msg}
                    row.update(ts=ts, topic=topic)
                    out.append(row)
        out.sort(key=lambda r: r["ts"])
        return out[-int(limit):] if limit is not None else out


def worker_row(address: str, sample: dict[str, Any], ws: Any = None) -> dict[str, Any]:
    """One row of the workers table from a sample and the scheduler's WorkerState."""
    gpus = list(sample.get("gpus") or [])
    utils = [g["utilization"] for g in gpus if g.get("utilization") is not None]
    row = {
        "worker": address,
        "name": getattr(ws, "name", None),
        "ts": sample.get("ts"),
        "cpu_percent": sample.get("cpu_percent"),
        "memory_used": sample.get("memory_used"),
        "memory_total": sample.get("memory_total"),
        "disk_used": sample.get("disk_used"),
        "disk_total": sample.get("disk_total"),
        "load_1m": sample.get("load_1m"),
        "gpus": len(gpus),
        "gpu_utilization": sum(utils) / len(utils) if utils else None,
        "vram_used": sum(g.get("memory_used") or 0 for g in gpus),
        "vram_total": sum(g.get("memory_total") or 0 for g in gpus),
        "gpu_detail": gpus,
    }
    if ws is not None:
        metrics = getattr(ws, "metrics", {}) or {}
        row["dask_cpu"] = metrics.get("cpu")
        row["dask_memory"] = metrics.get("memory")
        row["nthreads"] = getattr(ws, "nthreads", None)
        row["processing"] = len(getattr(ws, "processing", ()) or ())
    row["models"] = sample.get("models")
    return row


# -- Prometheus -------------------------------------------------------------------


def _register_collector(scheduler: Any) -> None:
    """Serve :class:`PrometheusCollector` on the scheduler's ``/metrics`` (distributed's way).

    distributed instantiates the classes of its ``COLLECTORS`` list on the first
    request of ``/metrics`` and points them at the newest scheduler after that;
    before the first request the class is appended there, afterwards an instance
    is registered and joins those it re-points.
    """
    try:
        import prometheus_client
        from distributed.http.scheduler.prometheus import core
    except ImportError:
        return
    if PrometheusCollector not in core.COLLECTORS:
        core.COLLECTORS.append(PrometheusCollector)
    existing = core.PrometheusHandler._collectors
    if existing and not any(isinstance(c, PrometheusCollector) for c in existing):
        collector = PrometheusCollector(scheduler)
        prometheus_client.REGISTRY.register(collector)
        core.PrometheusHandler._collectors = (*existing, collector)


class PrometheusCollector:
    """obdask series for ``/metrics``: GenAI token usage and duration, jobs, worker resources.

    Names follow the OpenTelemetry GenAI semantic conventions as a collector
    exports them to Prometheus: ``gen_ai_client_token_usage`` (histogram,
    label ``gen_ai_token_type`` input/output) and
    ``gen_ai_client_operation_duration_seconds`` with ``gen_ai_request_model``,
    ``gen_ai_operation_name``, ``gen_ai_provider_name``, ``server_address``,
    ``server_port``; plus ``obdask_jobs_total{status}`` and per-worker gauges.
    """

    def __init__(self, server: Any) -> None:
        self.server = server

    def collect(self) -> Any:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        # the host plugin's table (obdask.server.extension, without importing the host)
        host = self.server.extensions.get("obdask")
        ext = getattr(host, "extensions", {}).get("metrics")
        if ext is None:
            return
        labels = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model",
                  "server_address", "server_port"]
        usage = HistogramMetricFamily(
            "gen_ai_client_token_usage", "Tokens used per model call (OpenTelemetry GenAI)",
            labels=[*labels, "gen_ai_token_type"], unit="")
        duration = HistogramMetricFamily(
            "gen_ai_client_operation_duration_seconds",
            "Duration of model calls (OpenTelemetry GenAI)", labels=labels)
        for (model, endpoint, kind), hist in list(ext.histograms.items()):
            values = ["chat", "ollama", model, *_host_port(endpoint)]
            if kind == "duration":
                duration.add_metric(values, hist.buckets(), hist.sum)
            else:
                usage.add_metric([*values, kind], hist.buckets(), hist.sum)
        yield usage
        yield duration
        jobs = CounterMetricFamily("obdask_jobs", "obdask jobs run, by final status",
                                   labels=["status"])
        for status, n in sorted(ext.job_totals.items()):
            jobs.add_metric([status], n)
        yield jobs
        held = GaugeMetricFamily("obdask_jobs_held", "obdask jobs the scheduler holds, by state",
                                 labels=["state"])
        for state, n in sorted(ext.held_states().items()):
            held.add_metric([state], n)
        yield held
        gauges = {
            "obdask_worker_cpu_percent": ("Host CPU use of the worker's machine", "cpu_percent"),
            "obdask_worker_memory_used_bytes": ("Host memory in use", "memory_used"),
            "obdask_worker_memory_total_bytes": ("Host memory", "memory_total"),
            "obdask_worker_gpus": ("GPUs NVML sees on the worker's machine", "gpus"),
        }
        rows = ext.get_workers()
        for name, (doc, column) in gauges.items():
            family = GaugeMetricFamily(name, doc, labels=["worker"])
            for row in rows:
                if row.get(column) is not None:
                    family.add_metric([row["worker"]], float(row[column]))
            yield family
        util = GaugeMetricFamily("obdask_gpu_utilization_ratio", "GPU utilization (0-1)",
                                 labels=["worker", "gpu"])
        vram = GaugeMetricFamily("obdask_gpu_memory_used_bytes", "GPU memory in use",
                                 labels=["worker", "gpu"])
        for row in rows:
            for gpu in row["gpu_detail"]:
                index = str(gpu.get("index"))
                if gpu.get("utilization") is not None:
                    util.add_metric([row["worker"], index], gpu["utilization"] / 100)
                vram.add_metric([row["worker"], index], float(gpu.get("memory_used") or 0))
        yield util
        yield vram


def _host_port(url: str) -> tuple[str, str]:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        return parts.hostname or "", str(parts.port or "")
    except ValueError:
        return url, ""
