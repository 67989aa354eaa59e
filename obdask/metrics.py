"""The cluster's obdask metrics as pandas DataFrames (client side).

The scheduler's :class:`~obdask.server.metrics.MetricsExtension` keeps bounded
tables of job records, token records (one per model call) and worker resource
samples; these functions fetch them::

    from obdask import metrics

    metrics.jobs(client)                 # one row per job run
    metrics.tokens(client, by="model")   # calls, input/output tokens per model
    metrics.workers(client)              # CPU, RAM, disk, GPUs, VRAM per worker
    metrics.budgets(client)              # token budgets: limit, used, available
    metrics.events(client)               # obdask events (failed jobs, tokens, ...)
    metrics.sessions(client)             # sessions: state, schedule, process, flow code, tokens
    metrics.why(client, "plan::step")    # why a job or session is not running (a dict)

Each is awaitable with an asynchronous client.  pandas is needed here only,
never on the scheduler.
"""

from __future__ import annotations

from typing import Any

JOB_COLUMNS = ["job", "plan", "step", "run_id", "kind", "lane", "model", "worker", "status",
               "exit_code", "attempts", "warm", "started", "finished", "duration_s", "error"]
TOKEN_COLUMNS = ["ts", "model", "endpoint", "worker", "plan", "job", "session", "schedule",
                 "process", "role",
                 "prompt_eval_count", "eval_count", "total_duration", "load_duration",
                 "prompt_eval_duration", "eval_duration", "respent", "attempts"]
WORKER_COLUMNS = ["worker", "name", "ts", "cpu_percent", "memory_used", "memory_total",
                  "disk_used", "disk_total", "load_1m", "gpus", "gpu_utilization", "vram_used",
                  "vram_total", "dask_cpu", "dask_memory", "nthreads", "processing", "models"]
SESSION_COLUMNS = ["session", "state", "schedule", "schedule_name", "process", "process_name",
                   "position", "flow_code", "input_tokens", "output_tokens", "processes",
                   "live", "holder", "epoch", "question", "updated"]
#: The schedules of the 5x3 grid, by number (:class:`obdask.session.model.Schedule`).
SCHEDULES = {1: "Knowledge", 2: "Plan", 3: "Implement", 4: "Scale", 5: "Production"}
#: What :func:`tokens` can group by (``time``: buckets of ``freq``).
BY = ("model", "endpoint", "plan", "session", "worker", "job", "time")


def _call(client: Any, op: str, post: Any, **kwargs: Any) -> Any:
    async def run() -> Any:
        rows = await getattr(client.scheduler, op)(**kwargs)
        if rows is None:  # the scheduler closed the call: it has no such handler
            raise RuntimeError(
                f"the scheduler does not answer {op}; install obdask's scheduler plugin "
                "(obdask.server.install(client) or --preload obdask.preload.scheduler)")
        return post(rows)

    return client.sync(run)


def _frame(rows: list[dict[str, Any]], columns: list[str]) -> Any:
    import pandas as pd

    frame = pd.DataFrame.from_records(rows) if rows else pd.DataFrame(columns=columns)
    for column in columns:
        if column not in frame:
            frame[column] = None
    extra = [c for c in frame.columns if c not in columns]
    return frame[columns + extra]


def jobs(client: Any, since: float | None = None, limit: int | None = None,
         plan: str | None = None) -> Any:
    """Job records, oldest first: one row per job run (a retried job has one, with attempts).

    Columns: ``job`` (``plan::step``), ``plan``, ``step``, ``run_id``, ``kind``
    (``cmd``, ``file``, ``model``...), ``lane``, ``model``, ``worker``,
    ``status`` (``done``/``failed``), ``exit_code``, ``attempts``, ``warm``
    (warm-worker hit; None without locality), ``started``, ``finished``,
    ``duration_s``, ``error``.  ``since``: finished at or after this epoch time;
    ``plan``: that plan's jobs only (``limit`` counts those).
    """
    return _call(client, "obdask_metrics_jobs", lambda r: _frame(r, JOB_COLUMNS),
                 since=since, limit=limit, plan=plan)


def tokens(client: Any, by: str | list[str] | None = None, since: float | None = None,
           freq: str = "1min") -> Any:
    """Token records (one row per model call), or their sums grouped ``by``.

    Parameters
    ----------
    by : str or list of str, optional
        Any of :data:`BY`; ``"time"`` groups in buckets of ``freq``.  Grouped
        columns: ``calls``, ``input_tokens``, ``output_tokens``,
        ``total_tokens``, ``duration_s``, ``respent_calls``.
    since : float, optional
        Only calls at or after this epoch time.
    freq : str
        pandas frequency of the ``time`` buckets.
    """
    keys = [by] if isinstance(by, str) else list(by or [])
    bad = [k for k in keys if k not in BY]
    if bad:
        raise ValueError(f"tokens(by=...): {bad} not among {BY}")

    def post(rows: list[dict[str, Any]]) -> Any:
        frame = _frame(rows, TOKEN_COLUMNS)
        return group_tokens(frame, keys, freq) if keys else frame

    return _call(client, "obdask_metrics_tokens", post, since=since)


