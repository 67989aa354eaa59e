"""The federated judge: expert models review a finished run; a synthesis writes the TLDR.

:func:`judge` reviews a finished plan run (its records) or a session (its record in
the session store), as spec section 4 describes:

1. **Experts** (``obdask.judge.panel``: ``[{role, model}]``; the model defaults to
   the role's in ``obdask.placement.models``; several models per role allowed) each
   run as their own Dask task, asking their role's GPU/VRAM where a worker serves
   models itself (:func:`obdask.placement.role_resources`, the rule ``place`` uses).
   Each answers through a JSON-schema reply (:data:`REPORT_SCHEMA`):
   ``prompt_adherence`` and ``project_quality`` (0-100), ``actions``, ``errors``,
   ``observations``, ``recommendations``.
2. **Quorum and deadline.** The panel waits until ``deadline`` for all experts; one
   that failed or is still running then is recorded as ``failed`` with its reason
   (late tasks are cancelled).  Fewer than ``quorum`` answers raise
   :class:`~obdask.exceptions.QuorumNotMet`.  When the answers' scores (mean of the
   two scores) differ by more than ``obdask.judge.margin``, the experts of
   ``obdask.judge.extra`` are asked too, and only then.
3. **Synthesis.** A task that depends on the answering experts' tasks (role
   ``obdask.judge.synthesis``) writes the TLDR: goal, implementation summary,
   consensus (mean, per-expert scores, spread; computed here, not by the model),
   discoveries, learnings, issues with resolutions, verdict (from the mean and
   ``obdask.judge.thresholds``), justification and recommendations.  Every model
   call uses temperature 0 and ``obdask.judge.seed``, prompts are canonical JSON and
   experts keep the panel's order, so the same inputs give the same TLDR.

The :class:`Judgement` is written as ``judgement.json`` next to the target's record
(the run's records folder, or the session's folder) and published as a Dask event
on topic ``obdask.judge`` named ``gen_ai.evaluation.result`` (OpenTelemetry GenAI).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import posixpath
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dask

from obdask import config
from obdask.exceptions import ConfigError, JudgeError, QuorumNotMet

if TYPE_CHECKING:
    import pandas as pd
    from distributed import Client, Future

logger = logging.getLogger(__name__)

TOPIC = "obdask.judge"
EVENT_NAME = "gen_ai.evaluation.result"
FILENAME = "judgement.json"
VERDICTS = ("NEEDS_IMPROVEMENT", "ACCEPTABLE", "EXCEPTIONAL")
MATERIAL_LIMIT = 24_000  # characters of the target's record shown to the experts

_STRINGS = {"type": "array", "items": {"type": "string"}}
_SCORE = {"type": "integer", "minimum": 0, "maximum": 100}
#: The JSON schema of one expert's report (spec section 4).
REPORT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"prompt_adherence": _SCORE, "project_quality": _SCORE,
                   "actions": _STRINGS, "errors": _STRINGS, "observations": _STRINGS,
                   "recommendations": _STRINGS},
    "required": ["prompt_adherence", "project_quality", "actions", "errors",
                 "observations", "recommendations"],
}
#: The JSON schema of the synthesis model's part of the TLDR.
SYNTHESIS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "goal": {"type": "string"}, "implementation_summary": {"type": "string"},
        "discoveries": _STRINGS, "learnings": _STRINGS,
        "issues": {"type": "array", "items": {
            "type": "object", "required": ["issue", "resolution"],
            "properties": {"issue": {"type": "string"}, "resolution": {"type": "string"}}}},
        "justification": {"type": "string"}, "recommendations": _STRINGS},
    "required": ["goal", "implementation_summary", "discoveries", "learnings", "issues",
                 "justification", "recommendations"],
}
EXPERT_PROMPT = (
    "You are the {role} expert on a review panel. Review the finished work below against "
    "its goal. Answer with one JSON object only: prompt_adherence (0-100: how well the work "
    "did what was asked), project_quality (0-100: how good the result is), actions (what "
    "was done), errors (mistakes made), observations, recommendations.")
SYNTHESIS_PROMPT = (
    "You write the TLDR of a review panel. From the goal, the experts' reports, their "
    "consensus and the verdict below, answer with one JSON object only: goal, "
    "implementation_summary, discoveries, learnings, issues (each with its resolution), "
    "justification (why the verdict fits the scores), recommendations.")


# ----------------------------------------------------------------------- data


@dataclass(frozen=True)
class Expert:
    """One seat on the panel: a role and the model that answers for it."""

    role: str
    model: str
    extra: bool = False

    @property
    def name(self) -> str:
        """``role:model``, the expert's name in scores and reports."""
        return f"{self.role}:{self.model}"


