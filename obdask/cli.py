"""The ``obdask`` command line (also ``dask obdask ...``).

User mistakes (bad plans, missing files, unreachable schedulers) print one
``error:`` line on stderr and exit 2; a run with failed jobs exits 1.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from obdask.cli_common import (
    EXIT_FAILED_JOBS,
    EXIT_SCHEDULER_LOST,
    EXIT_USAGE,
    _fail,
    _guard,
    hold_dashboard,
)
from obdask.exceptions import SchedulerLost

logger = logging.getLogger(__name__)

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
    """Check PLAN as run would, without a cluster; list every problem found."""
    from obdask.validate import validate_file

    parsed, problems = validate_file(plan)
    for line in problems:
        click.echo(f"error: {line}", err=True)
    if parsed is None:
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
        if job.get("unit") in ("chain", "batch"):
            extras.append(f"{job['unit']}={job['task']}")
        click.echo(f"  {job['key']}  lane={job['lane']}  deps={deps}  [{job['action']}]  "
                   f"{job['payload']}  {' '.join(extras)}".rstrip())
    opt = out["optimize"]
    click.echo(f"{opt['jobs']} jobs to run in {opt['tasks']} Dask tasks: "
               f"{len(opt['fused'])} fused chains, {len(opt['batched'])} batches")
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
@click.option("--tls", default=None, metavar="DIR", help="Mutual TLS with the certificates "
              "of `obdask certs init DIR` (config obdask.security.tls).")
@click.option("--dashboard", is_flag=True, help="Print the /obdask page URL and keep the "
              "embedded cluster up after the run until Ctrl-C.")
@_guard
def run(plan: str, scheduler: str | None, workers: int | None, workspace: str | None,
        resume: bool, wait_for_resources: str | None, as_json: bool,
        tls: str | None = None, dashboard: bool = False) -> None:
    """Run PLAN on Dask; exits 1 if any job failed."""
    import dask

    from obdask import settings
    from obdask.cluster import connect
    from obdask.runner import run as run_plan

    parsed = _load(plan)
    overrides = {} if wait_for_resources is None else {
        "obdask.run.wait-for-resources": wait_for_resources}
    if tls is not None:
        from obdask.security import load

        load(tls)  # a missing or incomplete folder is one error line, before any cluster
        overrides["obdask.security.tls"] = tls
    with dask.config.set(overrides):
        settings.check()  # every bad setting fails here, naming its key, before any job runs
    from obdask.confine import check_plan
    from obdask.runner import resolve_workspace

    check_plan(parsed, resolve_workspace(parsed, workspace))  # before any cluster starts
    _quiet_client_logs()
    bar = None if as_json else _ProgressBar(parsed.plan_id)
    try:
        with dask.config.set(overrides), connect(scheduler, workers, _announce) as client:
            result = run_plan(parsed, client, workspace=workspace, resume=resume,
                              progress=bar)
            if dashboard:
                if bar is not None:
                    bar.close()
                    bar = None
                _report(result, as_json)
                hold_dashboard(client, 0 if result.ok else EXIT_FAILED_JOBS)  # remote: returns
    except SchedulerLost as exc:
        if as_json and exc.result is not None:
            click.echo(json.dumps(exc.result.to_json(), default=str))
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_SCHEDULER_LOST)
    finally:
        if bar is not None:
            bar.close()
    if not dashboard:  # --dashboard reported before holding the cluster
        _report(result, as_json)
    sys.exit(0 if result.ok else EXIT_FAILED_JOBS)


def _report(result: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.to_json(), default=str))
    else:
        _print_summary(result)


@main.command()
@click.option("--scheduler", default=None, help="Scheduler address or scheduler-file .json; "
              "default: the budgets configured in this process (obdask.llm.budgets).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records.")
@_guard
def budgets(scheduler: str | None, as_json: bool) -> None:
    """Show token budgets: limit, used, reserved in flight, available.

    Windows print in their units (1d, 1h30m); --json gives them in seconds.
    """
    from obdask.cluster import configured_scheduler
    from obdask.llm import budget

    target, _ = configured_scheduler(scheduler)
    if target is None:
        frame = budget.budgets()
    else:
        from obdask.cluster import connect

        with connect(target, announce=_announce) as client:
            budget.install(client)
            frame = budget.budgets(client)
    if as_json:
        click.echo(frame.reset_index().to_json(orient="records"))
    elif frame.empty:
        click.echo("no budgets (set obdask.llm.budgets or obdask.llm.budget.set_budget)")
    else:
        if "window" in frame:  # in its units, as configured: 1d, not 86400.0
            frame = frame.astype({"window": object})
            frame["window"] = [_duration(w) for w in frame["window"]]
        click.echo(frame.to_string())


def _quiet_client_logs() -> None:
    """The CLI reports a lost or refused scheduler in one line of its own; the client's
    reconnect attempts would log a traceback per try before it.  (After importing
    distributed, whose logging setup would reset the levels.)"""
    import distributed  # noqa: F401

    for name in ("distributed.client", "distributed.comm", "distributed.core",
                 "distributed.utils"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _duration(seconds: Any) -> str:
    """Seconds for people: ``1d``, ``1h30m``, ``90s``, ``2.5s``; ``-`` for none."""
    if seconds is None or seconds != seconds:  # None or NaN: no window
        return "-"
    seconds = float(seconds)
    if seconds != int(seconds) or seconds <= 0:
        return f"{seconds:g}s"
    left, parts = int(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    return "".join(parts)


def _announce(line: str) -> None:
    """Which cluster a command uses: one line on stderr (stdout stays for --json)."""
    click.echo(line, err=True)


def _records_url(parsed) -> tuple[str, dict]:
    from obdask import config
    from obdask.prepare import store_url

    url = store_url("records", None, parsed)
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
@click.argument("job", required=False)
@click.option("--stdout", "stream", flag_value="stdout", help="Print JOB's stored stdout.")
@click.option("--stderr", "stream", flag_value="stderr", help="Print JOB's stored stderr.")
@click.option("--reply", "stream", flag_value="reply", help="Print JOB's model reply.")
@click.option("--diff", "stream", flag_value="diff", help="Print the diff JOB applied.")
@click.option("--json", "as_json", is_flag=True, help="Print the job records as JSON.")
@_guard
def show(plan: str, run_id: str | None, job: str | None, stream: str | None,
         as_json: bool) -> None:
    """Show the job records of one run of PLAN (default: the latest), or one JOB's output.

    RUN_ID may be left out: 'obdask show plan.md build --stderr' reads job 'build'
    of the latest run.  With JOB and no output flag, prints that job's record.
    """
    from obdask.outputs import find_record, output_bytes
    from obdask.records import RunStore, read_run

    parsed = _load(plan)
    url, options = _records_url(parsed)
    if run_id is not None and job is None and \
            run_id not in RunStore(url, parsed.plan_id, "~", options).previous_runs():
        run_id, job = None, run_id  # one argument that is not a recorded run: a job
    if stream and job is None:
        _fail(f"--{stream} needs a JOB: obdask show {plan} [RUN_ID] JOB --{stream}")
    records = read_run(url, parsed.plan_id, run_id, options)
    if not records:
        which = f"run {run_id}" if run_id else "run"
        _fail(f"no recorded {which} of plan {parsed.plan_id!r} under {url}")
    for r in records:
        r.setdefault("id", r.get("step"))
    if job is not None:
        where = f"run {run_id or records[0].get('run_id') or 'latest'} of plan " \
                f"{parsed.plan_id!r} (obdask runs {plan} lists the runs)"
        record = find_record(records, job, where)
        if stream is None:
            click.echo(json.dumps(record, indent=1, default=str))
            return
        data = output_bytes(record, stream, _artifact_store(parsed))
        if data:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        return
    if as_json:
        click.echo(json.dumps(records, default=str))
        return
    _print_table(records)


def _artifact_store(parsed):
    from obdask import config
    from obdask.artifacts import ArtifactStore
    from obdask.prepare import store_url

    url = store_url("artifacts", None, parsed)
    return ArtifactStore(url, config.storage_options(url))


@main.command()
@click.argument("plan", type=click.Path(dir_okay=False))
@click.argument("run_id", required=False)
@click.option("--interval", default=0.5, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds between looks at the records store.")
@_guard
def logs(plan: str, run_id: str | None, interval: float) -> None:
    """Follow a run of PLAN: print each job as it finishes, exit when the run ends.

    Follows the latest run (or RUN_ID); a finished run is printed at once; with no
    run yet, waits for the first one to start.  Exits 1 if the run failed.
    """
    parsed = _load(plan)
    url, options = _records_url(parsed)
    try:
        _follow(plan, parsed, url, options, run_id, interval)
    except KeyboardInterrupt:
        click.echo("stopped following (the run itself goes on)", err=True)
        sys.exit(130)


def _follow(plan: str, parsed: Any, url: str, options: dict, run_id: str | None,
            interval: float) -> None:
    from obdask.outputs import follow

    for record in follow(url, parsed.plan_id, options, run_id, interval, on_wait=_announce):
        if not record.get("summary"):
            _print_row(record)
            continue
        if record.get("ok") is None:
            _fail(f"run {record['run_id']} of plan {parsed.plan_id!r} ended without writing "
                  f"its records (its client is gone); 'obdask show {plan} {record['run_id']}' "
                  "shows what its workers completed")
        counts = ", ".join(f"{n} {s}" for s, n in sorted(record.get("counts", {}).items()))
        verdict = "ok" if record["ok"] else "FAILED"
        secs = record.get("duration_s")
        took = f" in {secs:.1f}s" if secs is not None else ""
        click.echo(f"{parsed.plan_id}: {verdict} ({counts}){took}; run {record['run_id']}")
        sys.exit(0 if record["ok"] else EXIT_FAILED_JOBS)


def _print_row(r: dict[str, Any]) -> None:
    secs = r.get("duration_s")
    exit_code = r.get("exit_code")
    click.echo(f"{str(r.get('id') or r.get('step'))[:28]:<28} {r.get('status', '-'):<16} "
               f"{str(r.get('worker') or '-')[:22]:<22} "
               f"{'-' if exit_code is None else exit_code:>4} "
               f"{'-' if secs is None else f'{secs:.2f}':>7}  {r.get('error') or ''}")


class _ProgressBar:
    """tqdm on stderr, created at the first update."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
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
    _print_stderr_tails(result)
    lost = result.summary.get("workers_lost") or []
    if lost:
        click.echo(f"workers lost during the run: {', '.join(lost)} (their jobs were re-run "
                   "elsewhere; recorded completions were not applied again)")
    if result.summary.get("warm_hit_rate") is not None:
        click.echo(f"warm-worker hit rate: {result.summary['warm_hit_rate']:.0%}")
    for model, used in sorted((result.summary.get("tokens") or {}).items()):
        click.echo(f"tokens {model}: {used['prompt']} prompt + {used['output']} output "
                   f"in {used['calls']} calls")


