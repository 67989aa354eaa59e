"""``obdask demo``: the whole mission on one machine, against a simulated model fleet.

An embedded Dask cluster, the bundled Ollama-compatible test server on several
endpoints (scripted replies: a SIMULATION, no model runs, no GPU needed), the example
plan (``examples/quickstart``, run in a temporary copy), the judge panel on that run,
and, once the session driver is installed (``obdask.session.api``), a full session.
Everything it starts is stopped before it returns (``--keep`` waits for Ctrl-C first).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import dask

from obdask.exceptions import JudgeError

logger = logging.getLogger(__name__)

SIMULATION = ("SIMULATION: every model reply comes from obdask's bundled Ollama-compatible "
              "test server (scripted, no model runs); point obdask.llm.endpoints or OLLAMA_HOST "
              "at real Ollama servers for the real thing")
#: The simulated fleet: endpoint label -> models it serves (as ``obdask.placement.models``).
FLEET: dict[str, list[dict[str, Any]]] = {
    "gpu-a": [{"name": "qwen2.5-coder:14b"}, {"name": "qwen2.5-coder:7b"}],
    "cpu-b": [{"name": "llama3.2:3b"}],
    "gpu-c": [{"name": "llava:13b", "capabilities": ("completion", "vision")}],
}
#: The scores each simulated expert model gives (prompt adherence, project quality).
SCORES = {"qwen2.5-coder:14b": (88, 82), "llama3.2:3b": (84, 78), "llava:13b": (76, 80),
          "qwen2.5-coder:7b": (80, 80)}
PROMPT = "Add a greeting module that prints 'hello, world!' and verify it."
SESSION_TIMEOUT = 45.0
_FLOW = re.compile(r"^flow code: (\S+)$", re.M)


def _material(body: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(body["messages"][-1]["content"])
    except (KeyError, IndexError, TypeError, ValueError):
        return {}


def scripted_reply(body: dict[str, Any]) -> str | None:
    """The simulated models: an expert report, a TLDR, or the server's own generator."""
    props = (body.get("format") or {}).get("properties") or {}
    model = str(body.get("model"))
    seen = _material(body)
    if "prompt_adherence" in props:
        adherence, quality = SCORES.get(model, (70, 70))
        jobs = seen.get("jobs") or seen.get("processes") or []
        counts = (seen.get("summary") or {}).get("counts") or {}
        done = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or f"{len(jobs)} steps"
        return json.dumps({
            "prompt_adherence": adherence, "project_quality": quality,
            "actions": [f"reviewed {seen.get('kind', 'the work')} {seen.get('run') or ''}"
                        f" ({done})".replace("  ", " ")],
            "errors": [] if seen.get("summary", {}).get("ok", True) else ["some jobs failed"],
            "observations": [f"{model}: the greeting is built, run and checked by a test step"],
            "recommendations": [f"{model}: pin the diff's base commit as well"]})
    if "move" in props:  # the session's orchestrator: the state machine's default move
        from obdask.session.model import SessionState

        text = str(body["messages"][-1].get("content") or "")
        found = _FLOW.search(text)
        code = "" if found is None or found.group(1) == "-" else found.group(1)
        chosen = SessionState.from_flow_code(code).default_move()
        move = {} if chosen is None else chosen.to_dict()  # None: the session is finished
        return json.dumps({**move, "justification": f"next step after {code or 'the start'}"})
    if "implementation_summary" in props:
        reports = seen.get("reports") or []
        return json.dumps({
            "goal": seen.get("goal") or "the plan's goal",
            "implementation_summary": f"{len(reports)} experts reviewed {seen.get('target')}: "
                                      "the plan applied a pinned diff and verified its output",
            "discoveries": ["the diff applied cleanly on the first try"],
            "learnings": ["independent steps ran in parallel lanes"],
            "issues": [{"issue": "the docs step fetches a URL",
                        "resolution": "cached as an artifact after the first run"}],
            "justification": f"mean score {seen.get('consensus', {}).get('mean', 0):.1f} with a "
                             f"spread of {seen.get('consensus', {}).get('spread', 0):.1f}",
            "recommendations": ["run it against real Ollama servers next"]})
    return None


@contextlib.contextmanager
def simulated_fleet(latency: float = 0.02) -> Iterator[dict[str, Any]]:
    """Start one test server per :data:`FLEET` endpoint; yields ``{label: server}``
    (each with ``.url``)."""
    from obdask.testing import OllamaTestServer  # the demo is a simulation by design

    with contextlib.ExitStack() as stack:
        servers = {}
        for label, models in FLEET.items():
            server = OllamaTestServer(models=models, replies=scripted_reply,
                                      first_token_latency=latency, num_parallel=4)
            servers[label] = stack.enter_context(server)
        yield servers


