"""End-to-end runs on a real LocalCluster: propagation, dedupe, resume, apply, S3."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import time

import dask
import pytest

import obdask
from obdask.artifacts import ArtifactStore, sha1_bytes
from obdask.plan import Plan
from obdask.records import read_run
from tests.conftest import EXAMPLES


def write_plan(folder, text, name="plan.md"):
    path = folder / name
    path.write_text(text)
    return Plan.from_file(path)


def statuses(result):
    return {r["id"]: r["status"] for r in result.records}


@pytest.mark.parametrize("example", sorted(glob.glob(os.path.join(EXAMPLES, "*", "plan.md"))))
def test_every_example_plan_runs(example, tmp_path, cluster_client):
    import shutil

    folder = tmp_path / "ex"
    shutil.copytree(os.path.dirname(example), folder,
                    ignore=shutil.ignore_patterns(".obdask", "build"))
    result = obdask.run(folder / "plan.md", cluster_client)
    assert result.ok, result.frame[["status", "error"]]
    assert set(statuses(result).values()) <= {"done", "done-at-compile", "deduplicated"}


def test_quickstart_applies_and_records(quickstart, cluster_client):
    result = obdask.run(quickstart / "plan.md", cluster_client)
    assert result.ok
    assert (quickstart / "build" / "out.txt").read_text() == "hello, world!\n"
    frame = result.frame
    assert frame.loc["bootstrap", "status"] == "done-at-compile"
    assert frame.loc["context", "status"] == "done-at-compile"
    assert frame.loc["verify", "exit_code"] == 0
    assert frame.loc["code.feature", "files"] == ["build/greeting.py"]
    # The durable record holds the same jobs.
    stored = read_run(str(quickstart / ".obdask" / "records"), result.plan_id, result.run_id)
    assert {r["id"]: r["status"] for r in stored} == statuses(result)
    # stdout is an artifact, content addressed.
    store = ArtifactStore(str(quickstart / ".obdask" / "artifacts"))
    out = store.get(frame.loc["verify", "stdout"])
    assert out.strip() == b"1 build/out.txt"


def test_the_summary_says_where_the_clients_time_went(tmp_path, cluster_client):
    plan = write_plan(tmp_path, "- [ ] id=a lane=1 payload=@cmd:sleep 0.3\n"
                                "- [ ] id=b lane=1 deps=a payload=@cmd:true\n")
    result = obdask.run(plan, cluster_client)
    phases = result.summary["client_s"]
    assert list(phases) == ["prepare", "place", "optimize", "submit", "wait", "collect"]
    assert all(seconds >= 0 for seconds in phases.values())
    assert phases["wait"] >= 0.3  # the jobs ran while the client waited
    assert sum(phases.values()) <= result.summary["duration_s"]
    with open(os.path.join(result.location, "summary.json")) as f:
        assert json.load(f)["client_s"] == phases


def test_failure_stops_only_dependents(tmp_path, cluster_client):
    plan = write_plan(tmp_path, (
        "- [ ] id=ok1 lane=1 payload=@cmd:echo one > one.txt\n"
        "- [ ] id=bad lane=1 payload=@cmd:false\n"
        "- [ ] id=after.bad lane=1 deps=bad payload=@cmd:touch never.txt\n"
        "- [ ] id=after.after lane=1 deps=after.bad payload=@cmd:touch never2.txt\n"
        "- [ ] id=after.ok lane=1 deps=ok1 payload=@cmd:cat one.txt\n"
    ))
    result = obdask.run(plan, cluster_client)
    assert not result.ok
    assert statuses(result) == {"ok1": "done", "bad": "failed", "after.bad": "skipped",
                                "after.after": "skipped", "after.ok": "done"}
    frame = result.frame
    assert frame.loc["bad", "exit_code"] == 1
    assert "exit code 1" in frame.loc["bad", "error"] and "plan::bad" in frame.loc["bad", "error"]
    assert "plan::bad" in frame.loc["after.after", "error"]
    assert not (tmp_path / "never.txt").exists()


def test_disallowed_command_refused_nothing_runs(tmp_path, cluster_client):
    plan = write_plan(tmp_path, "- [ ] id=sneaky lane=1 payload=@cmd:touch made && "
                                "curl http://127.0.0.1:9/x | sh\n")
    result = obdask.run(plan, cluster_client)
    error = result.frame.loc["sneaky", "error"]
    assert result.frame.loc["sneaky", "status"] == "failed"
    assert "curl" in error and "allowlist" in error
    assert not (tmp_path / "made").exists()


def test_payload_text_that_looks_like_fields(tmp_path, cluster_client):
    plan = write_plan(tmp_path, "- [ ] id=a lane=1 payload=@cmd:echo id=x lane=9 > f.txt\n")
    result = obdask.run(plan, cluster_client)
    assert statuses(result) == {"a": "done"}
    assert (tmp_path / "f.txt").read_text() == "id=x lane=9\n"


def test_step_timeout_fails_the_job(tmp_path, cluster_client):
    plan = write_plan(tmp_path, "- [ ] id=slow lane=1 timeout=1s payload=@cmd:sleep 30\n")
    result = obdask.run(plan, cluster_client)
    assert result.frame.loc["slow", "status"] == "failed"
    assert "timed out" in result.frame.loc["slow", "error"]
    assert result.frame.loc["slow", "duration_s"] < 15


def test_dedupe_key_with_artifact_completes_at_once(tmp_path, cluster_client):
    store = ArtifactStore(str(tmp_path / ".obdask" / "artifacts"))
    key = store.put(b"already produced")
    plan = write_plan(tmp_path, (
        f"- [ ] id=cached lane=1 payload=@cmd:touch ran.txt dedupe={key}\n"
        "- [ ] id=fresh lane=1 payload=@cmd:echo new dedupe=k-fresh\n"
        "- [ ] id=next lane=1 deps=cached payload=@cmd:touch next.txt\n"
    ))
    first = obdask.run(plan, cluster_client)
    assert statuses(first) == {"cached": "deduplicated", "fresh": "done", "next": "done"}
    assert not (tmp_path / "ran.txt").exists() and (tmp_path / "next.txt").exists()
    second = obdask.run(plan, cluster_client)
    assert statuses(second)["fresh"] == "deduplicated"


def test_resume_skips_completed_jobs(tmp_path, cluster_client):
    plan = write_plan(tmp_path, (
        "- [ ] id=count lane=1 payload=@cmd:echo x >> count.txt\n"
        "- [ ] id=gate lane=1 deps=count payload=@cmd:test -f go.flag\n"
        "- [ ] id=last lane=1 deps=gate payload=@cmd:echo done > last.txt\n"
    ))
    first = obdask.run(plan, cluster_client)
    assert statuses(first) == {"count": "done", "gate": "failed", "last": "skipped"}
    (tmp_path / "go.flag").write_text("")
    second = obdask.run(plan, cluster_client, resume=True)
    assert statuses(second) == {"count": "resumed", "gate": "done", "last": "done"}
    assert (tmp_path / "count.txt").read_text() == "x\n"
    third = obdask.run(plan, cluster_client, resume=True)
    assert set(statuses(third).values()) == {"resumed"}
    # Without --resume everything runs again.
    fourth = obdask.run(plan, cluster_client)
    assert statuses(fourth)["count"] == "done"
    assert (tmp_path / "count.txt").read_text() == "x\nx\n"


def test_changed_step_is_not_resumed(tmp_path, cluster_client):
    write_plan(tmp_path, "- [ ] id=a lane=1 payload=@cmd:echo v1 > v.txt\n")
    obdask.run(Plan.from_file(tmp_path / "plan.md"), cluster_client)
    plan = write_plan(tmp_path, "- [ ] id=a lane=1 payload=@cmd:echo v2 > v.txt\n")
    result = obdask.run(plan, cluster_client, resume=True)
    assert statuses(result) == {"a": "done"}
    assert (tmp_path / "v.txt").read_text() == "v2\n"


def test_ledger_replays_a_completed_job_instead_of_rerunning(tmp_path):
    """A task Dask re-runs after the job completed returns the recorded result."""
    from obdask.execute import run_job
    from obdask.runner import prepare

    plan = write_plan(tmp_path, "- [ ] id=append lane=1 payload=@cmd:echo line >> log.txt\n")
    compiled, ctx = prepare(plan)
    job = compiled.jobs[0]
    first = run_job(job.spec, ctx)
    again = run_job(job.spec, ctx)
    assert (tmp_path / "log.txt").read_text() == "line\n"
    assert again["replayed"] and again["started"] == first["started"]


def test_apply_good_and_bad_diff_in_git_repo(tmp_path, git_repo, cluster_client):
    good = tmp_path / "good.diff"
    good.write_text("--- a/app.py\n+++ b/app.py\n@@ -1,2 +1,2 @@\n def answer():\n"
                    "-    return 41\n+    return 42\n")
    bad = tmp_path / "bad.diff"
    bad.write_text("--- a/app.py\n+++ b/app.py\n@@ -1,2 +1,2 @@\n def answer():\n"
                   "-    return 40\n+    return 43\n")
    sha = sha1_bytes(good.read_bytes())
    plan = write_plan(tmp_path, (
        f"- [ ] id=good lane=2 payload=@file:good.diff#sha1={sha}#apply\n"
        "- [ ] id=bad lane=2 deps=good payload=@file:bad.diff#apply\n"
    ))
    result = obdask.run(plan, cluster_client, workspace=str(git_repo))
    assert statuses(result) == {"good": "done", "bad": "failed"}
    assert "does not apply" in result.frame.loc["bad", "error"]
    assert (git_repo / "app.py").read_text() == "def answer():\n    return 42\n"
    diff = subprocess.run(["git", "diff", "--stat"], cwd=git_repo, capture_output=True,
                          text=True).stdout
    assert "1 file changed" in diff


def test_apply_is_idempotent_and_a_pinned_diff_is_applied_again_after_a_reset(
        tmp_path, git_repo, cluster_client):
    # Regression: #sha1= on an #apply step deduplicated on the diff alone, so after the
    # workspace was reset a second run reported the step done and never applied it.
    good = tmp_path / "good.diff"
    good.write_text("--- a/app.py\n+++ b/app.py\n@@ -1,2 +1,2 @@\n def answer():\n"
                    "-    return 41\n+    return 42\n")
    sha = sha1_bytes(good.read_bytes())
    plan = write_plan(tmp_path, f"- [ ] id=good lane=1 payload=@file:good.diff#sha1={sha}#apply\n")
    first = obdask.run(plan, cluster_client, workspace=str(git_repo))
    assert statuses(first) == {"good": "done"}
    again = obdask.run(plan, cluster_client, workspace=str(git_repo))  # already applied
    assert statuses(again) == {"good": "done"}
    assert again.records[0]["already_applied"] is True
    subprocess.run(["git", "checkout", "app.py"], cwd=git_repo, check=True)
    reset = obdask.run(plan, cluster_client, workspace=str(git_repo))
    assert statuses(reset) == {"good": "done"} and reset.records[0]["applied"] is True
    assert (git_repo / "app.py").read_text() == "def answer():\n    return 42\n"


def test_sha1_mismatch_is_a_clear_error(tmp_path, cluster_client):
    (tmp_path / "spec.md").write_text("content")
    plan = write_plan(tmp_path, f"- [ ] id=pinned lane=1 payload=@file:spec.md#sha1={'0' * 40}"
                                "#test\n")
    result = obdask.run(plan, cluster_client)
    error = result.frame.loc["pinned", "error"]
    assert "plan::pinned" in error and "sha1" in error and "0" * 40 in error


def test_model_task_without_backend_fails_clearly(tmp_path, cluster_client):
    (tmp_path / "spec.md").write_text("write a function")
    plan = write_plan(tmp_path, "- [ ] id=llm lane=2 payload=@file:spec.md\n")
    with dask.config.set({"obdask.llm.endpoints": [], "obdask.llm.attempts": 1}):
        result = obdask.run(plan, cluster_client)
    # nothing configured: Ollama's own default, named in the error
    assert "127.0.0.1:11434" in result.frame.loc["llm", "error"]


def test_s3_payloads_and_s3_stores(tmp_path, s3_bucket, cluster_client):
    bucket, fs = s3_bucket
    fs.pipe(f"{bucket}/specs/note.md", b"remote spec")
    sha = sha1_bytes(b"remote spec")
    plan = write_plan(tmp_path, (
        f"- [ ] id=remote lane=1 payload=@file:s3://{bucket}/specs/note.md#sha1={sha}#test\n"
        f"- [ ] id=missing lane=1 payload=@file:s3://{bucket}/specs/none.md#test\n"
        "- [ ] id=out lane=1 deps=remote payload=@cmd:echo stored in s3\n"
    ))
    result = obdask.run(plan, cluster_client, artifacts=f"s3://{bucket}/artifacts",
                        records=f"s3://{bucket}/runs")
    assert statuses(result) == {"remote": "done", "missing": "failed", "out": "done"}
    assert "file not found" in result.frame.loc["missing", "error"]
    stdout_key = result.frame.loc["out", "stdout"]
    assert fs.cat(f"{bucket}/artifacts/by-hash/{stdout_key}") == b"stored in s3\n"
    lines = fs.cat(f"{bucket}/runs/plan/{result.run_id}/records.jsonl").decode().splitlines()
    assert {json.loads(line)["id"] for line in lines} == {"remote", "missing", "out"}
    # The pinned spec is now a dedupe hit for a new run only if an artifact has that hash.
    assert not fs.exists(f"{bucket}/artifacts/by-hash/{sha}")


def test_annotations_reach_the_scheduler_for_every_key(tmp_path, cluster_client):
    from distributed.diagnostics.plugin import SchedulerPlugin

    class Recorder(SchedulerPlugin):
        name = "restriction-recorder"

        def __init__(self):
            self.seen = {}

        def update_graph(self, scheduler, *, keys, **kwargs):
            for key in keys:
                ts = scheduler.tasks[key]
                # job keys are (plan group, "plan::step") tuples: one task group per plan
                assert key == ("plan", key[1])
                self.seen[key[1]] = (ts.resource_restrictions, ts.retries, ts.priority[0])

    cluster_client.register_plugin(Recorder())
    plan = write_plan(tmp_path, (
        "- [ ] id=gpu lane=1 resources=GPU:1,VRAM:8GB retries=2 payload=@cmd:true\n"
        "- [ ] id=plain lane=1 deps=gpu payload=@cmd:true\n"
        "- [ ] id=meta lane=1 payload=@doc:nothing to run\n"
        "- [ ] id=gpu2 lane=1 deps=plain,meta resources=GPU:1 payload=@cmd:true\n"
    ))
    result = obdask.run(plan, cluster_client, priority=7)
    assert result.ok
    seen = cluster_client.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.plugins["restriction-recorder"].seen)
    assert "plan::meta" not in seen  # metadata costs no task
    assert seen["plan::gpu"][0] == {"GPU": 1.0, "VRAM": 8e9} and seen["plan::gpu"][1] == 2
    assert not seen["plan::plain"][0] and seen["plan::plain"][1] == 0
    assert seen["plan::gpu2"][0] == {"GPU": 1.0}
    assert all(priority == -7 for _, _, priority in seen.values())
    cluster_client.unregister_scheduler_plugin("restriction-recorder")


def test_local_files_are_staged_in_a_remote_store(tmp_path, s3_bucket, cluster_client):
    """Workers that cannot see the plan's folder read @file: payloads from the store."""
    bucket, fs = s3_bucket
    (tmp_path / "spec.md").write_text("staged content")
    sha = sha1_bytes(b"staged content")
    plan = write_plan(tmp_path, f"- [ ] id=t lane=1 payload=@file:spec.md#sha1={sha}#test\n"
                                "- [ ] id=gone lane=1 payload=@file:absent.md#test\n")
    from obdask.execute import run_job
    from obdask.runner import prepare

    compiled, ctx = prepare(plan, artifacts=f"s3://{bucket}/artifacts",
                            records=f"s3://{bucket}/runs")
    job = {j.spec.step_id: j for j in compiled.jobs}
    assert job["t"].spec.staged == sha and job["gone"].spec.staged is None
    assert fs.cat(f"{bucket}/artifacts/by-hash/{sha}") == b"staged content"
    (tmp_path / "spec.md").unlink()  # as on a worker that has no copy of the plan folder
    assert run_job(job["t"].spec, ctx)["status"] == "done"
    # On local disk nothing is staged (workers share the folder).
    local, _ = prepare(plan)
    assert all(j.spec.staged is None for j in local.jobs)


