"""Chain fusion and batching (obdask.optimize): fewer Dask tasks, the same job records."""

from __future__ import annotations

import dask
import pytest

import obdask
from obdask.compile import compile_plan
from obdask.optimize import Options, optimize
from obdask.plan import Plan, parse
from obdask.runner import explain, job_annotations


def _plan(lines: list[str], plan_id: str = "opt") -> Plan:
    return parse("\n".join(lines) + "\n", plan_id=plan_id)


def _units(plan: Plan, options: Options | None = None, **kw):
    compiled = compile_plan(plan)
    return optimize(compiled, lambda job: job_annotations(job, {}),
                    options or Options(), **kw)


def _shape(units):
    return [(u.kind, [j.spec.step_id for j in u.jobs]) for u in units]


def test_linear_chains_fuse_and_leaves_batch():
    plan = _plan(["- [ ] id=a lane=1 payload=@cmd:true",
                  "- [ ] id=b lane=1 deps=a payload=@cmd:true",
                  "- [ ] id=c lane=1 deps=b payload=@cmd:true",
                  "- [ ] id=x lane=1 payload=@cmd:true",
                  "- [ ] id=y lane=1 payload=@cmd:true",
                  "- [ ] id=z lane=1 payload=@cmd:true"])
    assert _shape(_units(plan)) == [("chain", ["a", "b", "c"]), ("batch", ["x", "y", "z"])]
    assert _shape(_units(plan, Options(fuse=False, batch=False))) == [
        ("job", [s]) for s in "abcxyz"]
    # Two worker threads: batches small enough that each thread gets about two.
    assert _shape(_units(plan, threads=1)) == [("chain", ["a", "b", "c"]),
                                               ("batch", ["x", "y"]), ("job", ["z"])]
    assert _shape(_units(plan, Options(batch_size=2))) == [
        ("chain", ["a", "b", "c"]), ("batch", ["x", "y"]), ("job", ["z"])]


def test_what_does_not_fuse_or_batch():
    plan = _plan(["- [ ] id=a lane=1 payload=@cmd:true",
                  "- [ ] id=b lane=1 deps=a payload=@cmd:true",   # a has two dependents
                  "- [ ] id=c lane=1 deps=a payload=@cmd:true",
                  "- [ ] id=d lane=1 deps=c retries=2 payload=@cmd:true",  # other retries
                  "- [ ] id=e lane=1 deps=d payload=@cmd:true",
                  "- [ ] id=f lane=1 deps=d payload=@cmd:true",
                  "- [ ] id=m lane=1 payload=@doc:metadata, never a task",
                  "- [ ] id=g lane=1 deps=m payload=@cmd:true",
                  "- [ ] id=h lane=1 deps=g payload=@cmd:true"])
    shape = _shape(_units(plan))
    assert ("chain", ["g", "h"]) in shape  # a metadata dependency is no link
    assert all(kind != "chain" or ids == ["g", "h"] for kind, ids in shape)
    assert all("m" not in ids for _, ids in shape)
    # e and f share their dependency (d) and have no dependents: one batch; b and c
    # share theirs (a) but not their dependents (c has d): no batch.
    assert [ids for kind, ids in shape if kind == "batch"] == [["e", "f"]]
    assert sum(len(ids) for _, ids in shape) == 8


def test_jobs_with_the_same_dependencies_and_dependents_batch():
    """A fan-out's middle batches: the batch waits for what each member waited for,
    and whatever waits for one member waits for all of them, so nobody waits longer."""
    middle = [f"m{i}" for i in range(6)]
    plan = _plan(["- [ ] id=root lane=1 payload=@cmd:true",
                  *[f"- [ ] id={m} lane=1 deps=root payload=@cmd:true" for m in middle],
                  "- [ ] id=odd lane=1 deps=root payload=@cmd:true",  # its own dependent
                  "- [ ] id=after lane=1 deps=odd payload=@cmd:true",
                  f"- [ ] id=sink lane=1 deps={','.join(middle)},after payload=@cmd:true"])
    assert _shape(_units(plan, Options(fuse=False))) == [
        ("job", ["root"]), ("batch", middle), ("job", ["odd"]), ("job", ["after"]),
        ("job", ["sink"])]
    assert _shape(_units(plan, threads=1)) == [
        ("job", ["root"]), ("batch", middle[:3]), ("batch", middle[3:]),
        ("chain", ["odd", "after"]), ("job", ["sink"])]