@dataclass
class ExpertResult:
    """What one expert answered, or why it did not.

    Attributes
    ----------
    status : str
        ``"ok"`` or ``"failed"`` (``reason`` says why: an error, or the deadline).
    report : dict
        The :data:`REPORT_SCHEMA` fields (empty when failed).
    score : float or None
        Mean of ``prompt_adherence`` and ``project_quality``.
    extra : bool
        Asked only because the first experts disagreed.
    """

    role: str
    model: str
    status: str
    reason: str | None = None
    report: dict[str, Any] = field(default_factory=dict)
    score: float | None = None
    extra: bool = False
    worker: str | None = None
    endpoint: str | None = None
    duration_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def name(self) -> str:
        return f"{self.role}:{self.model}"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Judgement:
    """The panel's judgement of one target.

    Attributes
    ----------
    target_kind, target : str
        ``"run"`` with ``plan_id/run_id``, or ``"session"`` with the session id.
    verdict : str
        ``ACCEPTABLE``, ``NEEDS_IMPROVEMENT`` or ``EXCEPTIONAL``.
    tldr : dict
        Goal, implementation summary, consensus, discoveries, learnings, issues,
        verdict, justification, recommendations.
    consensus : dict
        ``mean``, ``scores`` (``{expert name: score}``, panel order) and ``spread``.
    experts : list of ExpertResult
        Every expert asked, in panel order (extra experts last).
    duration_s, critical_path_s : float
        Wall time of the judge and its critical path (slowest expert of each round plus
        the synthesis, as the tasks measured themselves).
    phases : dict
        Wall seconds of ``prepare`` (target, settings, cluster view), ``experts``,
        ``synthesis`` and ``store`` (judgement.json and the event).
    location : str
        Where ``judgement.json`` was written.
    """

    target_kind: str
    target: str
    verdict: str
    tldr: dict[str, Any]
    consensus: dict[str, Any]
    experts: list[ExpertResult]
    quorum: int
    deadline_s: float
    extra_called: bool = False
    synthesis: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    critical_path_s: float = 0.0
    location: str | None = None
    created: float = field(default_factory=time.time)
    phases: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``judgement.json``, ``obdask judge --json``)."""
        out = dataclasses.asdict(self)
        for e, d in zip(self.experts, out["experts"], strict=True):
            d["name"] = e.name
        return out

    def to_frame(self) -> pd.DataFrame:
        """One pandas row: target, verdict, mean, spread, counts, times, per-expert scores."""
        import pandas as pd

        row: dict[str, Any] = {
            "target": self.target, "kind": self.target_kind, "verdict": self.verdict,
            "mean": self.consensus.get("mean"), "spread": self.consensus.get("spread"),
            "experts_ok": sum(e.ok for e in self.experts),
            "experts_failed": sum(not e.ok for e in self.experts),
            "extra_called": self.extra_called, "duration_s": self.duration_s,
            "critical_path_s": self.critical_path_s, "location": self.location}
        for name, score in self.consensus.get("scores", {}).items():
            row[f"score[{name}]"] = score
        return pd.DataFrame([row]).set_index("target", drop=False)


@dataclass(frozen=True)
class Target:
    """What is judged: its goal, the material shown to experts, where the result goes."""

    kind: str
    id: str
    goal: str
    material: str
    folder: str
    storage_options: dict[str, Any] = field(default_factory=dict)


# -------------------------------------------------------------------- targets


def resolve_target(target: Any, *, run_id: str | None = None, records: str | None = None,
                   sessions: str | None = None) -> Target:
    """The :class:`Target` named by ``target``.

    Parameters
    ----------
    target
        A :class:`~obdask.runner.RunResult`; a plan file (its run ``run_id``, default the
        latest finished one, from ``records`` / ``obdask.store.records``); or a session id
        in the session store (``sessions`` / ``obdask.sessions.store``).

    Raises
    ------
    JudgeError
        Nothing finished is recorded under that name; the message says what to pass.
    """
    if hasattr(target, "plan_id") and hasattr(target, "run_id") and hasattr(target, "location"):
        suffix = f"/{target.plan_id}/{target.run_id}"
        url = str(target.location)[: -len(suffix)]
        return _run_target(url, target.plan_id, target.run_id, None)
    text = os.fspath(target)
    if text.endswith(".md") or os.path.isfile(text):
        from obdask.plan import Plan

        if not os.path.isfile(text):
            raise JudgeError(f"plan file {text} not found; give a plan file or a session id")
        plan = Plan.from_file(text)
        url = config.get_str("store.records", records) or os.path.join(
            plan.folder, ".obdask", "records")
        return _run_target(url, plan.plan_id, run_id, plan)
    from obdask.session.store import open_store

    store = open_store(sessions)
    try:
        exists = store.exists(text)
    except ValueError:
        exists = False
    if not exists:
        raise JudgeError(
            f"no finished plan run or session named {text!r}: give a plan file (judges its "
            f"latest run, or --run RUN_ID) or a session id recorded in {store.url}")
    return _session_target(store, text)


def _run_target(url: str, plan_id: str, run_id: str | None, plan: Any) -> Target:
    from obdask.records import read_run, run_summaries

    options = config.storage_options(url)
    summaries = {s["run_id"]: s for s in run_summaries(url, plan_id, options)
                 if s.get("ok") is not None}
    if run_id is None:
        if not summaries:
            raise JudgeError(f"plan {plan_id!r} has no finished run under {url}; run it "
                             "first (obdask run PLAN) or point obdask.store.records at its runs")
        run_id = sorted(summaries)[-1]
    if run_id not in summaries:
        raise JudgeError(f"run {run_id!r} of plan {plan_id!r} is not a finished run under "
                         f"{url}; list them with `obdask runs PLAN`")
    summary = summaries[run_id]
    jobs = read_run(url, plan_id, run_id, options)
    keep = ("step", "status", "kind", "exit_code", "error", "attempts", "reply_kind", "model")
    text = _plan_text(plan)
    goal = (getattr(plan, "title", None) or f"plan {plan_id}") if plan is not None \
        else f"plan {plan_id}"
    material = {"kind": "plan run", "plan": plan_id, "run": run_id, "goal": goal,
                "plan_text": text,
                "summary": {k: summary.get(k) for k in ("ok", "counts")},
                "jobs": sorted(({k: j.get(k) for k in keep if j.get(k) is not None}
                                for j in jobs), key=lambda j: str(j.get("step")))}
    return Target("run", f"{plan_id}/{run_id}", goal, _canonical(material),
                  f"{url.rstrip('/')}/{plan_id}/{run_id}", options)


def _plan_text(plan: Any) -> str | None:
    path = getattr(plan, "path", None)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(8000)
    except OSError:
        return None


def _session_target(store: Any, session_id: str) -> Target:
    record = store.read(session_id)
    processes = [{"position": s.position, "name": s.name, "payload": s.payload}
                 for s in record.snapshots]
    material = {"kind": "session", "session": session_id, "goal": record.prompt,
                "flow_code": record.flow_code, "status": record.status,
                "finished": record.state.finished,
                "justification": record.state.justification, "processes": processes,
                "notes": record.notes, "actions": record.actions,
                "tokens": record.tokens_total()}
    folder = store._where(store._dir(session_id))
    return Target("session", session_id, record.prompt or f"session {session_id}",
                  _canonical(material), folder, dict(store.storage_options))


def _canonical(data: Any, limit: int = MATERIAL_LIMIT) -> str:
    text = json.dumps(data, sort_keys=True, default=str, indent=1)
    return text if len(text) <= limit else text[:limit] + "\n... (cut)"


# ---------------------------------------------------------------------- panel


def _entries(value: Any, key: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, (str, Mapping)):
        value = [value]
    out = []
    for item in value:
        if isinstance(item, str):
            item = {"role": item}
        if not isinstance(item, Mapping) or not item.get("role"):
            raise JudgeError(f"obdask.judge.{key}: {item!r} is not {{role, model}}; write e.g. "
                             "{role: coder, model: 'qwen2.5-coder:7b'}")
        out.append(dict(item))
    return out


def experts_from(value: Any, key: str = "panel", extra: bool = False) -> list[Expert]:
    """Panel entries (``[{role, model}]``, a role name, ...) as :class:`Expert` s."""
    from obdask.placement import model_roles

    roles = model_roles()
    out = []
    for item in _entries(value, key):
        role = str(item["role"])
        model = item.get("model") or (roles.get(role) or {}).get("model")
        if not model:
            raise JudgeError(f"obdask.judge.{key}: role {role!r} has no model; give one "
                             f"({{role: {role}, model: NAME}}) or set "
                             f"obdask.placement.models.{role}.model")
        out.append(Expert(role, str(model), extra))
    return out


def _resources(role: str, served_locally: bool) -> dict[str, float] | None:
    """The role's GPU/VRAM where workers serve models themselves (as ``place`` decides)."""
    if not served_locally:
        return None
    from obdask.placement import model_roles, role_resources

    if role not in model_roles():
        return None  # a role only the panel knows: no hardware needs declared
    return role_resources(role) or None


