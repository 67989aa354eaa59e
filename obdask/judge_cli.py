"""``obdask judge TARGET`` and ``obdask demo``: the commands of :mod:`obdask.judge`.

Attached to the ``obdask`` group by :func:`attach` (called from :mod:`obdask.cli`).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

logger = logging.getLogger(__name__)


def attach(main: click.Group, guard: Any, announce: Any) -> None:
    """Add ``judge`` and ``demo`` to the ``obdask`` group."""

    @main.command("judge")
    @click.argument("target")
    @click.option("--run", "run_id", default=None, metavar="RUN_ID",
                  help="Which run of the plan TARGET (default: its latest finished run).")
    @click.option("--scheduler", default=None, help="Scheduler address or scheduler-file "
                  ".json; default: an embedded LocalCluster.")
    @click.option("--quorum", type=click.IntRange(min=1), default=None,
                  help="Experts that must answer (config obdask.judge.quorum).")
    @click.option("--deadline", default=None, metavar="DURATION",
                  help="How long the experts get (config obdask.judge.deadline).")
    @click.option("--json", "as_json", is_flag=True, help="Print the judgement as JSON.")
    @guard
    def judge_cmd(target: str, run_id: str | None, scheduler: str | None,
                  quorum: int | None, deadline: str | None, as_json: bool) -> None:
        """Have the expert panel judge TARGET: a plan file's run or a session id.

        Writes judgement.json next to the run's records or in the session's folder;
        exits 1 when fewer experts than the quorum answered.
        """
        from obdask.cluster import connect
        from obdask.exceptions import QuorumNotMet
        from obdask.judge import describe, judge, resolve_target

        resolve_target(target, run_id=run_id)  # an unknown target fails before any cluster
        with connect(scheduler, announce=announce) as client:
            try:
                j = judge(client, target, quorum=quorum, deadline=deadline, run_id=run_id)
            except QuorumNotMet as exc:
                click.echo(f"error: {exc}", err=True)
                sys.exit(1)
        if as_json:
            click.echo(json.dumps(j.to_dict(), default=str))
        else:
            for line in describe(j):
                click.echo(line)

    @main.command("demo")
    @click.option("--keep", is_flag=True, help="Keep the cluster up until Ctrl-C.")
    @guard
    def demo_cmd(keep: bool) -> None:
        """Run the whole mission on a simulated model fleet: a plan, the judge, a session.

        Starts an embedded cluster and the bundled Ollama-compatible test server
        (scripted replies: a SIMULATION, no real model runs), runs examples/quickstart
        in a temporary copy, has the panel judge it and prints the verdict and TLDR.
        """
        from obdask.demo import run_demo

        sys.exit(run_demo(keep=keep))
