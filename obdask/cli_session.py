"""``obdask session ...``: start, watch, answer, resume, show, list and cancel sessions.

Each command takes ``--json`` (one JSON object on stdout).  Bad input (an unknown id,
an answer to a session that asked nothing, a duplicate id, an unreachable store or
scheduler) is one ``error:`` line on stderr and exit 2.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import click

from obdask.cli_common import _fail, _guard, hold_dashboard  # noqa: E402

SCHEDULER = click.option("--scheduler", default=None, metavar="ADDR",
                         help="Scheduler address or scheduler-file .json.")
STORE = click.option("--store", default=None, metavar="URL",
                     help="Session store (default obdask.sessions.store, else "
                          "<workspace>/.obdask/sessions).")
WORKSPACE = click.option("--workspace", default=None, metavar="DIR",
                         help="Workspace whose .obdask/sessions holds the records.")
JSON = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


@contextlib.contextmanager
def _client(scheduler: str | None, required: bool = True) -> Iterator[Any]:
    if scheduler is None:
        if required:
            _fail("this command needs the cluster: pass --scheduler ADDR")
        yield None
        return
    from obdask.cluster import connect

    with connect(scheduler) as client:
        yield client


def _echo(obj: Any) -> None:
    click.echo(json.dumps(obj, default=str))


def _line(d: dict[str, Any]) -> str:
    return (f"{d['id']}  {d.get('state', '?'):<11} {d.get('position') or '-':<6} "
            f"{d.get('flow_code') or '-'}")


@click.group(name="session")
def session() -> None:
    """Orchestration sessions (5 schedules x 3 processes) running on the cluster."""


@session.command()
@click.argument("prompt")
@SCHEDULER
@STORE
@WORKSPACE
@click.option("--id", "session_id", default=None, help="Session id (default: time + random).")
@click.option("--wait", is_flag=True, help="Wait for the end (an embedded cluster without "
              "--scheduler); exit 1 unless it finished.")
@click.option("--dashboard", is_flag=True, help="Print the /obdask page URL and keep the "
              "embedded cluster up until Ctrl-C (after the end with --wait).")
@JSON
@_guard
def start(prompt: str, scheduler: str | None, store: str | None, workspace: str | None,
          session_id: str | None, wait: bool, as_json: bool, dashboard: bool = False) -> None:
    """Start a session answering PROMPT; prints its id at once (unless --wait)."""
    from obdask.cluster import connect
    from obdask.session.api import Session

    if scheduler is None and not (wait or dashboard):
        _fail("start without --scheduler runs an embedded cluster that ends with this "
              "command: pass --scheduler ADDR, --wait or --dashboard")
    with connect(scheduler) as client:
        s = Session.start(client, prompt, session_id=session_id, store=store,
                          workspace=workspace)
        if not wait:
            _echo({"id": s.id, "state": "running"}) if as_json else click.echo(s.id)
            if dashboard:
                hold_dashboard(client)
            return
        final = s.wait()
        shown = s.show()
        status = 0 if final["state"] == "done" else 1
        if dashboard:
            _show_final(shown, as_json)
            hold_dashboard(client, status)
    if not dashboard:
        _show_final(shown, as_json)
    if status:
        raise SystemExit(status)


def _show_final(shown: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _echo(shown)
    else:
        click.echo(f"{_line(shown)}  tokens {shown['tokens']['input']}+"
                   f"{shown['tokens']['output']}")


@session.command()
@click.argument("session_id")
@SCHEDULER
@STORE
@WORKSPACE
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@JSON
@_guard
def watch(session_id: str, scheduler: str | None, store: str | None, workspace: str | None,
          timeout: float | None, as_json: bool) -> None:
    """Print the session's events so far, then live ones, until it ends."""
    from obdask.session.api import Session

    with _client(scheduler) as client:
        s = Session(session_id, client, store, workspace)
        s.store.read(session_id, full=False)  # UnknownSession: one line
        s.watch(out=click.echo, timeout=timeout, as_json=as_json)


@session.command()
@click.argument("session_id")
@click.argument("text")
@SCHEDULER
@STORE
@WORKSPACE
@JSON
@_guard
def answer(session_id: str, text: str, scheduler: str | None, store: str | None,
           workspace: str | None, as_json: bool) -> None:
    """Answer the question SESSION_ID is waiting on."""
    from obdask.session.api import Session

    with _client(scheduler) as client:
        cid = Session(session_id, client, store, workspace).answer(text)
    _echo({"id": session_id, "consultation": cid}) if as_json else click.echo(
        f"answered {session_id} ({cid})")


@session.command()
@click.argument("session_id")
@SCHEDULER
@STORE
@WORKSPACE
@click.option("--takeover", is_flag=True, help="Supersede a driver that still holds it.")
@click.option("--wait", is_flag=True, help="Wait for the end.")
@JSON
@_guard
def resume(session_id: str, scheduler: str | None, store: str | None, workspace: str | None,
           takeover: bool, wait: bool, as_json: bool) -> None:
    """Continue SESSION_ID after its last recorded process."""
    from obdask.session.api import Session

    with _client(scheduler) as client:
        s = Session.resume(client, session_id, store=store, workspace=workspace,
                           takeover=takeover)
        out = s.wait() if wait else {"id": session_id, "state": "running"}
    _echo(out) if as_json else click.echo(_line({**out, "id": session_id}))


@session.command()
@click.argument("session_id")
@SCHEDULER
@STORE
@WORKSPACE
@JSON
@_guard
def show(session_id: str, scheduler: str | None, store: str | None, workspace: str | None,
         as_json: bool) -> None:
    """Flow code, state, current process and tokens of SESSION_ID."""
    from obdask.session.api import Session

    with _client(scheduler, required=False) as client:
        shown = Session(session_id, client, store, workspace).show()
    if as_json:
        _echo(shown)
        return
    click.echo(f"session   {shown['id']}\nstate     {shown['state']}\n"
               f"flow code {shown['flow_code'] or '-'}\n"
               f"position  {shown['position']} ({shown.get('process') or '-'})\n"
               f"processes {shown['processes']}\n"
               f"tokens    {shown['tokens']['input']} in, {shown['tokens']['output']} out, "
               f"{shown['tokens']['respent']} re-spent\nprompt    {shown['prompt']}")
    if shown.get("waiting"):
        w = shown["waiting"]
        click.echo(f"waiting   {w.get('position')}: {w.get('question')}")


@session.command(name="list")
@SCHEDULER
@STORE
@WORKSPACE
@JSON
@_guard
def list_(scheduler: str | None, store: str | None, workspace: str | None,
          as_json: bool) -> None:
    """Every recorded session: running, waiting, interrupted, done, failed, cancelled."""
    from obdask.session.api import Session

    with _client(scheduler, required=False) as client:
        rows = Session.list(client, store, workspace)
    if as_json:
        _echo({"sessions": rows})
        return
    if not rows:
        click.echo("no sessions")
    for row in rows:
        click.echo(_line(row))


@session.command()
@click.argument("session_id")
@SCHEDULER
@STORE
@WORKSPACE
@JSON
@_guard
def cancel(session_id: str, scheduler: str | None, store: str | None, workspace: str | None,
           as_json: bool) -> None:
    """Stop SESSION_ID after its current step."""
    from obdask.session.api import Session

    with _client(scheduler) as client:
        out = Session(session_id, client, store, workspace).cancel()
    _echo(out) if as_json else click.echo(f"cancelled {session_id}")