# ----------------------------------------------------------------- worker side


def _call(model: str, messages: list[dict[str, str]], fmt: dict[str, Any], seed: int,
          llm: Mapping[str, Any], endpoints: Sequence[str], timeout: float, job: str
          ) -> dict[str, Any]:
    """One model call inside a task, with the client's ``obdask.llm`` settings."""
    from obdask.llm.client import call_model

    t0 = time.perf_counter()
    with dask.config.set({"obdask.llm": dict(llm)}):
        reply = call_model(model, messages, fmt=fmt, options={"temperature": 0, "seed": seed},
                           job=job, endpoints=list(endpoints) or None, timeout=timeout)
    try:
        from distributed import get_worker

        worker = get_worker().address
    except ValueError:
        worker = None
    return {"data": reply.data, "endpoint": reply.endpoint, "worker": worker,
            "duration_s": time.perf_counter() - t0,
            "prompt_tokens": reply.prompt_eval_count, "output_tokens": reply.eval_count}


def expert_task(expert: Expert, material: str, seed: int, llm: Mapping[str, Any],
                endpoints: Sequence[str], timeout: float) -> dict[str, Any]:
    """One expert's review (runs on a worker)."""
    messages = [{"role": "system", "content": EXPERT_PROMPT.format(role=expert.role)},
                {"role": "user", "content": material}]
    return _call(expert.model, messages, REPORT_SCHEMA, seed, llm, endpoints, timeout,
                 f"judge:{expert.name}")


