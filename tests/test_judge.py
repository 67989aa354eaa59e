"""The federated judge panel on a real LocalCluster against Ollama test servers."""

from __future__ import annotations

import json
import os
import shutil
import time

import dask
import pytest

import obdask
from obdask.exceptions import QuorumNotMet
from obdask.judge import Judgement, judge
from obdask.testing import OllamaTestServer

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")

CODER, RESEARCHER, VISION, ORCH = ("qwen2.5-coder:14b", "llama3.2:3b", "llava:13b",
                                   "qwen2.5-coder:7b")
SCORES = {CODER: (80, 70), RESEARCHER: (76, 74), VISION: (70, 72), ORCH: (60, 60)}


def report(adherence: int, quality: int, who: str) -> str:
    return json.dumps({"prompt_adherence": adherence, "project_quality": quality,
                       "actions": [f"{who} read the records"], "errors": [],
                       "observations": [f"{who}: every job finished"],
                       "recommendations": [f"{who}: add a test"]})


def replies(scores: dict[str, tuple[int, int]], broken: tuple[str, ...] = ()):
    """Expert reports by model; the synthesis answer echoes the prompt's size."""

    def reply(body):
        model = body["model"]
        props = (body.get("format") or {}).get("properties") or {}
        if "implementation_summary" in props:
            prompt = body["messages"][-1]["content"]
            return json.dumps({
                "goal": "judge the run", "implementation_summary": f"{len(prompt)} chars seen",
                "discoveries": ["d"], "learnings": ["l"],
                "issues": [{"issue": "none", "resolution": "n/a"}],
                "justification": "scores agree", "recommendations": ["keep going"]})
        if model in broken:
            return "this is not JSON"
        return report(*scores[model], model)

    return reply


@pytest.fixture(scope="module")
def fleet():
    """One fast server (coder, researcher, orchestrator) and one vision server, kept for the
    module so the workers' endpoint pools stay warm."""
    fast = OllamaTestServer(models=[CODER, RESEARCHER, ORCH])
    slow = OllamaTestServer(models=[VISION])
    with fast, slow, dask.config.set({"obdask.llm.endpoints": [fast.url, slow.url],
                                      "obdask.llm.attempts": 1,
                                      "obdask.judge.deadline": "20s"}):
        yield fast, slow


@pytest.fixture
def servers(fleet, warm, cluster_client):
    """The fleet with the scripted reports; after the test, the cluster is idle again."""
    for s in fleet:
        s._reply_fn = replies(SCORES)
        s.first_token_latency = 0.0
    yield fleet
    deadline = time.monotonic() + 15
    while any(cluster_client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.05)  # a cancelled late expert still holds its thread until its call ends


@pytest.fixture(scope="module")
def quickstart_copy(tmp_path_factory):
    target = tmp_path_factory.mktemp("judge") / "quickstart"
    shutil.copytree(os.path.join(EXAMPLES, "quickstart"), target,
                    ignore=shutil.ignore_patterns(".obdask", "build"))
    return target


@pytest.fixture(scope="module")
def finished_run(quickstart_copy, cluster_client):
    """One finished run of the quickstart plan; the workers have the model client imported
    (a cold import takes seconds on a busy 2-core machine, longer than the deadlines here)."""
    result = obdask.run(str(quickstart_copy / "plan.md"), cluster_client)
    assert result.ok
    return result


@pytest.fixture(scope="module")
def warm(fleet, finished_run, cluster_client):
    """One judgement first: a cold worker imports the model client and builds its endpoint
    pool, which takes seconds on a busy 2-core machine (longer than the deadlines here)."""
    for s in fleet:
        s._reply_fn = replies(SCORES)
    judge(cluster_client, finished_run)