def test_durations_bound_batches():
    plan = _plan([f"- [ ] id=j{i} lane=1 payload=@cmd:true" for i in range(6)])
    units = _units(plan, Options(batch_size=64, batch_duration=1.0),
                   estimate=lambda job: 0.4)
    assert [len(u.jobs) for u in units] == [2, 2, 2]
    assert _shape(_units(plan, excluded={"opt::j0"}))[0] == ("job", ["j0"])


def test_explain_shows_fused_and_batched(tmp_path):
    plan = _plan(["- [ ] id=a lane=1 payload=@cmd:true",
                  "- [ ] id=b lane=1 deps=a payload=@cmd:true",
                  "- [ ] id=x lane=1 payload=@cmd:true",
                  "- [ ] id=y lane=1 payload=@cmd:true"])
    out = explain(plan)
    assert out["optimize"] == {"tasks": 2, "jobs": 4, "fused": [["opt::a", "opt::b"]],
                               "batched": [["opt::x", "opt::y"]]}
    rows = {j["key"]: j for j in out["jobs"]}
    assert rows["opt::a"]["task"] == "opt::b" and rows["opt::a"]["unit"] == "chain"
    assert rows["opt::y"]["task"] == "opt::x" and rows["opt::y"]["unit"] == "batch"
    with dask.config.set({"obdask.optimize.fuse": False, "obdask.optimize.batch": False}):
        assert explain(plan)["optimize"]["tasks"] == 4


def test_a_second_run_sizes_its_batches_from_the_first_runs_durations(tmp_path, cluster_client):
    """The scheduler's job metrics of an earlier run bound the batches by duration."""
    lines = ["plan_id=sized"] + [f"- [ ] id=s{i} lane=1 payload=@cmd:sleep 0.3"
                                 for i in range(8)]
    (tmp_path / "plan.md").write_text("\n".join(lines) + "\n")
    with dask.config.set({"obdask.optimize.batch-duration": "0.5s"}):
        first = explain(Plan.from_file(tmp_path / "plan.md"), cluster_client)["optimize"]
        assert obdask.run(Plan.from_file(tmp_path / "plan.md"), cluster_client).ok
        second = explain(Plan.from_file(tmp_path / "plan.md"), cluster_client)["optimize"]
    assert first["tasks"] < 8  # no durations yet: bounded by size and thread count only
    assert second["tasks"] == 8 and second["batched"] == []  # 0.3 s each: one per task


def _run(tmp_path, lines, client, **kw):
    (tmp_path / "plan.md").write_text("\n".join(lines) + "\n")
    return obdask.run(Plan.from_file(tmp_path / "plan.md"), client, **kw)


