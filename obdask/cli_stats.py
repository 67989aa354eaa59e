"""``obdask stats`` (the cluster's obdask metrics as tables, :mod:`obdask.metrics`) and
``obdask why`` (why a job or session is not running yet)."""

from __future__ import annotations

import sys
from typing import Any

import click

from obdask.cli_common import EXIT_USAGE

BY = ("model", "endpoint", "plan", "session", "worker", "job", "time")


def _size(value: Any) -> str:
    from dask.utils import format_bytes

    try:
        return "-" if value is None or value != value else format_bytes(float(value))
    except (TypeError, ValueError):
        return "-"


def _workers_table(frame: Any) -> Any:
    """The workers frame with readable sizes and percentages."""
    shown = frame[["cpu_percent", "memory_used", "memory_total", "gpus", "gpu_utilization",
                   "vram_used", "vram_total", "processing"]].copy()
    for column in ("memory_used", "memory_total", "vram_used", "vram_total"):
        shown[column] = shown[column].map(_size)
    shown.index.name = "worker"
    return shown


def _jobs_table(frame: Any) -> Any:
    """Job counts per plan, lane and status, with total and mean durations."""
    if frame.empty:
        return frame
    frame = frame.assign(lane=frame["lane"].fillna(-1).astype(int))
    table = frame.groupby(["plan", "lane", "status"]).agg(
        jobs=("job", "size"), total_s=("duration_s", "sum"), mean_s=("duration_s", "mean"),
        attempts=("attempts", "sum"))
    return table.round(3)


@click.command()
@click.option("--scheduler", required=True, envvar="DASK_SCHEDULER_ADDRESS",
              help="Scheduler address or scheduler-file .json (or DASK_SCHEDULER_ADDRESS).")
@click.option("--by", "by", type=click.Choice(BY), default="model", show_default=True,
              help="How to group the token table.")
@click.option("--freq", default="1min", show_default=True,
              help="Bucket size of --by time (pandas frequency).")
def stats(scheduler: str, by: str, freq: str) -> None:
    """Print the cluster's obdask metrics: jobs, workers, tokens (grouped --by)."""
    from obdask.cli_common import _guard

    _guard(_stats)(scheduler, by, freq)


def _stats(scheduler: str, by: str, freq: str) -> None:
    import pandas as pd

    from obdask import metrics
    from obdask.cluster import connect

    with connect(scheduler) as client:
        from obdask.server import install

        install(client)
        jobs = metrics.jobs(client)
        workers = metrics.workers(client)
        tokens = metrics.tokens(client, by=by, freq=freq)
    with pd.option_context("display.width", 160, "display.max_columns", 20,
                           "display.max_rows", 200):
        click.echo(f"jobs ({len(jobs)} records):")
        click.echo(_jobs_table(jobs).to_string() if not jobs.empty else "  none yet")
        click.echo(f"\nworkers ({len(workers)}):")
        click.echo(_workers_table(workers).to_string() if not workers.empty else "  none")
        click.echo(f"\ntokens by {by}:")
        click.echo(tokens.to_string() if not tokens.empty else "  no model calls yet")


@click.command()
@click.argument("key")
@click.option("--scheduler", required=True, envvar="DASK_SCHEDULER_ADDRESS",
              help="Scheduler address or scheduler-file .json (or DASK_SCHEDULER_ADDRESS).")
@click.option("--json", "as_json", is_flag=True, help="Print the scheduler's answer as JSON.")
def why(key: str, scheduler: str, as_json: bool) -> None:
    """Say why the job KEY (plan::step) or session KEY is not running yet."""
    from obdask.cli_common import _guard

    _guard(_why)(key, scheduler, as_json)


def _why(key: str, scheduler: str, as_json: bool) -> None:
    import json

    from obdask import metrics
    from obdask.cluster import connect

    with connect(scheduler) as client:
        from obdask.server import install

        install(client)
        answer = metrics.why(client, key)
    if as_json:
        click.echo(json.dumps(answer, indent=2, default=str))
        return
    click.echo(f"{answer['what']} {answer['key']}: {answer.get('state') or '-'}")
    for reason in answer["reasons"]:
        click.echo(f"  {reason['cause']}: {reason['message']}")
    if answer["what"] == "unknown":
        sys.exit(EXIT_USAGE)


@click.command()
@click.argument("run_or_session")
@click.option("-o", "--output", default="report.html", show_default=True,
              help="The HTML file to write.")
@click.option("--run-id", default=None, help="Which run of the plan (default: the latest).")
@click.option("--store", default=None, help="Session store URL (default: obdask.sessions.store).")
@click.option("--workspace", default=None, help="Workspace of the session store's default.")
def report(run_or_session: str, output: str, run_id: str | None, store: str | None,
           workspace: str | None) -> None:
    """Write a standalone HTML report of a finished run (a PLAN file) or a SESSION id."""
    from obdask.cli_common import _guard

    _guard(_report)(run_or_session, output, run_id, store, workspace)


def _report(target: str, output: str, run_id: str | None, store: str | None,
            workspace: str | None) -> None:
    import os

    from obdask import report as rep

    if os.path.isfile(target):
        from obdask import config
        from obdask.plan import Plan
        from obdask.prepare import store_url
        from obdask.records import read_run

        plan = Plan.from_file(target)
        url = store_url("records", None, plan)
        records = read_run(url, plan.plan_id, run_id, config.storage_options(url))
        if not records:
            which = f"run {run_id}" if run_id else "run"
            raise click.ClickException(f"no recorded {which} of plan {plan.plan_id!r} "
                                       f"under {url}")
        which = run_id or records[0].get("run_id") or "latest"
        title = f"obdask run {plan.plan_id} {which}"
        layout = rep.run_layout(records, title)
    else:
        from obdask.session.store import open_store

        record = open_store(store, workspace).read(target)  # UnknownSession: one line
        title = f"obdask session {record.id}"
        layout = rep.session_layout(record)
    rep.write(layout, output, f"{title} ({rep.stamp()})")
    click.echo(output)