def _print_stderr_tails(result: Any, jobs: int = 5, lines: int = 10) -> None:
    """The last lines of stderr of the first failed jobs (the rest: obdask show --stderr)."""
    from obdask.outputs import stderr_tail

    failed = [r for r in result.records if r["status"] == "failed" and r.get("stderr")]
    for r in failed[:jobs]:
        tail = stderr_tail(r, result._artifacts(), lines)
        if tail:
            click.echo(f"{r['id']}: stderr (last lines):")
            for line in tail:
                click.echo(f"    {line}")
    if len(failed) > jobs:
        click.echo(f"... stderr of {len(failed) - jobs} more failed jobs: "
                   f"obdask show PLAN {result.run_id} JOB --stderr")


def _print_table(rows: list[dict[str, Any]], limit: int = 40) -> None:
    shown = [r for r in rows if r["status"] in ("failed", "skipped")] if len(rows) > limit \
        else rows
    header = f"{'job':<28} {'status':<16} {'worker':<22} {'exit':>4} {'secs':>7}  error"
    click.echo(header)
    for r in shown[:limit]:
        _print_row(r)
    if len(shown) > limit or len(rows) > len(shown):
        click.echo(f"... {len(rows) - min(len(shown), limit)} more jobs not shown")


@main.group()
def certs() -> None:
    """Certificates for mutual TLS between clients, scheduler and workers."""