def test_a_failing_link_stops_its_chain_and_skips_its_dependents(tmp_path, cluster_client):
    result = _run(tmp_path, ["plan_id=chainfail",
                             "- [ ] id=a lane=1 payload=@cmd:echo a",
                             "- [ ] id=b lane=1 deps=a payload=@cmd:false",
                             "- [ ] id=c lane=1 deps=b payload=@cmd:echo c",
                             "- [ ] id=d lane=1 deps=c payload=@cmd:echo d",
                             "- [ ] id=e lane=1 deps=d resources=GPU:1 payload=@cmd:echo e",
                             # a failure upstream of a chain skips all of it
                             "- [ ] id=u lane=1 resources=GPU:1 payload=@cmd:false",
                             "- [ ] id=v lane=1 deps=u payload=@cmd:echo v",
                             "- [ ] id=w lane=1 deps=v payload=@cmd:echo w",
                             # a link's own timeout applies inside the fused task
                             "- [ ] id=s lane=1 payload=@cmd:echo s",
                             "- [ ] id=t lane=1 deps=s timeout=1s payload=@cmd:sleep 20",
                             "- [ ] id=z lane=1 deps=t payload=@cmd:echo z"],
                  cluster_client)
    fused = explain(Plan.from_file(tmp_path / "plan.md"), cluster_client)["optimize"]["fused"]
    assert sorted(fused) == [["chainfail::a", "chainfail::b", "chainfail::c", "chainfail::d"],
                             ["chainfail::s", "chainfail::t", "chainfail::z"],
                             ["chainfail::v", "chainfail::w"]]
    rec = {r["id"]: r for r in result.records}
    assert [rec[s]["status"] for s in "abcde"] == ["done", "failed", "skipped", "skipped",
                                                    "skipped"]
    assert rec["b"]["exit_code"] == 1 and rec["a"]["exit_code"] == 0
    assert rec["c"]["error"] == "dependency chainfail::b failed"
    assert rec["e"]["error"] == "dependency chainfail::b failed"
    assert [rec[s]["status"] for s in "uvw"] == ["failed", "skipped", "skipped"]
    assert rec["w"]["error"] == "dependency chainfail::u failed"
    assert [rec[s]["status"] for s in "stz"] == ["done", "failed", "skipped"]
    assert "timed out" in rec["t"]["error"] or "timeout" in rec["t"]["error"], rec["t"]
    assert rec["t"]["duration_s"] < 10
    assert result.summary["counts"] == {"done": 2, "failed": 3, "skipped": 6}
    assert result.output("a") == "a\n"


def test_a_failing_job_does_not_fail_its_batch_mates(tmp_path, cluster_client):
    lines = ["plan_id=batchfail"] + [
        f"- [ ] id=j{i} lane=1 payload=@cmd:{'false' if i == 3 else 'echo ' + str(i)}"
        for i in range(8)]
    seen = []
    with dask.config.set({"obdask.optimize.batch-size": 8}):
        result = _run(tmp_path, lines, cluster_client, progress=lambda d, t: seen.append((d, t)))
    rec = {r["id"]: r for r in result.records}
    assert rec["j3"]["status"] == "failed" and rec["j3"]["exit_code"] == 1
    assert all(rec[f"j{i}"]["status"] == "done" for i in range(8) if i != 3)
    assert result.output("j7") == "7\n"
    # Two threads: four batches of two; progress counts jobs, not tasks.
    assert seen == [(0, 8), (2, 8), (4, 8), (6, 8), (8, 8)]
    assert len(result.frame) == 8 and result.to_json()["jobs"][3]["status"] == "failed"


def test_a_batch_between_two_jobs_passes_records_and_failures_on(tmp_path, cluster_client):
    """A fan-out's batched middle: its dependent reads a member's output, and a failing
    member skips the jobs that wait for it, as if nothing had been batched."""
    middle = [f"m{i}" for i in range(8)]
    lines = ["plan_id=fanbatch", "- [ ] id=root lane=1 payload=@cmd:echo root",
             *[f"- [ ] id={m} lane=1 deps=root payload=@cmd:echo {m}" for m in middle],
             f"- [ ] id=sink lane=1 deps={','.join(middle)} payload=@file:job:m5#test"]
    with dask.config.set({"obdask.optimize.batch-size": 8}):
        batched = explain(_plan(lines[1:], "fanbatch"), cluster_client)["optimize"]["batched"]
        result = _run(tmp_path, lines, cluster_client)
    assert sum(map(len, batched)) == 8 and all(len(b) > 1 for b in batched)
    assert result.ok, result.frame[["status", "error"]]
    rec = {r["id"]: r for r in result.records}
    assert rec["sink"]["input_bytes"] == len("m5\n")
    assert result.output("m7") == "m7\n"
    lines[4] = "- [ ] id=m2 lane=1 deps=root payload=@cmd:false"
    with dask.config.set({"obdask.optimize.batch-size": 8}):
        result = _run(tmp_path, lines, cluster_client)
    rec = {r["id"]: r for r in result.records}
    assert rec["m2"]["status"] == "failed" and rec["m2"]["exit_code"] == 1
    assert all(rec[m]["status"] == "done" for m in middle if m != "m2")
    assert rec["sink"]["status"] == "skipped"
    assert rec["sink"]["error"] == "dependency fanbatch::m2 failed"
    assert result.summary["counts"] == {"done": 8, "failed": 1, "skipped": 1}


