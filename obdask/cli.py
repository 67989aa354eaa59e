"""The ``obdask`` command line (also ``dask obdask ...``).

User mistakes (bad plans, missing files, unreachable schedulers) print one
``error:`` line on stderr and exit 2; a run with failed jobs exits 1.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from obdask.exceptions import ObdaskError

logger = logging.getLogger(__name__)

EXIT_FAILED_JOBS = 1
EXIT_USAGE = 2


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def _guard(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn obdask errors and OS errors into a one-line message, no traceback."""
    import functools

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ObdaskError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            click.echo("interrupted (the run's jobs are released; completed ones stay in "
                       "the ledger for --resume)", err=True)
            sys.exit(130)
        except BrokenPipeError:  # `obdask explain plan.md | head`: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except (OSError, TimeoutError) as exc:
            _fail(f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            if not _is_storage_error(exc):
                raise  # a bug: keep the traceback
            _fail(f"storage: {type(exc).__name__}: {exc} (check the URL, credentials and "
                  "obdask.storage-options)")

    return wrapper


#: Packages whose exceptions mean "the store is unreachable or refuses", not an obdask bug.
_STORAGE_PACKAGES = ("botocore", "aiobotocore", "s3fs", "fsspec", "gcsfs", "adlfs", "aiohttp")


def _is_storage_error(exc: BaseException) -> bool:
    return type(exc).__module__.split(".", 1)[0] in _STORAGE_PACKAGES


def _load(path: str):
    from obdask.plan import Plan

    return Plan.from_file(path)


@click.group(name="obdask", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="obdask")
def main() -> None:
    """Run plans of coding jobs on a Dask cluster."""


@main.command()
@click.argument("plan", type=click.Path(dir_okay=False))
@_guard
def validate(plan: str) -> None:
    """Parse and check PLAN; list every problem found."""
    from obdask.exceptions import PlanError

    try:
        parsed = _load(plan)
    except PlanError as exc:
        for line in getattr(exc, "errors", [str(exc)]):
            click.echo(f"error: {line}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(f"{plan}: ok, plan {parsed.plan_id!r}, {len(parsed.steps)} steps")


def _shown(field: str, value: Any) -> str:
    """An explain field for people: ``GPU:1,VRAM:10GB``, ``90s``, lists comma-joined."""
    from obdask.resources import BYTE_RESOURCES

    if field == "resources" and isinstance(value, dict):
        return ",".join(f"{name}:{_size(amount) if name in BYTE_RESOURCES else f'{amount:g}'}"
                        for name, amount in value.items())
    if field == "timeout" and isinstance(value, (int, float)):
        return f"{value:g}s"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _size(amount: float) -> str:
    """Bytes in the decimal units plans use (``16GB`` = 16e9), no space: ``9.5GB``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if amount >= scale:
            return f"{amount / scale:.3g}{unit}"
    return f"{amount:g}B"


@main.command()
@click.argument("plan", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the compiled jobs as JSON.")
@click.option("--scheduler", default=None, metavar="ADDR",
              help="Place on this cluster (address or scheduler file): print exactly what "
                   "'run' would submit there.  Without it no cluster is needed.")
@_guard
def explain(plan: str, as_json: bool, scheduler: str | None) -> None:
    """Print the compiled jobs of PLAN with deps and annotations.

    Without --scheduler nothing connects: what depends on the cluster (lanes, model
    resources, routes to warm workers) is listed at the end.
    """
    from obdask.runner import explain as explain_plan

    parsed = _load(plan)
    if scheduler:
        from obdask.cluster import connect

        with connect(scheduler) as client:
            out = explain_plan(parsed, client)
    else:
        out = explain_plan(parsed)
    jobs = out["jobs"]
    if as_json:
        click.echo(json.dumps(out, indent=1, default=str))
        return
    click.echo(f"plan {parsed.plan_id}: {len(jobs)} jobs")
    for job in jobs:
        extras = [f"{k}={_shown(k, job[k])}" for k in ("resources", "retries", "timeout",
                                                        "model", "locality", "dedupe")
                  if job[k]]
        deps = ",".join(job["deps"]) or "-"
        click.echo(f"  {job['key']}  lane={job['lane']}  deps={deps}  [{job['action']}]  "
                   f"{job['payload']}  {' '.join(extras)}".rstrip())
    for note in out["cluster_dependent"]:
        click.echo(f"cluster-dependent: {note}")


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
@_guard
def hash(path: str) -> None:  # noqa: A001
    """Print the sha1 of PATH (local path or fsspec URL), for #sha1= pins."""
    import fsspec

    from obdask import config
    from obdask.artifacts import sha1_bytes

    try:
        with fsspec.open(path, "rb", **config.storage_options(path)) as f:
            digest = sha1_bytes(f.read())
    except FileNotFoundError:
        _fail(f"{path}: file not found")
    click.echo(f"{digest}  {path}")


@main.command()
@click.argument("plan", type=click.Path(dir_okay=False))
@click.option("--scheduler", default=None, help="Scheduler address or scheduler-file .json; "
              "default: an embedded LocalCluster.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Workers of the embedded cluster.")
@click.option("--workspace", default=None, help="Folder the jobs run in (default: the plan's).")
@click.option("--resume", is_flag=True, help="Skip jobs an earlier run of this plan completed.")
@click.option("--wait-for-resources", default=None, metavar="DURATION",
              help="Wait this long for a worker with a missing resource (default: fail at "
                   "once; config obdask.run.wait-for-resources).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object and nothing else.")
@_guard
def run(plan: str, scheduler: str | None, workers: int | None, workspace: str | None,
        resume: bool, wait_for_resources: str | None, as_json: bool) -> None:
    """Run PLAN on Dask; exits 1 if any job failed."""
    import dask

    from obdask.cluster import connect
    from obdask.runner import run as run_plan

    parsed = _load(plan)
    bar = None if as_json else _ProgressBar(parsed.plan_id)
    overrides = {} if wait_for_resources is None else {
        "obdask.run.wait-for-resources": wait_for_resources}
    try:
        with dask.config.set(overrides), connect(scheduler, workers) as client:
            if bar is not None:
                bar.header = _dashboard_line(client)
            result = run_plan(parsed, client, workspace=workspace, resume=resume,
                              progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        click.echo(json.dumps(result.to_json(), default=str))
    else:
        _print_summary(result)
    sys.exit(0 if result.ok else EXIT_FAILED_JOBS)


@main.command()
@click.option("--scheduler", default=None, help="Scheduler address or scheduler-file .json; "
              "default: the budgets configured in this process (obdask.llm.budgets).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records.")
@_guard
def budgets(scheduler: str | None, as_json: bool) -> None:
    """Show token budgets: limit, used, reserved in flight, available."""
    from obdask.llm import budget

    if scheduler is None:
        frame = budget.budgets()
    else:
        from obdask.cluster import connect

        with connect(scheduler) as client:
            budget.install(client)
            frame = budget.budgets(client)
    if as_json:
        click.echo(frame.reset_index().to_json(orient="records"))
    elif frame.empty:
        click.echo("no budgets (set obdask.llm.budgets or obdask.llm.budget.set_budget)")
    else:
        click.echo(frame.to_string())


def _records_url(parsed) -> tuple[str, dict]:
    from obdask import config
    from obdask.runner import _store_url

    url = _store_url("records", None, parsed)
    return url, config.storage_options(url)


@main.command()
@click.argument("plan", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_guard
def runs(plan: str, as_json: bool) -> None:
    """List the recorded runs of PLAN (from obdask.store.records)."""
    from obdask.records import run_summaries

    parsed = _load(plan)
    url, options = _records_url(parsed)
    summaries = run_summaries(url, parsed.plan_id, options)
    if as_json:
        click.echo(json.dumps(summaries, default=str))
        return
    if not summaries:
        click.echo(f"no recorded runs of {parsed.plan_id}")
    for summary in summaries:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(summary.get("counts", {}).items()))
        verdict = {True: "ok", False: "FAILED", None: "incomplete"}[summary.get("ok")]
        secs = summary.get("duration_s")
        took = f" in {secs:.1f}s" if secs is not None else ""
        click.echo(f"{summary['run_id']}  {verdict:<10} {counts}{took}")


@main.command()
@click.argument("plan", type=click.Path(dir_okay=False))
@click.argument("run_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the job records as JSON.")
@_guard
def show(plan: str, run_id: str | None, as_json: bool) -> None:
    """Show the job records of one run of PLAN (default: the latest)."""
    from obdask.records import read_run

    parsed = _load(plan)
    url, options = _records_url(parsed)
    records = read_run(url, parsed.plan_id, run_id, options)
    if not records:
        which = f"run {run_id}" if run_id else "run"
        _fail(f"no recorded {which} of plan {parsed.plan_id!r} under {url}")
    if as_json:
        click.echo(json.dumps(records, default=str))
        return
    for r in records:
        r.setdefault("id", r.get("step"))
    _print_table(records)


def _dashboard_line(client: Any) -> str | None:
    """``dashboard: URL`` of the obdask page of ``client``'s cluster, if it has a dashboard."""
    from obdask.dashboard import dashboard_url

    url = dashboard_url(client)
    return f"dashboard: {url}" if url else None


class _ProgressBar:
    """tqdm on stderr, created at the first update (after the optional ``header`` line)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar = None
        self.header: str | None = None  # printed once the jobs are submitted

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if self.header:
                click.echo(self.header, err=True)
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.label, unit="job", file=sys.stderr,
                            leave=False, disable=None)  # None: off when not a TTY
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _print_summary(result: Any, limit: int = 40) -> None:
    _print_table(result.records, limit)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(result.summary["counts"].items()))
    verdict = "ok" if result.ok else "FAILED"
    click.echo(f"{result.plan_id}: {verdict} ({counts}) in {result.duration_s:.1f}s; "
               f"records: {result.location}")
    if result.summary.get("warm_hit_rate") is not None:
        click.echo(f"warm-worker hit rate: {result.summary['warm_hit_rate']:.0%}")
    for model, used in sorted((result.summary.get("tokens") or {}).items()):
        click.echo(f"tokens {model}: {used['prompt']} prompt + {used['output']} output "
                   f"in {used['calls']} calls")


def _print_table(rows: list[dict[str, Any]], limit: int = 40) -> None:
    shown = [r for r in rows if r["status"] in ("failed", "skipped")] if len(rows) > limit \
        else rows
    header = f"{'job':<28} {'status':<16} {'worker':<22} {'exit':>4} {'secs':>7}  error"
    click.echo(header)
    for r in shown[:limit]:
        secs = r.get("duration_s")
        exit_code = r.get("exit_code")
        click.echo(f"{r['id'][:28]:<28} {r['status']:<16} {str(r.get('worker') or '-')[:22]:<22} "
                   f"{'-' if exit_code is None else exit_code:>4} "
                   f"{'-' if secs is None else f'{secs:.2f}':>7}  {r.get('error') or ''}")
    if len(shown) > limit or len(rows) > len(shown):
        click.echo(f"... {len(rows) - min(len(shown), limit)} more jobs not shown")


from obdask.cli_stats import stats  # noqa: E402

main.add_command(stats)

if __name__ == "__main__":  # pragma: no cover
    main()