def test_all_experts_answer(servers, finished_run, cluster_client):
    j = judge(cluster_client, finished_run)
    assert isinstance(j, Judgement)
    assert [e.name for e in j.experts] == [f"coder:{CODER}", f"researcher:{RESEARCHER}",
                                           f"vision:{VISION}"]
    assert all(e.status == "ok" for e in j.experts)
    assert j.consensus["scores"] == {f"coder:{CODER}": 75.0, f"researcher:{RESEARCHER}": 75.0,
                                     f"vision:{VISION}": 71.0}
    assert j.consensus["mean"] == pytest.approx(221 / 3)
    assert j.consensus["spread"] == 4.0
    assert j.verdict == "ACCEPTABLE" and not j.extra_called
    assert j.tldr["goal"] == "judge the run" and j.tldr["verdict"] == "ACCEPTABLE"
    # stored next to the run's records, and one pandas row
    path = os.path.join(finished_run.location, "judgement.json")
    with open(path) as f:
        assert json.load(f)["verdict"] == "ACCEPTABLE"
    row = j.to_frame()
    assert len(row) == 1 and row.iloc[0]["verdict"] == "ACCEPTABLE"
    assert row.iloc[0]["experts_ok"] == 3
    # each expert ran as its own task; the synthesis after them
    assert j.duration_s >= j.critical_path_s > 0


def test_event_published(servers, finished_run, cluster_client):
    j = judge(cluster_client, finished_run)
    events = cluster_client.get_events("obdask.judge")
    msg = events[-1][1]
    assert msg["name"] == "gen_ai.evaluation.result"
    assert msg["attributes"]["gen_ai.evaluation.score.label"] == j.verdict
    assert msg["attributes"]["gen_ai.evaluation.score.value"] == pytest.approx(
        j.consensus["mean"])


def test_one_expert_failing(servers, finished_run, cluster_client):
    for s in servers:
        s._reply_fn = replies(SCORES, broken=(RESEARCHER,))
    j = judge(cluster_client, finished_run)
    status = {e.role: e.status for e in j.experts}
    assert status == {"coder": "ok", "researcher": "failed", "vision": "ok"}
    failed = j.experts[1]
    assert "format" in failed.reason
    assert set(j.consensus["scores"]) == {f"coder:{CODER}", f"vision:{VISION}"}
    assert j.verdict == "ACCEPTABLE"


def test_slow_expert_misses_deadline_quorum_met(servers, finished_run, cluster_client):
    servers[1].first_token_latency = 4.0
    j = judge(cluster_client, finished_run, quorum=2, deadline=2.0)
    vision = j.experts[2]
    assert vision.status == "failed" and "deadline" in vision.reason
    assert [e.status for e in j.experts[:2]] == ["ok", "ok"]
    assert j.duration_s < 4.0  # did not wait for the slow expert


def test_slow_expert_misses_deadline_quorum_not_met(servers, finished_run, cluster_client):
    servers[1].first_token_latency = 4.0
    with pytest.raises(QuorumNotMet, match=r"2 of 3 experts answered.*quorum 3") as info:
        judge(cluster_client, finished_run, quorum=3, deadline=2.0)
    assert "vision" in str(info.value) and "deadline" in str(info.value)


def test_extra_expert_only_on_disagreement(servers, finished_run, cluster_client):
    extra = {"obdask.judge.extra": [{"role": "coder", "model": ORCH}],
             "obdask.judge.margin": 30}
    fast = servers[0]
    before = _expert_models(fast).count(ORCH)
    with dask.config.set(extra):
        j = judge(cluster_client, finished_run)
    assert not j.extra_called and len(j.experts) == 3
    assert _expert_models(fast).count(ORCH) == before + 1  # the synthesis only
    disagree = {**SCORES, RESEARCHER: (10, 10)}
    for s in servers:
        s._reply_fn = replies(disagree)
    with dask.config.set(extra):
        j = judge(cluster_client, finished_run)
    assert j.extra_called and len(j.experts) == 4
    assert j.experts[3].name == f"coder:{ORCH}" and j.experts[3].extra
    assert _expert_models(fast).count(ORCH) == before + 3  # + the extra expert


def _expert_models(server) -> list[str]:
    return [c["model"] for c in server.stats.calls]


def test_synthesis_is_deterministic(servers, finished_run, cluster_client):
    for s in servers:
        s._reply_fn = None  # the server's own generator: seeded from model, seed and prompt
    one = judge(cluster_client, finished_run)
    two = judge(cluster_client, finished_run)
    assert one.tldr == two.tldr
    assert one.consensus == two.consensus
    assert [e.report for e in one.experts] == [e.report for e in two.experts]


def test_unknown_target_is_one_clear_error(servers, cluster_client, tmp_path):
    from obdask.exceptions import JudgeError

    with pytest.raises(JudgeError, match="no finished plan run or session"):
        judge(cluster_client, "no-such-session", sessions=str(tmp_path / "sessions"))