def synthesis_task(synth: Expert, brief: dict[str, Any], reports: list[dict[str, Any]],
                   seed: int, llm: Mapping[str, Any], endpoints: Sequence[str],
                   timeout: float) -> dict[str, Any]:
    """The TLDR (runs on a worker once the answering experts' tasks finished).

    ``reports`` are those tasks' results (Dask passes them in); a failed synthesis
    call falls back to a TLDR merged from the reports, with ``error`` set.
    """
    t0 = time.perf_counter()
    names = brief["answered"]
    shown = [{"expert": n, "score": brief["consensus"]["scores"][n], "report": r["data"]}
             for n, r in zip(names, reports, strict=True)]
    prompt = _canonical({**brief, "reports": shown}, limit=4 * MATERIAL_LIMIT)
    messages = [{"role": "system", "content": SYNTHESIS_PROMPT},
                {"role": "user", "content": prompt}]
    try:
        out = _call(synth.model, messages, SYNTHESIS_SCHEMA, seed, llm, endpoints, timeout,
                    f"judge:synthesis:{synth.name}")
        out["error"] = None
    except Exception as exc:  # the TLDR still comes, merged from the reports
        logger.warning("synthesis by %s failed: %s", synth.name, exc)
        out = {"data": _merged_tldr(brief, shown), "endpoint": None, "worker": None,
               "prompt_tokens": 0, "output_tokens": 0, "error": f"{type(exc).__name__}: {exc}"}
    out["duration_s"] = time.perf_counter() - t0
    return out