def test_git_workspace_runs_in_worker_checkouts(tmp_path, git_repo, cluster_client):
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=git_repo, capture_output=True,
                         text=True, check=True).stdout.strip()
    plan = write_plan(tmp_path, (
        f"workspace=git:{git_repo}@{sha}\n"
        "- [ ] id=edit lane=1 payload=@cmd:echo changed > app.py && git rev-parse HEAD\n"
        "- [ ] id=read lane=1 deps=edit payload=@cmd:cat app.py\n"
    ))
    result = obdask.run(plan, cluster_client)
    assert result.ok, result.frame[["status", "error"]]
    frame = result.frame
    store = ArtifactStore(str(tmp_path / ".obdask" / "artifacts"))
    assert store.get(frame.loc["edit", "stdout"]).decode().strip() == sha
    # Each job ran in its worker's checkout, never in the source repository.
    assert (git_repo / "app.py").read_text() == "def answer():\n    return 41\n"
    assert all("obdask-git" in w for w in frame["workspace"])
    assert all(isinstance(w, bool) for w in frame["warm"])


def test_resume_after_a_run_that_died_uses_its_ledger(tmp_path, cluster_client):
    """A run killed before writing records.jsonl still left its ledger behind."""
    from obdask.execute import run_job
    from obdask.runner import prepare

    plan = write_plan(tmp_path, "- [ ] id=a lane=1 payload=@cmd:echo a >> log.txt\n"
                                "- [ ] id=b lane=1 deps=a payload=@cmd:echo b >> log.txt\n")
    compiled, ctx = prepare(plan)
    run_job(compiled.jobs[0].spec, ctx)  # job a completed, then the client died
    result = obdask.run(plan, cluster_client, resume=True)
    assert statuses(result) == {"a": "resumed", "b": "done"}
    assert (tmp_path / "log.txt").read_text() == "a\nb\n"



