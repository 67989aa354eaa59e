"""Parquet snapshots of the metrics tables (issue 12, item 4): history survives a restart.

A real Scheduler writes through fsspec to a local folder and to a real S3 API
(moto on loopback); a second Scheduler started against the same store loads it.
"""

from __future__ import annotations

import asyncio
import time

import dask
import pytest

pytest.importorskip("pyarrow")


def records(ext, n=3):
    push = ext.stream_handlers["obdask_metrics_record"]
    for i in range(n):
        push(worker="tcp://127.0.0.1:1", kind="tokens", record={
            "model": "m1", "endpoint": "http://h:11434", "prompt_eval_count": 10 + i,
            "eval_count": 5, "total_duration": 1_000_000_000, "ts": 1000.0 + i,
            "session": "s1" if i else None, "respent": i == 2})
        push(worker="tcp://127.0.0.1:1", kind="job", record={
            "job": f"p::s{i}", "plan": "p", "status": "failed" if i == 1 else "done",
            "exit_code": 1 if i == 1 else 0, "lane": 1, "duration_s": 0.5,
            "finished": 2000.0 + i, "gpus": [{"index": 0}] if i == 0 else "none"})


async def lifetime(url, feed):
    """One scheduler's life: feed it (or not), let a snapshot happen, close; its tables."""
    from distributed import Scheduler

    from obdask.server import ObdaskPlugin, extension

    with dask.config.set({"obdask.metrics.snapshot-url": url,
                          "obdask.metrics.snapshot-interval": "100ms"}):
        async with Scheduler(dashboard_address=":0", port=0) as s:
            await s.register_scheduler_plugin(ObdaskPlugin(), idempotent=True)
            ext = extension(s, "metrics")
            if feed:
                records(ext)
                deadline = time.monotonic() + 10
                while not _written(url):
                    assert time.monotonic() < deadline, "no snapshot written"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)  # a snapshot after the records, not a partial one
            return (list(ext.jobs), list(ext.tokens), dict(ext.job_totals),
                    {k: dict(v) for k, v in ext.token_totals.items()})


def _written(url):
    from obdask.server.snapshots import read_tables

    try:
        return len(read_tables(url)["jobs"]) == 3
    except Exception:
        return False


def check_restart(url):
    before = asyncio.run(lifetime(url, feed=True))
    after = asyncio.run(lifetime(url, feed=False))  # a new scheduler, nothing fed
    jobs, tokens, job_totals, token_totals = after
    assert job_totals == {"done": 2, "failed": 1} == before[2]
    assert token_totals == before[3]
    assert token_totals[("m1", "http://h:11434")]["input"] == 33
    assert [j["job"] for j in jobs] == ["p::s0", "p::s1", "p::s2"]
    assert jobs[0]["gpus"] == [{"index": 0}] and jobs[1]["gpus"] == "none"  # mixed column
    assert tokens[2]["respent"] is True and "session" not in tokens[0]
    def present(rows):
        return [{k: v for k, v in r.items() if v is not None} for r in rows]

    assert jobs == present(before[0]) and tokens == present(before[1])  # types kept


def test_history_survives_a_restart_local(tmp_path):
    check_restart(str(tmp_path / "metrics"))


@pytest.mark.slow
def test_history_survives_a_restart_s3(s3_bucket):
    name, _ = s3_bucket
    check_restart(f"s3://{name}/metrics")