def test_the_units_after_a_fan_outs_first_job_spread_over_the_workers(tmp_path, cluster_client):
    """Dask would queue every unit depending on the root's small record on the root's
    worker; each goes to a worker with a free thread instead."""
    lines = ["plan_id=fanspread", "- [ ] id=root lane=1 payload=@cmd:true",
             *[f"- [ ] id=m{i} lane=1 deps=root payload=@cmd:sleep 0.01" for i in range(16)]]
    for _ in range(3):
        result = _run(tmp_path, lines, cluster_client)
        assert result.ok, result.frame[["status", "error"]]
        workers = {r["worker"] for r in result.records if r["id"].startswith("m")}
        assert len(workers) == 2, result.frame[["worker"]]


def test_a_fused_job_is_retried_in_place_with_its_own_retries(tmp_path, cluster_client):
    marker = tmp_path / "tried"
    flaky = f"@cmd:test -f {marker} && exit 0; touch {marker}; exit 1"  # fails once
    with dask.config.set({"obdask.run.retries": 1}):
        result = _run(tmp_path, ["plan_id=fusedretry",
                                 "- [ ] id=a lane=1 payload=@cmd:echo a",
                                 f"- [ ] id=b lane=1 deps=a payload={flaky}",
                                 "- [ ] id=c lane=1 deps=b payload=@cmd:echo c"],
                      cluster_client)
        assert explain(Plan.from_file(tmp_path / "plan.md"))["optimize"]["fused"] == [
            ["fusedretry::a", "fusedretry::b", "fusedretry::c"]]
    rec = {r["id"]: r for r in result.records}
    assert result.ok, result.frame[["status", "error"]]
    assert rec["b"]["attempts"] == 2 and rec["c"]["attempts"] == 1 and rec["a"]["attempts"] == 1
    assert rec["b"]["retries"][0].startswith("attempt 1 failed on tcp://")
    assert "tries_in_task" not in rec["b"]
    marker.unlink()  # no retries left: b fails, c is skipped
    result = _run(tmp_path, ["plan_id=fusedretry",
                             "- [ ] id=a lane=1 payload=@cmd:echo a",
                             f"- [ ] id=b lane=1 deps=a payload={flaky}",
                             "- [ ] id=c lane=1 deps=b payload=@cmd:echo c"], cluster_client)
    assert [r["status"] for r in result.records] == ["done", "failed", "skipped"]
    assert result.records[1]["attempts"] == 1


