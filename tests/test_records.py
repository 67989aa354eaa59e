"""Run records on fsspec: atomic writes, damaged records skipped with a warning."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from obdask.records import RunStore, read_run

PLAN = "- [ ] id=a lane=1 payload=@cmd:true\n- [ ] id=b lane=1 payload=@cmd:true\n"


def _record(step: str, status: str = "done", run_id: str = "r1") -> dict:
    return {"key": f"p::{step}", "step": step, "plan": "p", "run_id": run_id,
            "status": status}


def _truncate_last_line(path, keep: int = 40) -> None:
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:keep])


def test_truncated_records_line_is_warned_and_skipped(tmp_path, caplog):
    store = RunStore(str(tmp_path), "p", "r1")
    store.write_records([_record("a"), _record("b")], {"ok": True})
    path = tmp_path / "p" / "r1" / "records.jsonl"
    _truncate_last_line(path)
    with caplog.at_level(logging.WARNING, logger="obdask.records"):
        records = read_run(str(tmp_path), "p", "r1")
    assert {r["step"]: r["status"] for r in records} == {"a": "done", "b": "damaged"}
    assert f"{path}:2" in caplog.text and "damaged" in caplog.text


def test_truncated_ledger_file_is_warned_and_not_done(tmp_path, caplog):
    store = RunStore(str(tmp_path), "p", "r1")
    store.ledger_put("a", _record("a"))
    store.ledger_put("b", _record("b"))
    path = tmp_path / "p" / "r1" / "jobs" / "b.json"
    path.write_text(path.read_text()[:20])
    with caplog.at_level(logging.WARNING, logger="obdask.records"):
        assert store.ledger_get("b") is None  # the worker runs the job again
        assert store.ledger_get("a")["status"] == "done"
        later = RunStore(str(tmp_path), "p", "r2")
        assert set(later.completed_before(["a", "b"])) == {"a"}
    assert f"{path}:1" in caplog.text


def test_resume_treats_a_damaged_record_as_not_done(tmp_path):
    old = RunStore(str(tmp_path), "p", "r1")
    old.write_records([_record("a"), _record("b")], {"ok": True})
    new = RunStore(str(tmp_path), "p", "r2")
    new.write_records([_record("a", run_id="r2"), _record("b", run_id="r2")], {"ok": True})
    _truncate_last_line(tmp_path / "p" / "r2" / "records.jsonl")
    # b's newest record is damaged: its status is unknown, so b is not done (an
    # older complete record does not stand in for it)
    assert set(RunStore(str(tmp_path), "p", "r3").completed_before(["a", "b"])) == {"a"}


def test_damaged_line_with_an_intact_ledger_uses_the_ledger(tmp_path):
    store = RunStore(str(tmp_path), "p", "r1")
    store.ledger_put("b", _record("b"))
    store.write_records([_record("a"), _record("b")], {"ok": True})
    _truncate_last_line(tmp_path / "p" / "r1" / "records.jsonl")
    records = read_run(str(tmp_path), "p", "r1")
    assert {r["step"]: r["status"] for r in records} == {"a": "done", "b": "done"}


def test_unit_ledger_is_read_back_by_a_rerun_and_by_the_run_store(tmp_path):
    """A fused or batched task's jobs share one append-only ledger file."""
    store = RunStore(str(tmp_path), "p", "r1")
    with store.unit_ledger("a") as ledger:
        ledger.put("a", _record("a"))
        ledger.put("b", _record("b"))
    again = store.unit_ledger("a")  # the task re-run after its worker died
    assert again.get("a")["status"] == again.get("b")["status"] == "done"
    assert again.get("c") is None
    assert store.ledger_get("b")["step"] == "b"  # the client's view (worker loss, lost scheduler)
    assert store.ledger_get("b", units=False) is None  # a one-job task looks at its own file
    assert {r["step"] for r in read_run(str(tmp_path), "p", "r1")} == {"a", "b"}
    assert set(RunStore(str(tmp_path), "p", "r2").completed_before()) == {"a", "b"}


def test_unit_ledger_line_cut_by_a_crash_is_not_done_and_not_glued(tmp_path, caplog):
    store = RunStore(str(tmp_path), "p", "r1")
    with store.unit_ledger("a") as ledger:
        ledger.put("a", _record("a"))
        ledger.put("b", _record("b"))
    path = next((tmp_path / "p" / "r1" / "jobs").glob("*.unit.jsonl"))
    path.write_bytes(path.read_bytes()[:-20])  # the worker died while writing b's line
    assert {r["step"] for r in read_run(str(tmp_path), "p", "r1")} == {"a"}
    with caplog.at_level(logging.WARNING, logger="obdask.records"):
        rerun = store.unit_ledger("a")
    assert rerun.get("a") is not None and rerun.get("b") is None  # b runs again
    assert f"{path}:2" in caplog.text
    with rerun:
        rerun.put("b", _record("b"))
    assert store.unit_ledger("a").get("b")["status"] == "done"
    assert {r["step"]: r["status"] for r in read_run(str(tmp_path), "p", "r1")} == {
        "a": "done", "b": "done"}