def _merged_tldr(brief: dict[str, Any], shown: list[dict[str, Any]]) -> dict[str, Any]:
    def merged(key: str) -> list[str]:
        return list(dict.fromkeys(x for s in shown for x in s["report"].get(key) or []))

    return {"goal": brief["goal"],
            "implementation_summary": "; ".join(merged("actions")) or "(none reported)",
            "discoveries": merged("observations"), "learnings": [],
            "issues": [{"issue": e, "resolution": "open"} for e in merged("errors")],
            "justification": f"mean score {brief['consensus']['mean']:.1f} of "
                             f"{len(shown)} experts", "recommendations": merged("recommendations")}


# ---------------------------------------------------------------- client side


def _number(key: str, value: Any, low: float = 0, high: float = 100) -> float:
    raw = config.get(key, value)
    try:
        number = float(raw)
    except (TypeError, ValueError):
        number = float("nan")
    if not low <= number <= high:
        raise ConfigError(f"obdask.{key}: {raw!r} is not a number from {low:g} to {high:g}")
    return number


def _settings(panel: Any, quorum: int | None, deadline: float | str | None,
              extra: Any, margin: float | None) -> dict[str, Any]:
    """Every judge setting, checked; a bad one is a ConfigError/JudgeError naming its key."""
    experts = experts_from(config.get("judge.panel", panel))
    if not experts:
        raise JudgeError("obdask.judge.panel is empty; name at least one {role, model}")
    k = config.get("judge.quorum", quorum)
    k = len(experts) // 2 + 1 if k is None else config.get_int("judge.quorum", k, minimum=1)
    if k > len(experts):
        raise JudgeError(f"quorum {k} is more than the panel's {len(experts)} experts; "
                         "lower obdask.judge.quorum (or --quorum)")
    thresholds = config.get("judge.thresholds") or {}
    if not isinstance(thresholds, Mapping):
        raise ConfigError(f"obdask.judge.thresholds: {thresholds!r} is not a mapping "
                          "{exceptional: 85, acceptable: 60}")
    synth = experts_from(config.get("judge.synthesis"), "synthesis")
    if len(synth) != 1:
        raise JudgeError("obdask.judge.synthesis names one {role, model}")
    deadline_s = config.get_seconds("judge.deadline", deadline)
    if deadline_s <= 0:
        raise ConfigError(f"obdask.judge.deadline: {deadline_s:g}s; give the experts more "
                          "than 0 seconds")
    return {"experts": experts, "quorum": k, "deadline": deadline_s,
            "extra": experts_from(config.get("judge.extra", extra), "extra", extra=True),
            "margin": _number("judge.margin", margin),
            "seed": config.get_int("judge.seed", minimum=None), "synthesis": synth[0],
            "exceptional": _number("judge.thresholds.exceptional",
                                   thresholds.get("exceptional", 85)),
            "acceptable": _number("judge.thresholds.acceptable",
                                  thresholds.get("acceptable", 60))}


def check_settings() -> dict[str, Any]:
    """Check the ``obdask.judge.*`` settings that need no other section (``obdask.settings``).

    Whether each role has a model is checked when the judge runs (``placement.models``
    has its own check).

    Raises
    ------
    ConfigError
        Naming the bad key.
    """
    for key in ("panel", "extra", "synthesis"):
        try:
            _entries(config.get(f"judge.{key}"), key)
        except JudgeError as exc:
            raise ConfigError(str(exc)) from None
    thresholds = config.get("judge.thresholds") or {}
    if not isinstance(thresholds, Mapping):
        raise ConfigError(f"obdask.judge.thresholds: {thresholds!r} is not a mapping "
                          "{exceptional: 85, acceptable: 60}")
    if config.get("judge.quorum") is not None:
        config.get_int("judge.quorum", minimum=1)
    return {"deadline": config.get_seconds("judge.deadline"),
            "margin": _number("judge.margin", None),
            "seed": config.get_int("judge.seed", minimum=None),
            **{f"thresholds.{k}": _number(f"judge.thresholds.{k}", thresholds.get(k, d))
               for k, d in (("exceptional", 85), ("acceptable", 60))}}