def example_plan(folder: str) -> str:
    """A copy of ``examples/quickstart`` in ``folder``; returns its plan file."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = os.path.join(here, "examples", "quickstart")
    if not os.path.isdir(source):
        raise JudgeError(f"the example plan is not at {source}; `obdask demo` runs from a "
                         "source checkout (pip install -e .)")
    target = os.path.join(folder, "quickstart")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".obdask", "build"))
    return os.path.join(target, "plan.md")


def _session(client: Any, echo: Callable[[str], None]) -> str | None:
    """A full session through the session driver, when it is installed; its id, else None."""
    if importlib.util.find_spec("obdask.session.api") is None:
        echo("session: the session driver (obdask.session.api) is not installed in this "
             "version; skipped")
        return None
    api = importlib.import_module("obdask.session.api")
    if not hasattr(api, "Session"):
        echo("session: obdask.session.api has no Session; skipped")
        return None
    try:
        session = api.Session.start(client, PROMPT)
        echo(f"session {session.id}: {PROMPT!r} runs on the cluster (5 schedules x 3 "
             "processes; the human consultation at S3P3 times out and a model answers)")
        final = session.wait(timeout=SESSION_TIMEOUT)
    except Exception as exc:  # the demo goes on without the session
        echo(f"session: failed ({type(exc).__name__}: {exc}); skipped")
        return None
    echo(f"session {session.id}: {final.get('state')}, flow code {final.get('flow_code')}")
    return session.id if final.get("state") == "done" else None


def warm_model_client() -> None:
    """Import the model client (ollama, httpx, pydantic) in this process."""
    importlib.import_module("obdask.llm.client")
    importlib.import_module("ollama")


def run_demo(keep: bool = False, echo: Callable[[str], None] | None = None,
             workers: int = 2, threads: int = 2) -> int:
    """Run the demo; returns the exit status (0: the plan ran and the panel judged it).

    Parameters
    ----------
    keep : bool
        Keep the cluster and the simulated fleet up until Ctrl-C.
    echo : callable, optional
        Where lines go (default ``click.echo``).
    """
    import click

    from obdask.cluster import connect
    from obdask.dashboard import dashboard_url
    from obdask.judge import describe, judge
    from obdask.runner import run as run_plan

    echo = echo or click.echo
    t0 = time.perf_counter()
    echo(SIMULATION)
    settings = {"obdask.run.n-workers": workers, "obdask.run.threads-per-worker": threads,
                "obdask.judge.deadline": "30s", "obdask.sessions.consultation-timeout": "0.3s"}
    with tempfile.TemporaryDirectory(prefix="obdask-demo-") as tmp, \
            simulated_fleet() as fleet, \
            dask.config.set({**settings, "obdask.llm.endpoints": [s.url for s in fleet.values()],
                             "obdask.store.records": os.path.join(tmp, "records"),
                             "obdask.sessions.store": os.path.join(tmp, "sessions")}):
        for label, server in fleet.items():
            names = ", ".join(m["name"] for m in FLEET[label])
            echo(f"simulated endpoint {label}: {server.url} serves {names}")
        plan = example_plan(tmp)
        with connect(None, announce=echo) as client:
            # import the model client on the workers while the plan runs (seconds when cold)
            client.submit(warm_model_client, pure=False, key="obdask-demo-warm")
            result = run_plan(plan, client)
            counts = ", ".join(f"{n} {k}" for k, n in sorted(result.summary["counts"].items()))
            echo(f"plan {result.plan_id}: {'ok' if result.ok else 'FAILED'} ({counts}) in "
                 f"{result.duration_s:.1f}s; records {result.location}")
            echo("judge: coder, researcher and vision experts review the run as Dask tasks")
            judgement = judge(client, plan, run_id=result.run_id)
            for line in describe(judgement):
                echo(line)
            session_id = _session(client, echo)
            if session_id is not None:
                echo("judge: the same panel reviews the session")
                for line in describe(judge(client, session_id)):
                    echo(line)
            # obdask's page (tokens, jobs, sessions), the URL hold_dashboard prints too
            echo(f"dashboard: {dashboard_url(client) or 'none (the scheduler serves none)'}")
            echo(f"{SIMULATION.split(':')[0]} done in {time.perf_counter() - t0:.1f}s")
            if keep:
                echo("--keep: the cluster stays up; Ctrl-C to stop it")
                try:
                    while True:
                        time.sleep(1)
                except KeyboardInterrupt:
                    echo("stopping")
    return 0 if result.ok else 1