@pytest.mark.parametrize("enabled", [True, False])
def test_fewer_tasks_same_records(tmp_path, cluster_client, enabled):
    lines = [f"plan_id=same{int(enabled)}"]
    for c in range(3):
        lines += [f"- [ ] id=c{c}l{i} lane=1 " + (f"deps=c{c}l{i - 1} " if i else "") +
                  f"payload=@cmd:echo {c}.{i}" for i in range(5)]
    lines += [f"- [ ] id=i{i} lane=1 payload=@cmd:echo {i}" for i in range(10)]
    with dask.config.set({"obdask.optimize.fuse": enabled, "obdask.optimize.batch": enabled}):
        result = _run(tmp_path, lines, cluster_client)
    assert result.ok and len(result.records) == 25
    assert result.output("c2l4") == "2.4\n" and result.output("i9") == "9\n"
    assert all(r["attempts"] == 1 for r in result.records)
    with dask.config.set({"obdask.optimize.fuse": enabled, "obdask.optimize.batch": enabled}):
        tasks = explain(Plan.from_file(tmp_path / "plan.md"), cluster_client)["optimize"]
    assert tasks["tasks"] == (3 + 4 if enabled else 25), tasks


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fused_and_batched_tasks_rerun_after_worker_loss_apply_each_job_once(tmp_path):
    """A worker SIGKILLed mid-chain: the fused/batched tasks it ran or held run again
    elsewhere and replay from the ledger the jobs they had recorded (each line once)."""
    from tests.cluster_utils import NO_SANDBOX, ProcessCluster, run_killing_a_worker, write_plan

    lines_file = tmp_path / "lines.txt"
    lines, ids = [], []
    for c in range(20):  # 20 chains of 10: fused, one task each
        for i in range(10):
            sid = f"c{c:02d}l{i}"
            ids.append(sid)
            dep = f"deps=c{c:02d}l{i - 1} " if i else ""
            lines.append(f"- [ ] id={sid} lane=1 {dep}payload=@cmd:sleep 0.05 && "
                         f"echo {sid} >> {lines_file}")
    for i in range(100):  # independent jobs: batches
        sid = f"i{i:03d}"
        ids.append(sid)
        lines.append(f"- [ ] id={sid} lane=1 payload=@cmd:sleep 0.05 && echo {sid} >> "
                     f"{lines_file}")
    fan = [f"f{i:02d}" for i in range(60)]  # a fan-out: its middle batches, gated
    for sid, dep in (("froot", ""), *((f, "deps=froot ") for f in fan),
                     ("fsink", f"deps={','.join(fan)} ")):
        ids.append(sid)
        lines.append(f"- [ ] id={sid} lane=1 {dep}payload=@cmd:sleep 0.05 && "
                     f"echo {sid} >> {lines_file}")
    plan = write_plan(tmp_path / "plan", "fusedloss", lines)
    assert explain(plan)["optimize"]["tasks"] < 60
    with ProcessCluster(tmp_path / "cluster") as cluster:
        for name in ("w1", "w2", "w3"):
            cluster.add_worker(name, nanny=False, env=NO_SANDBOX)
        cluster.wait_for("w1", "w2", "w3")
        result, killed = run_killing_a_worker(cluster, plan, lines_file, after=60)
    frame = result.frame
    assert result.ok and (frame.status == "done").all(), frame[frame.status != "done"]
    assert len(frame) == 362
    written = lines_file.read_text().split()
    assert sorted(written) == sorted(ids), sorted(w for w in set(written)
                                                  if written.count(w) > 1)
    assert killed["address"] in result.summary["workers_lost"]
    # Jobs recorded on the dead worker before it died were replayed, not run again.
    on_dead = frame[frame.worker == killed["address"]]
    assert len(on_dead) >= 1
    assert on_dead.replayed.fillna(False).astype(bool).all(), on_dead


def test_a_job_gets_its_own_dependencies_records_out_of_its_tasks_results():
    """A batch's result holds its other jobs' records; a chain's is its last link's;
    a user's future (an input record) passes as it is."""
    from obdask.execute import UnitRecord, _own_records

    plan = _plan(["- [ ] id=a lane=1 payload=@cmd:true",
                  "- [ ] id=b lane=1 payload=@cmd:true",
                  "- [ ] id=c lane=1 deps=a payload=@cmd:true",
                  "- [ ] id=d lane=1 deps=c payload=@cmd:true",
                  "- [ ] id=s lane=1 deps=b,d payload=@cmd:true"])
    spec = {j.spec.step_id: j.spec for j in compile_plan(plan).jobs}["s"]
    batch = UnitRecord({"key": "opt::a", "step": "a"}, [{"key": "opt::b", "step": "b"}])
    chain = UnitRecord({"key": "opt::d", "step": "d"}, [{"key": "opt::c", "step": "c"}])
    user = {"step": "input:x-1", "key": "x-1", "input": 42}
    own = _own_records(spec, (batch, chain, user))
    assert [r["step"] for r in own] == ["b", "d", "input:x-1"]
    plain = ({"key": "opt::b", "step": "b"}, user)
    assert _own_records(spec, plain) is plain