def verdict_for(mean: float, acceptable: float = 60, exceptional: float = 85) -> str:
    """``EXCEPTIONAL`` from ``exceptional`` up, ``ACCEPTABLE`` from ``acceptable``, else
    ``NEEDS_IMPROVEMENT``."""
    if mean >= exceptional:
        return "EXCEPTIONAL"
    if mean >= acceptable:
        return "ACCEPTABLE"
    return "NEEDS_IMPROVEMENT"


def consensus(results: Sequence[ExpertResult]) -> dict[str, Any]:
    """``mean``, ``scores`` (panel order) and ``spread`` (max - min) of the answers."""
    scores = {r.name: r.score for r in results if r.ok and r.score is not None}
    values = list(scores.values())
    return {"mean": sum(values) / len(values) if values else None, "scores": scores,
            "spread": (max(values) - min(values)) if values else None}


def serving_workers(local_endpoints: Mapping[str, str], model: str) -> list[str]:
    """Workers whose own endpoint (``--ollama-endpoint``) lists ``model`` in ``/api/tags``."""
    if not local_endpoints:
        return []
    from obdask.llm.pool import canonical_model, get_pool, normalize_url

    urls = {addr: normalize_url(url) for addr, url in local_endpoints.items()}
    pool = get_pool(sorted(set(urls.values())))
    name = canonical_model(model)
    return sorted(addr for addr, url in urls.items() if name in (pool.tags(url) or ()))


def _submit(client: Client, experts: Sequence[Expert], target: Target, s: dict[str, Any],
            llm: Mapping[str, Any], endpoints: Sequence[str], view: Any) -> list[Future]:
    """One task per expert: its role's GPU/VRAM where workers serve models themselves, and
    on the workers whose own endpoint serves its model when there are such workers."""
    tag = secrets.token_hex(4)
    futures = []
    for i, e in enumerate(experts):
        homes = serving_workers(view.local_endpoints, e.model)
        futures.append(client.submit(
            expert_task, e, target.material, s["seed"], llm, endpoints, s["deadline"],
            key=f"obdask-judge-{tag}-{i}-{e.role}",
            resources=_resources(e.role, view.models_served_locally),
            workers=homes or None, allow_other_workers=False, pure=False, retries=0))
    return futures


def _collect(client: Client, experts: Sequence[Expert], futures: Sequence[Future],
             deadline: float) -> list[ExpertResult]:
    """Wait until all answered or ``deadline`` (seconds from now); late ones are cancelled."""
    from distributed import wait

    try:
        wait(list(futures), timeout=deadline)
    except (TimeoutError, asyncio.TimeoutError):
        pass
    results = []
    late = []
    finished = [f for f in futures if f.status == "finished"]
    gathered = dict(zip([f.key for f in finished], client.gather(finished), strict=True))
    for expert, future in zip(experts, futures, strict=True):
        base: dict[str, Any] = {"role": expert.role, "model": expert.model,
                                "extra": expert.extra}
        if future.key in gathered:
            out = gathered[future.key]
            report = out["data"]
            score = (report["prompt_adherence"] + report["project_quality"]) / 2
            results.append(ExpertResult(status="ok", report=report, score=score,
                                        worker=out["worker"], endpoint=out["endpoint"],
                                        duration_s=out["duration_s"],
                                        prompt_tokens=out["prompt_tokens"],
                                        output_tokens=out["output_tokens"], **base))
        elif future.status == "error":
            exc = future.exception()
            results.append(ExpertResult(status="failed", reason=f"{type(exc).__name__}: {exc}",
                                        **base))
        else:
            late.append(future)
            results.append(ExpertResult(
                status="failed", reason=f"missed the deadline of {deadline:g}s (cancelled; "
                "raise obdask.judge.deadline or lower the quorum)", **base))
    if late:
        client.cancel(late)
    for r in results:
        if not r.ok:
            logger.warning("judge: expert %s failed: %s", r.name, r.reason)
    return results