def test_object_stores_keep_one_ledger_file_per_job(s3_bucket):
    bucket, _ = s3_bucket
    assert RunStore(f"s3://{bucket}/runs", "p", "r1").unit_ledger("a") is None


def test_damaged_summary_is_incomplete_not_fatal(tmp_path, caplog):
    from obdask.records import run_summaries

    RunStore(str(tmp_path), "p", "r1").write_records([_record("a")], {"run_id": "r1", "ok": True})
    (tmp_path / "p" / "r1" / "summary.json").write_text('{"run_id": "r1", "o')
    with caplog.at_level(logging.WARNING, logger="obdask.records"):
        summaries = run_summaries(str(tmp_path), "p")
    assert summaries == [{"run_id": "r1", "plan": "p", "ok": None, "counts": {}}]
    assert "summary.json" in caplog.text


def _write_over_the_size_limit(code: str, tmp_path) -> subprocess.CompletedProcess:
    """Run ``code`` in a child whose files may not grow past 4 KiB (RLIMIT_FSIZE)."""
    prelude = textwrap.dedent("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "STORE": str(tmp_path / "store")})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE semantics")
def test_records_write_is_atomic_on_local_disk(tmp_path):
    store = RunStore(str(tmp_path / "store"), "p", "r1")
    store.write_records([_record("a")], {"ok": True})
    path = tmp_path / "store" / "p" / "r1" / "records.jsonl"
    before = path.read_text()
    child = _write_over_the_size_limit("""
        import os
        from obdask.records import RunStore
        store = RunStore(os.environ["STORE"], "p", "r1")
        big = [{"step": f"s{i}", "status": "done", "pad": "x" * 100} for i in range(100)]
        try:
            store.write_records(big, {"ok": True})
        except OSError:
            sys.exit(3)
    """, tmp_path)
    assert child.returncode == 3, child.stderr
    assert path.read_text() == before  # the old records are whole, not cut off
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE semantics")
def test_a_failed_artifact_write_leaves_no_partial_artifact(tmp_path):
    child = _write_over_the_size_limit("""
        import os
        from obdask.artifacts import ArtifactStore, sha1_bytes
        data = b"y" * 10000
        store = ArtifactStore(os.environ["STORE"])
        try:
            store.put(data)
        except OSError:
            print(sha1_bytes(data))
            sys.exit(3)
    """, tmp_path)
    assert child.returncode == 3, child.stderr
    from obdask.artifacts import ArtifactStore

    store = ArtifactStore(str(tmp_path / "store"))
    # a partial file under the hash would count as present forever (put skips it)
    assert not store.exists(child.stdout.strip())


def test_obdask_show_and_resume_survive_damaged_records(tmp_path):
    (tmp_path / "plan.md").write_text(PLAN)
    root = tmp_path / ".obdask" / "records"
    store = RunStore(str(root), "plan", "20260101T000000000000-abcdef")
    store.write_records([_record("a"), _record("b")], {"run_id": store.run_id, "ok": True})
    _truncate_last_line(root / "plan" / store.run_id / "records.jsonl")
    result = subprocess.run([sys.executable, "-m", "obdask.cli", "show", "plan.md", "--json"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "records.jsonl:2" in result.stderr
    assert {r["step"]: r["status"] for r in json.loads(result.stdout)} == \
        {"a": "done", "b": "damaged"}


def test_obdask_run_resume_reruns_a_job_whose_records_are_damaged(tmp_path):
    (tmp_path / "plan.md").write_text("- [ ] id=a lane=1 payload=@cmd:echo a >> a.txt\n"
                                      "- [ ] id=b lane=1 payload=@cmd:echo b >> b.txt\n")

    def obdask(*args):
        return subprocess.run([sys.executable, "-m", "obdask.cli", *args, "--workers", "1"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=180)

    first = obdask("run", "plan.md", "--json")
    assert first.returncode == 0, first.stderr
    run_dir = next((tmp_path / ".obdask" / "records" / "plan").iterdir())
    records = run_dir / "records.jsonl"
    lines = records.read_text().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if '"step": "b"' in line)
    lines[index] = lines[index][:lines[index].index('"step": "b"') + 12]  # cut after the id
    records.write_text("".join(lines))
    ledger = run_dir / "jobs" / "b.json"
    ledger.write_text(ledger.read_text()[:30])
    again = obdask("run", "plan.md", "--resume", "--json")
    assert again.returncode == 0, again.stderr
    assert "Traceback" not in again.stderr and "damaged record skipped" in again.stderr
    status = {j["id"]: j["status"] for j in json.loads(again.stdout)["jobs"]}
    assert status == {"a": "resumed", "b": "done"}
    assert (tmp_path / "a.txt").read_text() == "a\n"
    assert (tmp_path / "b.txt").read_text() == "b\nb\n"