def test_client_may_be_a_scheduler_address(tmp_path, cluster_client):
    (tmp_path / "plan.md").write_text("- [ ] id=a lane=1 payload=@cmd:echo addr > a.txt\n")
    result = obdask.run(tmp_path / "plan.md", client=cluster_client.scheduler.address)
    assert result.ok and (tmp_path / "a.txt").read_text() == "addr\n"
    assert result.frame.loc["a", "worker"] in cluster_client.scheduler_info()["workers"]


def test_bad_plan_argument_is_a_type_error():
    with pytest.raises(TypeError, match="plan must be an obdask.Plan or a path"):
        obdask.run(123)


def test_path_objects_for_workspace_and_stores(tmp_path, cluster_client):
    work, stores = tmp_path / "work", tmp_path / "stores"
    work.mkdir()
    (tmp_path / "plan.md").write_text("- [ ] id=a lane=1 payload=@cmd:echo p > p.txt\n")
    result = obdask.run(tmp_path / "plan.md", cluster_client, workspace=work,
                        artifacts=stores / "artifacts", records=stores / "records")
    assert result.ok and (work / "p.txt").read_text() == "p\n"
    assert result.location.startswith(str(stores / "records"))


def test_second_run_of_a_plan_waits_for_the_first(tmp_path, cluster_client):
    # Same plan, same keys: the second run must not share the first run's tasks.
    import threading

    (tmp_path / "plan.md").write_text(
        "- [ ] id=slow lane=1 payload=@cmd:sleep 1.5\n"
        "- [ ] id=mark lane=1 deps=slow payload=@cmd:echo x >> marks\n")
    results = {}

    def first():
        results["first"] = obdask.run(tmp_path / "plan.md", cluster_client)

    thread = threading.Thread(target=first)
    thread.start()
    deadline = time.monotonic() + 30
    while "plan::slow" not in cluster_client.who_has() and time.monotonic() < deadline:
        time.sleep(0.02)  # the first run's graph is on the scheduler
    second = obdask.run(tmp_path / "plan.md", cluster_client)
    thread.join(60)
    assert results["first"].ok and second.ok
    assert (tmp_path / "marks").read_text() == "x\nx\n"  # both runs really ran
    first_done = results["first"].frame.loc["mark", "finished"]
    assert second.frame.loc["slow", "started"] >= first_done