def judge(client: Client, target: Any, panel: Any = None, quorum: int | None = None,
          deadline: float | str | None = None, *, run_id: str | None = None,
          records: str | None = None, sessions: str | None = None, extra: Any = None,
          margin: float | None = None) -> Judgement:
    """Have the expert panel judge ``target`` and write the TLDR.

    Parameters
    ----------
    client : distributed.Client
        The cluster the experts and the synthesis run on.
    target
        A :class:`~obdask.runner.RunResult`, a plan file (its latest finished run, or
        ``run_id``) or a session id (see :func:`resolve_target`).
    panel : list, optional
        ``[{role, model}]``; default ``obdask.judge.panel``.
    quorum : int, optional
        Answers needed; default ``obdask.judge.quorum`` (null: a majority).
    deadline : float or str, optional
        How long the experts get; default ``obdask.judge.deadline``.
    run_id, records, sessions : str, optional
        Which run of a plan file, and the records / session store URLs.
    extra, margin : optional
        Experts asked only when the answers' scores spread more than ``margin``;
        default ``obdask.judge.extra`` / ``obdask.judge.margin``.

    Returns
    -------
    Judgement
        Also written as ``judgement.json`` beside the target's record and published
        on topic ``obdask.judge``.

    Raises
    ------
    JudgeError
        Unknown target or bad settings.
    QuorumNotMet
        Fewer than ``quorum`` experts answered by the deadline.
    """
    from obdask.context import RunContext
    from obdask.placement import cluster_view

    t0 = time.perf_counter()
    s = _settings(panel, quorum, deadline, extra, margin)
    tgt = resolve_target(target, run_id=run_id, records=records, sessions=sessions)
    endpoints, _ = RunContext.llm_from_config()
    llm = dict(dask.config.get("obdask.llm"))
    view = client.sync(cluster_view, client)
    phases = {"prepare": time.perf_counter() - t0}
    futures = _submit(client, s["experts"], tgt, s, llm, endpoints, view)
    results = _collect(client, s["experts"], futures, s["deadline"])
    rounds = [max((r.duration_s or 0) for r in results)]
    spread = consensus(results)["spread"]
    extra_called = bool(s["extra"]) and sum(r.ok for r in results) >= 2 and \
        spread > s["margin"]
    if extra_called:
        logger.info("judge: scores spread %.1f > margin %.1f: asking %s", spread, s["margin"],
                    ", ".join(e.name for e in s["extra"]))
        more_futures = _submit(client, s["extra"], tgt, s, llm, endpoints, view)
        more = _collect(client, s["extra"], more_futures, s["deadline"])
        rounds.append(max((r.duration_s or 0) for r in more))
        results += more
        futures += more_futures
    answered = [r for r in results if r.ok]
    phases["experts"] = time.perf_counter() - t0 - sum(phases.values())
    if len(answered) < s["quorum"]:
        failed = "; ".join(f"{r.name}: {r.reason}" for r in results if not r.ok)
        raise QuorumNotMet(
            f"{len(answered)} of {len(results)} experts answered, quorum {s['quorum']} not met "
            f"({failed}); raise the deadline (--deadline, obdask.judge.deadline) or lower "
            "the quorum", results)
    cons = consensus(results)
    verdict = verdict_for(cons["mean"], s["acceptable"], s["exceptional"])
    brief = {"goal": tgt.goal, "target": tgt.id, "kind": tgt.kind, "consensus": cons,
             "verdict": verdict, "answered": [r.name for r in answered],
             "failed": [{"expert": r.name, "reason": r.reason} for r in results if not r.ok]}
    synth = s["synthesis"]
    # the synthesis task depends on the answering experts' tasks: Dask hands it their results
    reports = [f for f, r in zip(futures, results, strict=True) if r.ok]
    future = client.submit(synthesis_task, synth, brief, reports, s["seed"], llm, endpoints,
                           s["deadline"], key=f"obdask-judge-synthesis-{secrets.token_hex(4)}",
                           resources=_resources(synth.role, view.models_served_locally),
                           workers=serving_workers(view.local_endpoints, synth.model) or None,
                           allow_other_workers=False, pure=False)
    out = future.result(timeout=s["deadline"] + 30)
    phases["synthesis"] = time.perf_counter() - t0 - sum(phases.values())
    tldr = {"goal": out["data"].get("goal") or tgt.goal,
            "implementation_summary": out["data"].get("implementation_summary"),
            "consensus": cons, "discoveries": out["data"].get("discoveries", []),
            "learnings": out["data"].get("learnings", []),
            "issues": out["data"].get("issues", []), "verdict": verdict,
            "justification": out["data"].get("justification"),
            "recommendations": out["data"].get("recommendations", [])}
    judgement = Judgement(
        target_kind=tgt.kind, target=tgt.id, verdict=verdict, tldr=tldr, consensus=cons,
        experts=results, quorum=s["quorum"], deadline_s=s["deadline"],
        extra_called=extra_called,
        synthesis={"expert": synth.name, "endpoint": out["endpoint"], "worker": out["worker"],
                   "duration_s": out["duration_s"], "error": out["error"]},
        critical_path_s=sum(rounds) + out["duration_s"], phases=phases)
    judgement.location = _store(tgt, judgement)
    _publish(client, judgement)
    phases["store"] = time.perf_counter() - t0 - sum(phases.values())
    judgement.duration_s = time.perf_counter() - t0
    return judgement