@certs.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--host", "hosts", multiple=True, metavar="NAME",
              help="DNS name for the scheduler/worker certificates (repeatable; default "
                   "localhost and this host's name).")
@click.option("--ip", "ips", multiple=True, metavar="ADDR",
              help="IP address for them (repeatable; default 127.0.0.1).")
@click.option("--days", type=click.IntRange(min=1), default=365, show_default=True,
              help="Validity of every certificate.")
@click.option("--force", is_flag=True, help="Replace certificates already in DIRECTORY.")
@_guard
def certs_init(directory: str, hosts: tuple[str, ...], ips: tuple[str, ...], days: int,
               force: bool) -> None:
    """Write a CA and scheduler, worker and client certificates to DIRECTORY."""
    from obdask.security import init_certs

    written = init_certs(directory, hosts=hosts or None,
                         ips=ips or None, days=days, force=force)
    for path in written.values():
        click.echo(str(path))
    click.echo(f"keys are mode 0600; start Dask with --tls-ca-file {directory}/ca.pem "
               "--tls-cert/--tls-key (docs/security.md) and obdask with --tls "
               f"{directory}", err=True)


from obdask.cli_session import session as _session  # noqa: E402
from obdask.judge_cli import attach as _attach_judge  # noqa: E402

main.add_command(_session)
_attach_judge(main, _guard, _announce)

from obdask.cli_stats import report, stats, why  # noqa: E402

main.add_command(stats)
main.add_command(why)
main.add_command(report)

if __name__ == "__main__":  # pragma: no cover
    main()