def test_retry_reasons_name_the_command_failure_not_a_lost_worker(tmp_path, cluster_client):
    # Regression: Dask moves an erred task with retries left through 'released', which
    # was reported as "attempt 1: worker ... lost" although no worker was lost.
    plan = write_plan(tmp_path, "- [ ] id=f lane=1 retries=2 payload=@cmd:echo oops >&2; false\n")
    result = obdask.run(plan, cluster_client)
    (record,) = result.records
    assert record["status"] == "failed" and record["attempts"] == 3
    assert len(record["retries"]) == 2
    for reason in record["retries"]:
        assert "lost" not in reason
        assert "failed on" in reason and "exit" in reason and "oops" in reason


def test_run_context_cannot_change_after_it_was_pickled(tmp_path):
    # Regression: the context caches its pickled form; a field set after the first
    # pickle shipped the old value to every later task.
    import dataclasses
    import pickle

    from obdask.runner import prepare

    plan = write_plan(tmp_path, "- [ ] id=a lane=1 payload=@cmd:true\n")
    _, ctx = prepare(plan)
    pickle.dumps(ctx)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.workspace = "/elsewhere"
    moved = dataclasses.replace(ctx, workspace="/elsewhere")
    assert pickle.loads(pickle.dumps(moved)).workspace == "/elsewhere"
