"""obdask pages in the scheduler's own Bokeh dashboard.

:func:`register` adds the pages to ``distributed.dashboard.scheduler.applications``,
which the scheduler serves when its dashboard starts (inside the Scheduler's
constructor).  It runs when the scheduler preload
(:mod:`obdask.preload.scheduler`) is imported and before the embedded cluster
starts (:mod:`obdask.cluster`); a scheduler whose dashboard already runs does
not pick up pages registered later.

Pages:

* ``/obdask``: everything on one page (tokens per minute, job status per plan
  and lane, token budgets against their limits, workers with GPU/VRAM/CPU/RAM,
  sessions, waiting reasons, recent events);
* ``/individual-obdask-tokens``, ``-jobs``, ``-budgets``, ``-workers``, ``-events``,
  ``-waiting``, ``-sessions``: one component each; ``individual-`` pages are listed in
  the dashboard's "More" menu and in ``/individual-plots.json`` (read by
  dask-labextension).

The components are in :mod:`obdask.dashboard.components`; bokeh is needed
(``obdask[dashboard]``), and without it :func:`register` does nothing.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)

PAGE = "/obdask"
#: Individual pages and the component each shows.
INDIVIDUAL = {
    "/individual-obdask-tokens": "TokensPerMinute",
    "/individual-obdask-jobs": "JobStatus",
    "/individual-obdask-budgets": "Budgets",
    "/individual-obdask-workers": "WorkerResources",
    "/individual-obdask-events": "RecentEvents",
    "/individual-obdask-waiting": "Waiting",
    "/individual-obdask-sessions": "Sessions",
}
#: Milliseconds between updates of a page's components.
INTERVAL = 1000


def register() -> bool:
    """Add obdask's pages to the scheduler dashboard's applications (idempotent).

    Returns False (nothing registered) when bokeh or distributed's dashboard
    cannot be imported.
    """
    try:
        from distributed.dashboard.scheduler import applications
    except ImportError as exc:  # bokeh missing: the dashboard itself is off
        logger.debug("obdask dashboard pages not registered: %s", exc)
        return False
    applications.setdefault(PAGE, obdask_doc)
    for path, name in INDIVIDUAL.items():
        applications.setdefault(path, functools.partial(individual_doc, name))
    return True


def dashboard_url(client: Any) -> str | None:
    """URL of the ``/obdask`` page of ``client``'s scheduler; None without a dashboard."""
    try:
        link = client.dashboard_link
    except Exception:  # no dashboard service, or a closed client
        return None
    if not link:
        return None
    base = link[: -len("/status")] if link.endswith("/status") else link.rstrip("/")
    return base + PAGE


def obdask_doc(scheduler: Any, extra: dict[str, Any], doc: Any) -> None:
    """The ``/obdask`` page: every component, with the dashboard's navigation bar."""
    from bokeh.layouts import column, row
    from distributed.dashboard.components import add_periodic_callback
    from distributed.dashboard.components.scheduler import BOKEH_THEME, env

    from obdask.dashboard import components as c

    tokens = c.TokensPerMinute(scheduler, sizing_mode="stretch_width")
    jobs = c.JobStatus(scheduler)
    budgets = c.Budgets(scheduler)
    workers = c.WorkerResources(scheduler)
    events = c.RecentEvents(scheduler)
    waiting = c.Waiting(scheduler)
    sessions = c.Sessions(scheduler)
    for comp in (tokens, jobs, budgets, workers, sessions, waiting, events):
        comp.update()
        add_periodic_callback(doc, comp, INTERVAL)
    doc.title = "Dask: obdask"
    doc.add_root(column(row(tokens.root, jobs.root, sizing_mode="stretch_width"),
                        budgets.root, workers.root, sessions.root, waiting.root, events.root,
                        sizing_mode="stretch_width",
                        name="obdask"))
    doc.template = env.get_template("simple.html")
    doc.template_variables.update(extra)
    doc.theme = BOKEH_THEME


def individual_doc(name: str, scheduler: Any, extra: dict[str, Any], doc: Any) -> None:
    """One component on its own page (distributed's ``individual_doc`` pattern)."""
    from distributed.dashboard.components import add_periodic_callback
    from distributed.dashboard.components.scheduler import BOKEH_THEME

    from obdask.dashboard import components as c

    comp = getattr(c, name)(scheduler, sizing_mode="stretch_both")
    comp.update()
    add_periodic_callback(doc, comp, INTERVAL)
    doc.add_root(comp.root)
    doc.theme = BOKEH_THEME
    doc.title = f"Dask: obdask {name}"
