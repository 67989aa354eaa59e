"""What every ``obdask`` command shares: exit codes and the one-line error guard.

User mistakes (bad plans, missing files, unreachable schedulers) print one
``error:`` line on stderr and exit 2; a run with failed jobs exits 1; a run whose
scheduler was lost exits 3; Ctrl-C exits 130.  Command groups in their own
modules (:mod:`obdask.cli_session`, ...) import this, never :mod:`obdask.cli`.
"""

from __future__ import annotations

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
EXIT_SCHEDULER_LOST = 3


def _fail(message: str) -> None:
    from obdask.redact import redact

    click.echo(f"error: {redact(message)}", err=True)
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
            from obdask.stores import is_storage_error  # fsspec: only when something failed

            if not is_storage_error(exc):
                raise  # a bug: keep the traceback
            _fail(f"storage: {type(exc).__name__}: {exc} (check the URL, credentials and "
                  "obdask.storage-options)")

    return wrapper


def hold_dashboard(client: Any, status: int = 0) -> None:
    """``--dashboard``: print the ``/obdask`` page URL and keep an embedded cluster up.

    On stderr (stdout stays for ``--json``).  With an embedded cluster, waits
    until Ctrl-C, then exits with ``status`` (the command's own result: Ctrl-C
    is how one leaves the page here, not an interruption of the work); with a
    remote scheduler, which outlives the command, only prints the URL.
    """
    import time

    from obdask.dashboard import dashboard_url

    url = dashboard_url(client) or "none (the scheduler serves no dashboard)"
    if getattr(client, "cluster", None) is None:
        click.echo(f"dashboard: {url}", err=True)
        return
    click.echo(f"dashboard: {url} (Ctrl-C to stop the cluster)", err=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("dashboard closed", err=True)
    sys.exit(status)
