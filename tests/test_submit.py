"""``obdask.submit``: a plan as Dask futures, composed with the user's own work."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

import obdask


def test_submit_returns_job_futures_and_the_run(tmp_path, cluster_client):
    from distributed import as_completed, wait

    marker = tmp_path / "prepared.txt"

    def prepare():  # the user's own work, which step `check` waits for
        time.sleep(1.5)
        marker.write_text("ready\n")
        return 42

    user = cluster_client.submit(prepare, pure=False)
    path = tmp_path / "p.md"
    path.write_text("- [ ] id=first lane=1 payload=@cmd:echo one\n"
                    "- [ ] id=second lane=1 deps=first payload=@cmd:true\n"
                    "- [ ] id=check lane=2 payload=@cmd:cat prepared.txt\n"
                    "- [ ] id=note lane=1 payload=@doc:no job\n")
    planned = obdask.submit(path, cluster_client, inputs={"check": user})
    assert set(planned.jobs) == {"first", "second", "check"}  # runnable jobs only
    assert isinstance(planned.run, concurrent.futures.Future)
    finished = [f.key[1] for f in as_completed(planned.futures)]
    assert sorted(finished) == ["p::check", "p::first", "p::second"]
    wait(list(planned))
    result = planned.result(timeout=60)
    assert result.ok, result.frame[["status", "error"]]
    assert result.output("check", "stdout") == "ready\n"  # it ran after the user's task
    assert {r["id"]: r["status"] for r in result.records}["note"] == "done-at-compile"
    assert cluster_client.gather(planned.jobs["first"])["status"] == "done"


def test_a_failed_input_fails_its_step_and_unknown_steps_are_refused(tmp_path,
                                                                   cluster_client):
    def broken():
        raise ValueError("no data today")

    path = tmp_path / "q.md"
    path.write_text("- [ ] id=use lane=1 payload=@cmd:true\n"
                    "- [ ] id=free lane=2 payload=@cmd:true\n")
    with pytest.raises(obdask.ObdaskError, match="no step 'nope' in plan 'q'"):
        obdask.submit(path, cluster_client, inputs={"nope": cluster_client.submit(int)})
    planned = obdask.submit(path, cluster_client,
                            inputs={"use": cluster_client.submit(broken, pure=False)})
    result = planned.result(timeout=60)
    status = {r["id"]: r for r in result.records}
    assert status["free"]["status"] == "done"
    assert status["use"]["status"] == "failed" and "no data today" in status["use"]["error"]
