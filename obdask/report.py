"""``obdask report``: a standalone HTML report of a finished run or session.

Built from the durable record only (no cluster, no server): a run's job records
(:func:`obdask.records.read_run`) or a session's record
(:meth:`obdask.session.store.SessionStore.read`), drawn with Bokeh and written
with :func:`bokeh.embed.file_html` (Bokeh's JavaScript inlined, so the file
opens offline).
"""

from __future__ import annotations

import html
import logging
import time
from collections import defaultdict
from typing import Any

logger = logging.getLogger(__name__)


def _bars(title: str, labels: list[str], series: dict[str, list[float]], name: str) -> Any:
    from bokeh.models import ColumnDataSource, FactorRange
    from bokeh.plotting import figure

    colors = ["#4c78a8", "#f58518", "#54a24b", "#e45756"]
    fig = figure(title=title, x_range=FactorRange(factors=labels or ["-"]), height=300,
                 sizing_mode="stretch_width", name=name, tools="hover,save",
                 toolbar_location="right")
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        offset = -0.4 + width * (i + 0.5)
        source = ColumnDataSource({"x": labels, "y": values})
        from bokeh.transform import dodge

        fig.vbar(x=dodge("x", offset, range=fig.x_range), top="y", width=width * 0.9,
                 source=source, color=colors[i % len(colors)], legend_label=label)
    fig.xaxis.major_label_orientation = 0.8
    return fig


def _table(rows: list[dict[str, Any]], columns: list[str], name: str) -> Any:
    from bokeh.models import ColumnDataSource
    from bokeh.models.widgets import DataTable, TableColumn

    data = {c: [str(r.get(c, "") if r.get(c) is not None else "") for r in rows]
            for c in columns}
    return DataTable(source=ColumnDataSource(data), name=name, index_position=None,
                     columns=[TableColumn(field=c, title=c) for c in columns],
                     sizing_mode="stretch_width", height=min(600, 40 + 28 * max(1, len(rows))))


def run_layout(records: list[dict[str, Any]], title: str) -> Any:
    """Plots of one run's job records: durations, status counts, tokens, the jobs."""
    from bokeh.layouts import column
    from bokeh.models.widgets import Div

    jobs = [r for r in records if r.get("step") or r.get("id")]
    names = [str(r.get("step") or r.get("id")) for r in jobs]
    counts: dict[str, int] = defaultdict(int)
    for r in jobs:
        counts[str(r.get("status"))] += 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return column(
        Div(text=f"<h1>{html.escape(title)}</h1><p id='obdask-summary'>{len(jobs)} jobs: "
                 f"{html.escape(summary)}</p>"),
        _bars("Duration per job (s)", names,
              {"seconds": [float(r.get("duration_s") or 0) for r in jobs]}, "report_durations"),
        _bars("Tokens per job", names,
              {"input": [float(r.get("prompt_eval_count") or 0) for r in jobs],
               "output": [float(r.get("eval_count") or 0) for r in jobs]}, "report_tokens"),
        _table(jobs, ["step", "status", "worker", "exit_code", "duration_s", "attempts",
                      "error"], "report_jobs"),
        sizing_mode="stretch_width")


def _seconds(started: Any, ended: Any) -> float:
    return max(0.0, float(ended) - float(started)) if started and ended else 0.0


def session_layout(record: Any) -> Any:
    """Plots of one session's record: tokens and durations per process, its processes
    (role, model, tokens), the consultations and the notes (errors, default moves)."""
    from bokeh.layouts import column
    from bokeh.models.widgets import Div

    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for t in record.tokens:
        where = str(t.get("position") or "-")
        per[where][0] += float(t.get("input_tokens") or 0)
        per[where][1] += float(t.get("output_tokens") or 0)
    positions = list(per)
    snaps = []
    for s in record.snapshots:
        payload = s.payload if isinstance(s.payload, dict) else {}
        used = payload.get("tokens")
        used = used if isinstance(used, dict) else {}
        snaps.append({"index": s.index, "position": s.position, "process": s.name,
                      "role": payload.get("role"), "model": payload.get("model"),
                      "seconds": round(_seconds(s.started, s.ended), 3),
                      "input": used.get("input"), "output": used.get("output")})
    flow = record.state.flow_code if record.state is not None else ""
    total = record.tokens_total()
    respent = f" ({total['respent']} re-spent)" if total["respent"] else ""
    # the prompt is the user's text: escaped, a Div renders HTML
    prompt = html.escape(record.prompt or "")
    parts = [
        Div(text=f"<h1>Session {html.escape(record.id)}</h1><p id='obdask-summary'>status "
                 f"{html.escape(str(record.stored_status))}, flow code "
                 f"<code>{html.escape(flow)}</code>, {len(record.snapshots)} processes, "
                 f"tokens {total['input']} in, {total['output']} out{respent}, "
                 f"{len(record.consultations)} consultations</p>"
                 f"<p id='obdask-prompt'>Prompt: {prompt}</p>", sizing_mode="stretch_width"),
        _bars("Tokens per process", positions,
              {"input": [per[p][0] for p in positions],
               "output": [per[p][1] for p in positions]}, "report_tokens"),
        _bars("Duration per process (s)", [r["position"] for r in snaps],
              {"seconds": [r["seconds"] for r in snaps]}, "report_durations"),
        _table(snaps, ["index", "position", "process", "role", "model", "seconds", "input",
                       "output"], "report_processes"),
    ]
    if record.consultations:
        parts.append(Div(text="<h2>Consultations</h2>"))
        parts.append(_table([c.to_dict() for c in record.consultations],
                            ["position", "question", "answer", "source", "timed_out"],
                            "report_consultations"))
    if record.notes:
        parts.append(Div(text="<h2>Notes</h2>"))
        parts.append(_table(record.notes, ["index", "kind", "source", "text"], "report_notes"))
    return column(*parts, sizing_mode="stretch_width")


def write(layout: Any, path: str, title: str) -> str:
    """Write ``layout`` as one standalone HTML file (Bokeh inlined); return ``path``."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    page = file_html(layout, INLINE, title=title)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    logger.info("obdask report written to %s", path)
    return path


def stamp() -> str:
    """The report's creation time, for its title."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