def describe(j: Judgement) -> list[str]:
    """The verdict, one line per expert and the TLDR, for people (``obdask judge``)."""
    cons = j.consensus
    lines = [f"verdict: {j.verdict} (mean {cons['mean']:.1f}, spread {cons['spread']:.1f}, "
             f"{sum(e.ok for e in j.experts)}/{len(j.experts)} experts"
             f"{', extra expert called' if j.extra_called else ''}) in {j.duration_s:.2f}s "
             f"(critical path {j.critical_path_s:.2f}s)"]
    for e in j.experts:
        if e.ok:
            lines.append(f"  {e.name:<32} {e.score:5.1f}  adherence "
                         f"{e.report['prompt_adherence']:>3} quality "
                         f"{e.report['project_quality']:>3}  {e.duration_s:.2f}s {e.worker or ''}")
        else:
            lines.append(f"  {e.name:<32} FAILED  {e.reason}")
    t = j.tldr
    lines += ["TLDR", f"  goal: {t['goal']}", f"  implementation: {t['implementation_summary']}"]
    for key in ("discoveries", "learnings", "recommendations"):
        if t.get(key):
            lines.append(f"  {key}: " + "; ".join(map(str, t[key])))
    for issue in t.get("issues") or []:
        lines.append(f"  issue: {issue.get('issue')} -> {issue.get('resolution')}")
    lines.append(f"  verdict: {t['verdict']}: {t['justification']}")
    if j.synthesis.get("error"):
        lines.append(f"  (synthesis model failed, TLDR merged from the reports: "
                     f"{j.synthesis['error']})")
    lines.append(f"stored: {j.location}")
    return lines


def _store(target: Target, judgement: Judgement) -> str:
    """Write ``judgement.json`` into the target's folder; returns its URL."""
    import fsspec

    from obdask.records import write_atomic

    url = f"{target.folder.rstrip('/')}/{FILENAME}"
    fs, path = fsspec.core.url_to_fs(url, **target.storage_options)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    write_atomic(fs, path, json.dumps(judgement.to_dict(), indent=1, default=str).encode())
    return url


def event(judgement: Judgement) -> dict[str, Any]:
    """The ``gen_ai.evaluation.result`` event of a judgement (OpenTelemetry GenAI names)."""
    return {"name": EVENT_NAME, "attributes": {
        "gen_ai.evaluation.name": "obdask.judge",
        "gen_ai.evaluation.score.value": judgement.consensus["mean"],
        "gen_ai.evaluation.score.label": judgement.verdict,
        "gen_ai.evaluation.explanation": judgement.tldr.get("justification"),
        "obdask.judge.target": judgement.target,
        "obdask.judge.target_kind": judgement.target_kind,
        "obdask.judge.scores": judgement.consensus["scores"],
        "obdask.judge.spread": judgement.consensus["spread"],
        "obdask.judge.failed": [e.name for e in judgement.experts if not e.ok],
        "obdask.judge.location": judgement.location}}


def _publish(client: Client, judgement: Judgement) -> None:
    try:
        client.log_event(TOPIC, event(judgement))
    except Exception:  # the judgement is stored; the bus is best effort
        logger.warning("could not publish the judgement of %s on %s", judgement.target, TOPIC,
                       exc_info=True)
