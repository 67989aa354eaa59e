"""The placement phase: model tasks placed by where models are served, explain == run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import obdask
from obdask.placement import ClusterView, place, route
from obdask.plan import Plan
from obdask.runner import compile_plan
from obdask.testing import OllamaTestServer

GB = 1e9


def obdask_cli(*args, cwd=None, env=None, timeout=180):
    environ = {k: v for k, v in os.environ.items() if k != "OLLAMA_HOST"}
    return subprocess.run([sys.executable, "-m", "obdask.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**environ, **(env or {})})


def _compiled(text):
    plan = Plan.from_text(text, path="/tmp/p.md", plan_id="p")
    return compile_plan(plan)


MODEL_PLAN = "- [ ] id=m lane=1 payload=@file:spec.md\n- [ ] id=c lane=1 payload=@cmd:true\n"


def test_model_roles_bind_only_where_a_worker_serves_models():
    cpu = {"tcp://a:1": {"resources": {"CPU": 2.0}, "metrics": {}}}
    compiled = _compiled(MODEL_PLAN)
    place(compiled, ClusterView(workers=cpu))  # would raise: no worker offers GPU
    assert [j.resources for j in compiled.runnable] == [{}, {}]

    serving = {"tcp://a:1": {"resources": {"CPU": 2.0}, "metrics": {}},
               "tcp://g:1": {"resources": {"GPU": 1.0, "VRAM": 24 * GB},
                             "metrics": {"obdask-local-endpoint": "http://g:11434"}}}
    place(compiled, ClusterView(workers=serving))
    assert compiled.runnable[0].resources == {"GPU": 1.0, "VRAM": 10 * GB}
    assert compiled.runnable[1].resources == {}


def test_explain_without_a_cluster_says_what_depends_on_it():
    compiled = _compiled(MODEL_PLAN)
    placement = place(compiled, ClusterView())
    assert any("GPU/VRAM" in note for note in placement.cluster_dependent)


def test_a_job_with_resources_is_never_loosely_routed_to_a_worker_lacking_them():
    # Regression: a loose restriction whose workers cannot run a task makes Dask pick
    # *any* worker, resources ignored; a worker without lane-1 then died (KeyError).
    workers = {"tcp://all:1": {"resources": {"lane-1": 1e6, "lane-2": 1e6}},
               "tcp://b:1": {"resources": {"lane-2": 1e6}}}
    warm = {"model:m:latest": ["tcp://b:1"]}
    routes = route([("p::x", ["model:m:latest"], {"lane-1": 1.0}),
                    ("p::y", ["model:m:latest"], {"lane-2": 1.0}),
                    ("p::z", ["model:m:latest"], {})], warm, workers)
    assert "p::x" not in routes  # placed by its lane alone
    assert routes["p::y"] == ["tcp://b:1"] and routes["p::z"] == ["tcp://b:1"]


def test_model_step_runs_on_a_cpu_only_machine_from_the_cli(tmp_path):
    """OLLAMA_HOST=... obdask run plan.md, no GPU, no resources set by hand."""
    (tmp_path / "spec.md").write_text("Write a haiku about Dask.")
    (tmp_path / "plan.md").write_text("# Plan: first\n- [ ] id=ask lane=1 payload=@file:spec.md\n")
    with OllamaTestServer(models=["qwen2.5-coder:14b"]) as server:
        done = obdask_cli("run", tmp_path / "plan.md", "--json",
                          env={"OLLAMA_HOST": server.url, "DASK_OBDASK__RUN__N_WORKERS": "1"})
        calls = server.stats.total("/api/chat")
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    (job,) = out["jobs"]
    assert job["status"] == "done" and calls == 1


def test_no_endpoint_configured_uses_ollamas_default_and_names_it(tmp_path):
    (tmp_path / "spec.md").write_text("anything")
    (tmp_path / "plan.md").write_text("- [ ] id=ask lane=1 payload=@file:spec.md\n")
    done = obdask_cli("run", tmp_path / "plan.md", env={"DASK_OBDASK__RUN__N_WORKERS": "1",
                                                        "DASK_OBDASK__LLM__ATTEMPTS": "1"})
    assert done.returncode == 1
    assert "127.0.0.1:11434" in done.stdout + done.stderr
    assert "no model backend configured" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_explain_with_scheduler_is_what_run_submits(tmp_path, cluster_client):
    from distributed.diagnostics.plugin import SchedulerPlugin

    class Recorder(SchedulerPlugin):
        name = "submission-recorder"

        def __init__(self):
            self.seen = {}

        def update_graph(self, scheduler, *, keys, **kwargs):
            for key in keys:
                ts = scheduler.tasks[key]
                self.seen[key[1]] = {
                    "resources": dict(ts.resource_restrictions or {}),
                    "retries": ts.retries,
                    "workers": sorted(ts.worker_restrictions or ()),
                }

    plan = tmp_path / "plan.md"
    plan.write_text("- [ ] id=gpu lane=1 resources=GPU:1,VRAM:8GB retries=2 payload=@cmd:true\n"
                    "- [ ] id=plain lane=2 deps=gpu payload=@cmd:true\n"
                    "- [ ] id=meta lane=1 payload=@doc:nothing to run\n")
    explained = obdask_cli("explain", plan, "--json", "--scheduler",
                           cluster_client.scheduler.address)
    assert explained.returncode == 0, explained.stderr
    jobs = {j["key"]: j for j in json.loads(explained.stdout)["jobs"]}
    cluster_client.register_plugin(Recorder())
    try:
        result = obdask.run(plan, cluster_client)
        seen = cluster_client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.plugins["submission-recorder"].seen)
    finally:
        cluster_client.unregister_scheduler_plugin("submission-recorder")
    assert result.ok
    assert set(seen) == {k for k, j in jobs.items() if j["annotations"] is not None}
    for key, submitted in seen.items():
        ann = jobs[key]["annotations"]
        assert submitted == {"resources": ann.get("resources", {}),
                             "retries": ann.get("retries", 0),
                             "workers": sorted(ann.get("workers", []))}
    assert jobs["plan::gpu"]["annotations"]["resources"] == {"GPU": 1.0, "VRAM": 8e9}


@pytest.mark.parametrize("plan_id", ["nightly-build", "nightly-2"])
def test_a_plan_is_one_dask_prefix(tmp_path, cluster_client, plan_id):
    plan = tmp_path / "plan.md"
    plan.write_text(f"plan_id={plan_id}\n" + "".join(
        f"- [ ] id=s{i} lane=1 payload=@cmd:true\n" for i in range(6)))
    assert obdask.run(plan, cluster_client).ok
    prefixes = cluster_client.run_on_scheduler(
        lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    from obdask.keys import group_name

    assert group_name(plan_id) in prefixes
    assert not [p for p in prefixes if "::" in p]