def test_judge_cli_on_a_plan_run(servers, finished_run, cluster_client, quickstart_copy):
    from click.testing import CliRunner

    from obdask.cli import main

    addr = cluster_client.scheduler.address
    out = CliRunner().invoke(main, ["judge", str(quickstart_copy / "plan.md"), "--scheduler", addr])
    assert out.exit_code == 0, out.output
    assert "verdict: ACCEPTABLE" in out.output
    assert f"coder:{CODER}" in out.output
    out = CliRunner().invoke(main, ["judge", str(quickstart_copy / "plan.md"), "--scheduler", addr,
                                    "--json"])
    assert json.loads(out.stdout)["verdict"] == "ACCEPTABLE"
    out = CliRunner().invoke(main, ["judge", "nope", "--scheduler", addr])
    assert out.exit_code == 2 and out.output.count("\n") == 1


def _serve_locally(url, dask_worker=None):
    from obdask.server.worker import advertise_endpoint, state_of

    state_of(dask_worker).local_endpoint = url  # what the preload's --ollama-endpoint sets
    advertise_endpoint(dask_worker, url)


def _local_endpoints(client) -> dict[str, str]:
    from obdask.placement import cluster_view

    return client.sync(cluster_view, client).local_endpoints


def _wait_local_endpoints(client, expected: dict[str, str]) -> None:
    deadline = time.monotonic() + 15
    while _local_endpoints(client) != expected:
        assert time.monotonic() < deadline, _local_endpoints(client)
        time.sleep(0.1)


def test_vision_expert_placed_on_the_worker_serving_its_model(servers, finished_run,
                                                                cluster_client):
    fast, slow = servers
    a, b = sorted(cluster_client.scheduler_info(n_workers=-1)["workers"])
    cluster_client.run(_serve_locally, fast.url, workers=[a])
    cluster_client.run(_serve_locally, slow.url, workers=[b])
    try:
        _wait_local_endpoints(cluster_client, {a: fast.url, b: slow.url})
        for _ in range(2):
            j = judge(cluster_client, finished_run)
            where = {e.role: e.worker for e in j.experts}
            assert where["vision"] == b  # the only worker whose endpoint serves llava
            assert where["coder"] == a and where["researcher"] == a
    finally:
        cluster_client.run(_serve_locally, None)
        _wait_local_endpoints(cluster_client, {})


@pytest.mark.parametrize("setting, message", [
    ({"obdask.judge.margin": "wide"}, r"obdask.judge.margin: 'wide' is not a number"),
    ({"obdask.judge.quorum": 4}, r"quorum 4 is more than the panel's 3 experts"),
    ({"obdask.judge.deadline": "soon"}, r"obdask.judge.deadline: 'soon' is not a duration"),
    ({"obdask.judge.panel": [{"model": "x"}]}, r"obdask.judge.panel: .* is not \{role, model\}"),
    ({"obdask.judge.panel": [{"role": "critic"}]}, r"role 'critic' has no model"),
])
def test_bad_settings_are_one_clear_error(setting, message):
    from obdask.exceptions import ObdaskError

    with dask.config.set(setting), pytest.raises(ObdaskError, match=message):
        judge(None, "whatever")


def test_judge_a_session_from_the_store(servers, cluster_client, tmp_path):
    from obdask.session.model import Move
    from obdask.session.store import SessionStore

    url = str(tmp_path / "sessions")
    store = SessionStore(url)
    store.create("s-1", "Add a greeting module", epoch=1)
    state = store.claim("s-1", 1).state
    for move in ("S1", "P2"):
        state = state.apply(Move.parse(move))
        store.append_process("s-1", 1, state, {"output": f"did {move}"}, started=1.0, ended=2.0)
    j = judge(cluster_client, "s-1", sessions=url)
    assert j.target_kind == "session" and j.target == "s-1"
    assert j.verdict == "ACCEPTABLE"
    stored = json.loads((tmp_path / "sessions" / "s-1" / "judgement.json").read_text())
    assert stored["target"] == "s-1" and stored["tldr"]["verdict"] == "ACCEPTABLE"
    assert store.read("s-1").flow_code == "S1P12"  # the record itself is untouched
