"""Bokeh components of the obdask dashboard pages, in distributed's pattern.

Each component is a class taking the scheduler, with a ``source``
(``ColumnDataSource``), a ``root`` (the Bokeh model to show) and ``update()``
(reads :class:`~obdask.server.metrics.MetricsExtension` and the scheduler, fills
``source``); each is testable without a browser.  They run on the scheduler's
event loop (periodic callbacks of the Bokeh documents), so ``update`` only reads
bounded in-memory tables.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

from bokeh.layouts import column
from bokeh.models import ColumnDataSource, DataTable, HoverTool, NumberFormatter, TableColumn
from bokeh.plotting import figure
from distributed.dashboard.components import DashboardComponent
from distributed.dashboard.utils import update
from distributed.utils import log_errors

#: Table columns shown as numbers (the others as text).
NUMERIC = {"cpu_percent", "gpu_utilization", "mean_s"}
#: Seconds of token records "tokens per minute" looks back over.
WINDOW = 60.0


def _ext(scheduler: Any) -> Any:
    from obdask.server import extension

    return extension(scheduler, "metrics")


class TokensPerMinute(DashboardComponent):
    """Tokens per minute (input + output, last :data:`WINDOW` s) by model and endpoint."""

    @log_errors
    def __init__(self, scheduler: Any, window: float = WINDOW, **kwargs: Any) -> None:
        self.scheduler = scheduler
        self.window = window
        self.source = ColumnDataSource({k: [] for k in (
            "series", "model", "endpoint", "tokens_per_min", "input", "output", "calls")})
        kwargs.setdefault("height", 300)
        fig = figure(title="Tokens per minute by model @ endpoint", y_range=[], tools="",
                     name="obdask_tokens_per_minute", **kwargs)
        fig.hbar(y="series", right="tokens_per_min", height=0.8, source=self.source,
                 color="#6f42c1")
        fig.add_tools(HoverTool(tooltips=[("", "@series"), ("tokens/min", "@tokens_per_min{0,0}"),
                                          ("input", "@input{0,0}"), ("output", "@output{0,0}"),
                                          ("calls", "@calls")]))
        fig.xaxis.axis_label = "tokens / minute"
        self.root = fig

    @log_errors
    def update(self) -> None:
        ext = _ext(self.scheduler)
        sums: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        cutoff = time.time() - self.window
        for record in reversed(ext.tokens if ext is not None else ()):
            if (record.get("ts") or 0) < cutoff:
                break
            row = sums[(str(record.get("model")), str(record.get("endpoint")))]
            row[0] += int(record.get("prompt_eval_count") or 0)
            row[1] += int(record.get("eval_count") or 0)
            row[2] += 1
        keys = sorted(sums)
        scale = 60.0 / self.window
        data = {
            "series": [f"{m} @ {e}" for m, e in keys],
            "model": [m for m, _ in keys],
            "endpoint": [e for _, e in keys],
            "tokens_per_min": [(sums[k][0] + sums[k][1]) * scale for k in keys],
            "input": [sums[k][0] for k in keys],
            "output": [sums[k][1] for k in keys],
            "calls": [sums[k][2] for k in keys],
        }
        self.root.y_range.factors = data["series"]
        update(self.source, data)


def _table(source: ColumnDataSource, columns: list[tuple[str, str]], name: str,
           **kwargs: Any) -> DataTable:
    cols = [TableColumn(field=f, title=t, formatter=NumberFormatter(format="0,0.[0]"))
            if f in NUMERIC else TableColumn(field=f, title=t) for f, t in columns]
    kwargs.setdefault("height", 250)
    return DataTable(source=source, columns=cols, index_position=None, name=name, **kwargs)


class JobStatus(DashboardComponent):
    """Job status counts per plan and lane (finished jobs) and the jobs each plan has in flight."""

    @log_errors
    def __init__(self, scheduler: Any, **kwargs: Any) -> None:
        self.scheduler = scheduler
        self.source = ColumnDataSource({k: [] for k in (
            "plan", "lane", "done", "failed", "other", "mean_s")})
        self.inflight = ColumnDataSource({k: [] for k in (
            "plan", "waiting", "queued", "processing", "no_worker", "erred")})
        kwargs.pop("sizing_mode", None)
        done = _table(self.source, [("plan", "plan"), ("lane", "lane"), ("done", "done"),
                                    ("failed", "failed"), ("other", "other"),
                                    ("mean_s", "mean s")], "obdask_job_status", **kwargs)
        held = _table(self.inflight, [("plan", "plan"), ("waiting", "waiting"),
                                      ("queued", "queued"), ("processing", "processing"),
                                      ("no_worker", "no worker"), ("erred", "erred")],
                      "obdask_jobs_in_flight", height=150)
        self.root = column(done, held, sizing_mode="stretch_width")

    @log_errors
    def update(self) -> None:
        ext = _ext(self.scheduler)
        # since the scheduler started (the job table's running summary, not its records)
        rows = dict(ext.jobs.by_plan_lane) if ext is not None else {}
        keys = sorted(rows)
        update(self.source, {
            "plan": [p for p, _ in keys], "lane": [ln for _, ln in keys],
            "done": [rows[k][0] for k in keys], "failed": [rows[k][1] for k in keys],
            "other": [rows[k][2] for k in keys],
            "mean_s": [round(rows[k][3] / max(1, sum(rows[k][:3])), 3) for k in keys],
        })
        plans = ext.held_by_plan() if ext is not None else {}
        names = sorted(plans)
        update(self.inflight, {
            "plan": names,
            **{col: [plans[p].get(state, 0) for p in names] for col, state in (
                ("waiting", "waiting"), ("queued", "queued"), ("processing", "processing"),
                ("no_worker", "no-worker"), ("erred", "erred"))},
        })


class WorkerResources(DashboardComponent):
    """Workers with host CPU and RAM, their GPUs (count, utilization, VRAM) and loaded models."""

    COLUMNS = ("worker", "cpu_percent", "memory_used", "memory_total", "mem_text", "gpus",
               "gpu_utilization", "vram_used", "vram_total", "vram_text", "processing", "models")

    @log_errors
    def __init__(self, scheduler: Any, **kwargs: Any) -> None:
        self.scheduler = scheduler
        self.source = ColumnDataSource({k: [] for k in self.COLUMNS})
        kwargs.pop("sizing_mode", None)
        self.root = _table(self.source, [
            ("worker", "worker"), ("cpu_percent", "CPU %"), ("mem_text", "RAM"),
            ("gpus", "GPUs"), ("gpu_utilization", "GPU %"), ("vram_text", "VRAM"),
            ("processing", "tasks"), ("models", "models")], "obdask_workers",
            sizing_mode="stretch_width", **kwargs)

    @log_errors
    def update(self) -> None:
        from dask.utils import format_bytes

        ext = _ext(self.scheduler)
        rows = ext.get_workers() if ext is not None else []

        def size(used: Any, total: Any) -> str:
            if not total:
                return "-"
            return f"{format_bytes(used or 0)} / {format_bytes(total)}"

        update(self.source, {
            "worker": [r["worker"] for r in rows],
            "cpu_percent": [r.get("cpu_percent") for r in rows],
            "memory_used": [r.get("memory_used") for r in rows],
            "memory_total": [r.get("memory_total") for r in rows],
            "mem_text": [size(r.get("memory_used"), r.get("memory_total")) for r in rows],
            "gpus": [r.get("gpus", 0) for r in rows],
            "gpu_utilization": [r.get("gpu_utilization") for r in rows],
            "vram_used": [r.get("vram_used", 0) for r in rows],
            "vram_total": [r.get("vram_total", 0) for r in rows],
            "vram_text": [size(r.get("vram_used"), r.get("vram_total")) for r in rows],
            "processing": [r.get("processing") for r in rows],
            "models": [", ".join(r.get("models") or []) for r in rows],
        })


class Budgets(DashboardComponent):
    """Token budgets: use (spent in the window + reserved) against each limit, and the window.

    A bar per budget (percent of its tokens, coloured at the pressure levels) and a
    table: name, what it covers, window, used, reserved, limit, use %, and when the
    oldest spending leaves the window (a windowed budget frees tokens then).
    """

    COLUMNS = ("name", "covers", "window", "used", "reserved", "limit", "use_text", "percent",
               "color", "frees")

    @log_errors
    def __init__(self, scheduler: Any, **kwargs: Any) -> None:
        self.scheduler = scheduler
        self.source = ColumnDataSource({k: [] for k in self.COLUMNS})
        kwargs.pop("sizing_mode", None)
        fig = figure(title="Token budgets: use of each limit (%)", y_range=[], tools="",
                     x_range=(0, 100), height=180, name="obdask_budgets_use",
                     sizing_mode="stretch_width", toolbar_location=None)
        fig.hbar(y="name", right="percent", height=0.8, source=self.source, color="color")
        fig.add_tools(HoverTool(tooltips=[("budget", "@name"), ("use", "@use_text"),
                                          ("window", "@window"), ("frees", "@frees")]))
        fig.xaxis.axis_label = "% of the budget's tokens (spent in its window + reserved)"
        table = _table(self.source, [
            ("name", "budget"), ("covers", "covers"), ("window", "window"), ("used", "used"),
            ("reserved", "reserved"), ("limit", "limit"), ("use_text", "use"),
            ("frees", "oldest spending leaves")], "obdask_budgets",
            sizing_mode="stretch_width", height=150, **kwargs)
        self.root = column(fig, table, sizing_mode="stretch_width")

    @log_errors
    def update(self) -> None:
        from obdask.server import extension

        ext = extension(self.scheduler, "budgets")
        budgets = list(getattr(getattr(ext, "ledger", None), "budgets", {}).values())
        now = time.time()
        warning, critical = _levels()
        rows = []
        for b in budgets:
            used, limit = b.used(now), b.tokens
            share = (used + b.reserved) / limit if limit else 0.0
            expiry = b.next_expiry(now)
            rows.append({
                "name": b.name,
                "covers": "the cluster" if b.scope == "cluster" or not b.match
                else f"{b.scope} {b.match}",
                "window": f"{b.window:g} s" if b.window else "all time",
                "used": f"{used:,}", "reserved": f"{b.reserved:,}", "limit": f"{limit:,}",
                "use_text": f"{used + b.reserved:,} / {limit:,} ({100 * share:.0f} %)",
                "percent": min(100.0, 100 * share),
                "color": "#d62728" if share >= critical else "#ff7f0e" if share >= warning
                else "#2ca02c",
                "frees": f"in {max(0.0, expiry - now):.0f} s" if expiry is not None else "-",
            })
        self.root.children[0].y_range.factors = [r["name"] for r in rows]
        update(self.source, {k: [r[k] for r in rows] for k in self.COLUMNS})


def _levels() -> tuple[float, float]:
    import dask

    return (float(dask.config.get("obdask.metrics.pressure-warning", 0.8)),
            float(dask.config.get("obdask.metrics.pressure-critical", 0.95)))


class RecentEvents(DashboardComponent):
    """The newest obdask events (failed jobs, token records, ...), newest first."""

    @log_errors
    def __init__(self, scheduler: Any, limit: int = 50, **kwargs: Any) -> None:
        self.scheduler = scheduler
        self.limit = limit
        self.source = ColumnDataSource({"time": [], "topic": [], "text": []})
        kwargs.pop("sizing_mode", None)
        self.root = _table(self.source, [("time", "time"), ("topic", "topic"),
                                         ("text", "event")], "obdask_events",
                           sizing_mode="stretch_width", **kwargs)

    @log_errors
    def update(self) -> None:
        ext = _ext(self.scheduler)
        events = ext.events(limit=self.limit) if ext is not None else []
        events.reverse()
        update(self.source, {
            "time": [time.strftime("%H:%M:%S", time.localtime(e["ts"])) for e in events],
            "topic": [e["topic"] for e in events],
            "text": [json.dumps({k: v for k, v in e.items() if k not in ("ts", "topic")},
                                default=str)[:300] for e in events],
        })


class Waiting(DashboardComponent):
    """What is not running yet and why (:mod:`obdask.server.waiting`, as ``obdask why``)."""

    @log_errors
    def __init__(self, scheduler: Any, limit: int = 50, **kwargs: Any) -> None:
        self.scheduler = scheduler
        self.limit = limit
        self.source = ColumnDataSource({"what": [], "key": [], "cause": [], "message": []})
        kwargs.pop("sizing_mode", None)
        self.root = _table(self.source, [("what", "what"), ("key", "key"), ("cause", "cause"),
                                         ("message", "why")], "obdask_waiting",
                           sizing_mode="stretch_width", **kwargs)

    @log_errors
    def update(self) -> None:
        from obdask.server import extension

        ext = extension(self.scheduler, "waiting")
        rows = ext.waiting(self.limit) if ext is not None else []
        update(self.source, {k: [str(r.get(k, "")) for r in rows]
                             for k in ("what", "key", "cause", "message")})


class Sessions(DashboardComponent):
    """Sessions on the 5x3 grid of schedules and processes, and their flow codes.

    A cell is highlighted (and counts) where sessions are now; the table lists
    the newest sessions with state, position, flow code and tokens.
    """

    @log_errors
    def __init__(self, scheduler: Any, limit: int = 50, **kwargs: Any) -> None:
        from obdask.metrics import SCHEDULES
        from obdask.session.model import PROCESSES

        self.scheduler = scheduler
        self.limit = limit
        cells = [(s, p) for s in range(1, 6) for p in range(1, 4)]
        names = {(int(k[0]), int(k[1])): v.name for k, v in PROCESSES.items()}
        self.grid = ColumnDataSource({
            "schedule": [SCHEDULES[s] for s, _ in cells], "process": [f"P{p}" for _, p in cells],
            "name": [names[c] for c in cells], "count": [0] * len(cells),
            "color": ["#eeeeee"] * len(cells), "sessions": [""] * len(cells)})
        self.source = ColumnDataSource({k: [] for k in (
            "session", "state", "position", "process_name", "flow_code", "tokens")})
        kwargs.pop("sizing_mode", None)
        fig = figure(title="Sessions: schedule x process", name="obdask_sessions_grid",
                     x_range=["P1", "P2", "P3"], y_range=list(reversed(SCHEDULES.values())),
                     height=300, width=420, tools="", toolbar_location=None)
        fig.rect("process", "schedule", 0.95, 0.9, source=self.grid, fill_color="color",
                 line_color="#999999")
        fig.text("process", "schedule", text="name", source=self.grid, text_align="center",
                 text_baseline="middle", text_font_size="11px")
        fig.add_tools(HoverTool(tooltips=[("process", "@name"), ("sessions here", "@count"),
                                          ("", "@sessions")]))
        table = _table(self.source, [("session", "session"), ("state", "state"),
                                     ("position", "at"), ("process_name", "process"),
                                     ("flow_code", "flow code"), ("tokens", "tokens")],
                       "obdask_sessions", sizing_mode="stretch_width", **kwargs)
        self.root = column(fig, table, sizing_mode="stretch_width")

    @log_errors
    def update(self) -> None:
        from obdask.server import extension

        ext = extension(self.scheduler, "sessions")
        entries = list(getattr(ext, "sessions", {}).values())[-self.limit:]
        here: dict[str, list[str]] = defaultdict(list)
        rows = []
        for entry in entries:
            position = str(entry.get("position") or "")
            if entry.get("state") not in ("done", "failed", "cancelled"):
                here[position].append(str(entry["id"]))
            tokens = entry.get("tokens") or {}
            rows.append({"session": str(entry["id"]), "state": str(entry.get("state")),
                         "position": position, "process_name": str(entry.get("process") or ""),
                         "flow_code": str(entry.get("flow_code") or ""),
                         "tokens": str(int(tokens.get("input") or 0)
                                       + int(tokens.get("output") or 0))})
        rows.reverse()
        cells = [f"S{s}P{p}" for s in range(1, 6) for p in range(1, 4)]
        update(self.grid, {**dict(self.grid.data),
                           "count": [len(here[c]) for c in cells],
                           "color": ["#f4a261" if here[c] else "#eeeeee" for c in cells],
                           "sessions": [", ".join(here[c][:5]) for c in cells]})
        update(self.source, {k: [r[k] for r in rows] for k in (
            "session", "state", "position", "process_name", "flow_code", "tokens")})