def group_tokens(frame: Any, by: list[str], freq: str = "1min") -> Any:
    """Sum a token-record frame by ``by`` (see :func:`tokens`)."""
    import pandas as pd

    frame = frame.copy()
    frame["time"] = pd.to_datetime(frame["ts"].astype(float), unit="s").dt.floor(freq) \
        if len(frame) else pd.Series([], dtype="datetime64[ns]")
    frame["input_tokens"] = frame["prompt_eval_count"].fillna(0).astype("int64")
    frame["output_tokens"] = frame["eval_count"].fillna(0).astype("int64")
    frame["total_tokens"] = frame["input_tokens"] + frame["output_tokens"]
    frame["duration_s"] = frame["total_duration"].fillna(0).astype(float) / 1e9
    frame["respent"] = frame["respent"].fillna(False).astype(bool)
    for key in by:
        if key != "time":
            frame[key] = frame[key].fillna("-").astype(str)
    grouped = frame.groupby(by, sort=True).agg(
        calls=("input_tokens", "size"), input_tokens=("input_tokens", "sum"),
        output_tokens=("output_tokens", "sum"), total_tokens=("total_tokens", "sum"),
        duration_s=("duration_s", "sum"), respent_calls=("respent", "sum"))
    return grouped


def workers(client: Any) -> Any:
    """One row per worker, indexed by address: its latest resource sample.

    Columns: host ``cpu_percent``, ``memory_used``/``memory_total``,
    ``disk_used``/``disk_total`` (its local directory's disk), ``load_1m``,
    ``gpus`` (count), ``gpu_utilization`` (mean %), ``vram_used``/``vram_total``
    (all GPUs, bytes), ``gpu_detail`` (per GPU), ``models`` (loaded by its local
    Ollama), Dask's ``dask_cpu``/``dask_memory`` (worker process), ``nthreads``,
    ``processing`` (tasks).  Sample columns are empty until the first sample
    (``obdask.metrics.interval``).
    """
    return _call(client, "obdask_metrics_workers",
                 lambda r: _frame(r, WORKER_COLUMNS).set_index("worker", drop=False))


def budgets(client: Any) -> Any:
    """Token budgets of the cluster (see :func:`obdask.llm.budget.budgets`)."""
    from obdask.llm.budget import budgets as _budgets

    return _budgets(client)


def events(client: Any, since: float | None = None, limit: int | None = 1000) -> Any:
    """The scheduler's ``obdask*`` events, oldest first (columns ``ts``, ``topic``, ...)."""
    return _call(client, "obdask_metrics_events",
                 lambda r: _frame(r, ["ts", "topic", "event", "key", "worker"]),
                 since=since, limit=limit)


def why(client: Any, key: str) -> Any:
    """Why the job ``key`` (``plan::step``) or session ``key`` is not running yet.

    Returns the scheduler's answer (:mod:`obdask.server.waiting`): a dict with
    ``key``, ``what`` (``job``, ``session`` or ``unknown``), ``state`` and
    ``reasons``, a list of dicts each with a ``cause`` (``dependencies``,
    ``no-worker``, ``queued``, ``budget``, ``slots``, ``lease``, ``human``,
    ``warm-worker-busy``, ``worker-busy``, ``running``, ...), a one-line
    ``message`` and that cause's details.
    """
    return _call(client, "obdask_why_get", lambda r: r, key=key)


def session_row(entry: dict[str, Any]) -> dict[str, Any]:
    """One row of :func:`sessions` from the sessions extension's shared state."""
    import re

    where = re.fullmatch(r"S(\d)P(\d)", str(entry.get("position") or ""))
    schedule = int(where.group(1)) if where else None
    tokens = entry.get("tokens") or {}
    question = entry.get("question") or {}
    return {"session": entry.get("id"), "state": entry.get("state"), "schedule": schedule,
            "schedule_name": SCHEDULES.get(schedule or 0),
            "process": int(where.group(2)) if where else None,
            "process_name": entry.get("process"), "position": entry.get("position"),
            "flow_code": entry.get("flow_code") or "",
            "input_tokens": int(tokens.get("input") or 0),
            "output_tokens": int(tokens.get("output") or 0),
            "processes": entry.get("processes"), "live": bool(entry.get("live")),
            "holder": entry.get("holder"), "epoch": entry.get("epoch"),
            "question": question.get("question"), "updated": entry.get("updated")}


def sessions(client: Any) -> Any:
    """The sessions the scheduler tracks, one row each (oldest first), indexed by id.

    Columns: ``state`` (``submitted``, ``running``, ``waiting``, ``done``,
    ``interrupted``...), ``schedule`` (1-5) and ``schedule_name``, ``process``
    (1-3) and ``process_name`` (``Research``...), ``position`` (``S2P1``,
    ``start``, ``done``), ``flow_code``, ``input_tokens``, ``output_tokens``,
    ``processes`` (run so far), ``live`` (a driver holds it), ``holder``,
    ``epoch``, ``question`` (asked of a human, else None), ``updated``.
    """
    return _call(client, "obdask_session_list",
                 lambda r: _frame([session_row(e) for e in r], SESSION_COLUMNS)
                 .set_index("session", drop=False))
