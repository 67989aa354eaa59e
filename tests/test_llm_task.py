"""Model tasks end to end: obdask.run on a LocalCluster against Ollama test servers."""

from __future__ import annotations

import dask
import pytest

import obdask
from obdask.exceptions import PlacementError
from obdask.plan import Plan
from obdask.testing import OllamaTestServer

DIFF = ("Here is the change:\n```diff\n--- a/app.py\n+++ b/app.py\n@@ -1,2 +1,2 @@\n"
        " def answer():\n-    return 41\n+    return 42\n```\n")


def write_plan(folder, text):
    (folder / "plan.md").write_text(text)
    return Plan.from_file(folder / "plan.md")


@pytest.fixture
def servers():
    models = ["qwen2.5-coder:14b", "llama3.2:3b"]
    with OllamaTestServer(models=models) as one, OllamaTestServer(models=models) as two:
        with dask.config.set({"obdask.llm.endpoints": [one.url, two.url]}):
            yield one, two


def test_model_diff_applied_by_dependent_step(tmp_path, git_repo, servers, cluster_client):
    prompts = []

    def reply(body):
        prompts.append(body["messages"])
        return DIFF

    for server in servers:
        server._reply_fn = reply
    (tmp_path / "spec.md").write_text("Make answer() return 42.")
    plan = write_plan(tmp_path, (
        "- [ ] id=context lane=1 payload=@cmd:cat app.py\n"
        "- [ ] id=gen lane=2 deps=context model=coder payload=@file:spec.md\n"
        "- [ ] id=apply lane=2 deps=gen payload=@file:job:gen#apply\n"
        "- [ ] id=check lane=3 deps=apply payload=@cmd:grep -q 'return 42' app.py\n"
    ))
    result = obdask.run(plan, cluster_client, workspace=str(git_repo))
    assert result.ok, result.frame[["status", "error"]]
    gen = result.frame.loc["gen"]
    assert gen["reply_kind"] == "diff" and gen["model"] == "qwen2.5-coder:14b"
    assert "+    return 42" in result.output("gen", "reply")  # the stored reply, as text
    assert str(result.frame["tokens"].dtype) == "Int64"
    assert (git_repo / "app.py").read_text() == "def answer():\n    return 42\n"
    # The role's system prompt, the spec and the dependency's output reached the model.
    system, user = prompts[0]
    assert system["role"] == "system" and "unified diff" in system["content"]
    assert "Make answer() return 42." in user["content"]
    assert "return 41" in user["content"]  # stdout of the `context` step


def test_token_counts_in_record_equal_server_counts(tmp_path, servers, cluster_client):
    (tmp_path / "a.md").write_text("Summarise the design of the scheduler.")
    (tmp_path / "b.md").write_text("List three risks of the rollout plan, briefly.")
    plan = write_plan(tmp_path, (
        "- [ ] id=a lane=1 model=researcher payload=@file:a.md\n"
        "- [ ] id=b lane=1 model=researcher payload=@file:b.md\n"
    ))
    result = obdask.run(plan, cluster_client)
    assert result.ok, result.frame[["status", "error"]]
    served = [c for s in servers for c in s.stats.calls_for("llama3.2:3b")]
    assert len(served) == 2
    recorded = sorted((r["prompt_eval_count"], r["eval_count"]) for r in result.records)
    assert recorded == sorted((c["prompt_eval_count"], c["eval_count"]) for c in served)
    assert all(r["prompt_eval_count"] > 0 and r["eval_count"] > 0 for r in result.records)
    assert result.summary["tokens"]["llama3.2:3b"] == {
        "prompt": sum(c["prompt_eval_count"] for c in served),
        "output": sum(c["eval_count"] for c in served), "calls": 2}


def test_model_errors_are_clear(tmp_path, servers, cluster_client):
    (tmp_path / "spec.md").write_text("do it")
    (tmp_path / "empty.md").write_text("  \n")
    plan = write_plan(tmp_path, (
        "- [ ] id=empty lane=1 model=researcher payload=@file:empty.md\n"
        "- [ ] id=missing lane=1 model=researcher payload=@file:spec.md\n"
    ))
    with dask.config.set({"obdask.placement.models.researcher.model": "nosuch:1b"}):
        result = obdask.run(plan, cluster_client)
    errors = result.frame["error"]
    assert "spec empty.md is empty" in errors["empty"]
    assert "nosuch:1b" in errors["missing"] and "plan::missing" in errors["missing"]
    # No retry storm: each endpoint was asked at most a couple of times.
    assert all(s.stats.total("/api/chat", "nosuch:1b") <= 2 for s in servers)


def test_unknown_role_fails_before_running(tmp_path, cluster_client):
    (tmp_path / "spec.md").write_text("do it")
    plan = write_plan(tmp_path, "- [ ] id=x lane=1 model=poet payload=@file:spec.md\n")
    with pytest.raises(PlacementError, match="poet"):
        obdask.run(plan, cluster_client)


def test_malformed_endpoint_is_a_config_error(tmp_path, cluster_client):
    from obdask.exceptions import ConfigError

    (tmp_path / "spec.md").write_text("do it")
    plan = write_plan(tmp_path, "- [ ] id=x lane=1 model=researcher payload=@file:spec.md\n")
    with dask.config.set({"obdask.llm.endpoints": ["http//bad host:xx"]}):
        with pytest.raises(ConfigError, match="'http//bad host:xx' is not a valid URL"):
            obdask.run(plan, cluster_client)


def test_doc_llm_task_runs_only_when_the_plan_opts_in(tmp_path, servers, cluster_client):
    step = "- [ ] id=review lane=1 model=researcher payload=@doc:LLM_TASK review go.mod\n"
    opted = write_plan(tmp_path, "policy: llm_doc_tasks=true\n" + step)
    result = obdask.run(opted, cluster_client)
    assert result.ok and result.records[0]["status"] == "done"
    assert result.records[0]["eval_count"] > 0
    calls = [c for s in servers for c in s.stats.calls_for("llama3.2:3b")]
    assert len(calls) == 1
    plain = write_plan(tmp_path, step)
    assert obdask.run(plain, cluster_client).records[0]["status"] == "done-at-compile"
