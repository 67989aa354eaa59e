"""The metrics extension's job table: packed chunks from workers, bounded, read back right."""

from __future__ import annotations

import tracemalloc

import pytest

from obdask.server.jobtable import MAX_PLAN_ROWS, JobTable, pack_jobs, unpack_jobs


def record(i, plan="p", status="done", **extra):
    return {"run_id": "r1", "worker": None, "started": 1000.0 + i, "finished": 1001.0 + i,
            "duration_s": 1.0, "status": status, "exit_code": 0, "warm": None, "error": None,
            "job": f"{plan}::s{i}", "plan": plan, "step": f"s{i}", "lane": 1, "kind": "cmd",
            "model": None, **extra}


def test_packed_records_read_back_with_worker_and_attempts():
    records = [record(0), record(1, status="failed"), record(2, attempts=4)]
    table = JobTable(100)
    table.extend_packed(pack_jobs(records), "tcp://w:1", attempts={"p::s1": 3})
    got = table.read()
    assert [r["job"] for r in got] == ["p::s0", "p::s1", "p::s2"]
    assert {r["worker"] for r in got} == {"tcp://w:1"}  # the sender, as the scheduler saw it
    assert [r["attempts"] for r in got] == [1, 3, 4]  # a worker's own count wins
    assert got[1]["status"] == "failed" and got[0]["finished"] == 1001.0
    assert unpack_jobs(pack_jobs(records))[2]["attempts"] == 4


def test_intake_reads_only_the_summary():
    """Bytes that are not msgpack are taken in (totals counted) and fail only when read."""
    packed = pack_jobs([record(0), record(1, status="failed")])
    table = JobTable(100)
    table.extend_packed({**packed, "columns": {k: b"\xc1not msgpack" for k in packed["columns"]}},
                        "tcp://w:1")
    assert table.totals == {"done": 1, "failed": 1} and len(table) == 2
    assert dict(table.by_plan_lane) == {("p", 1): [1, 1, 0, 2.0]}
    with pytest.raises(ValueError):  # msgpack's FormatError
        table.read()


def test_chunks_of_other_plans_are_not_decoded():
    table = JobTable(100)
    other = pack_jobs([record(0, plan="q")])
    broken = {k: b"\xc1" for k in other["columns"]}
    table.extend_packed({**other, "columns": broken}, "tcp://w:1")  # would fail if decoded
    table.extend_packed(pack_jobs([record(1), record(2)]), "tcp://w:1")
    assert table.read(plan="p", columns=["step", "duration_s"]) == [
        {"step": "s1", "duration_s": 1.0}, {"step": "s2", "duration_s": 1.0}]


def test_only_the_columns_asked_for_are_decoded():
    packed = pack_jobs([record(0), record(1)])
    columns = dict(packed["columns"], error=b"\xc1", run_id=b"\xc1")  # would fail if decoded
    table = JobTable(100)
    table.extend_packed({**packed, "columns": columns}, "tcp://w:1")
    assert table.read(plan="p", columns=["step", "duration_s"]) == [
        {"step": "s0", "duration_s": 1.0}, {"step": "s1", "duration_s": 1.0}]
    assert table.read_columns(["step", "duration_s"], plan="p", limit=1) == {
        "step": ["s1"], "duration_s": [1.0]}


def test_read_columns_matches_read():
    table = JobTable(12)
    table.extend_packed(pack_jobs([record(i) for i in range(5)]), "tcp://w:1")
    table.append(dict(record(5, plan="q"), worker="tcp://w:2", attempts=2))
    table.extend_packed(pack_jobs([record(i) for i in range(6, 14)]), "tcp://w:1")
    cols = ["step", "worker", "attempts", "finished"]
    for kwargs in ({}, {"limit": 3}, {"plan": "p"}, {"plan": "q"}, {"since": 1010.0},
                   {"plan": "p", "limit": 7}, {"limit": 0}):
        rows = table.read(columns=cols, **kwargs)
        got = table.read_columns(cols, **kwargs)
        assert got == {c: [r[c] for r in rows] for c in cols}, kwargs
    assert table.read_columns(["step"], plan="q") == {"step": ["s5"]}
    assert len(table.read()) == 12  # the bound cut s0 and s1


def test_since_limit_plan_and_columns_across_packed_and_plain_chunks():
    table = JobTable(100)
    table.extend_packed(pack_jobs([record(i) for i in range(5)]), "tcp://w:1")
    table.append(dict(record(5, plan="q"), worker="tcp://w:2", attempts=1))
    table.extend_packed(pack_jobs([record(i) for i in range(6, 9)]), "tcp://w:1")
    assert [r["job"] for r in table.read()] == [f"{'q' if i == 5 else 'p'}::s{i}"
                                                for i in range(9)]
    assert [r["step"] for r in table.read(limit=4)] == ["s5", "s6", "s7", "s8"]
    assert [r["step"] for r in table.read(since=1004.0)] == ["s3", "s4", "s5", "s6", "s7",
                                                              "s8"]
    assert [r["step"] for r in table.read(plan="p", limit=5)] == ["s3", "s4", "s6", "s7",
                                                                   "s8"]
    assert table.read(plan="q", columns=["worker", "attempts"]) == [
        {"worker": "tcp://w:2", "attempts": 1}]
    assert table.read(plan="p", limit=1, columns=["worker", "attempts"]) == [
        {"worker": "tcp://w:1", "attempts": 1}]
    assert table.read(limit=0) == []
    assert table[-1]["step"] == "s8" and table[0]["step"] == "s0" and table[5]["plan"] == "q"
    with pytest.raises(IndexError):
        table[9]


@pytest.mark.parametrize("packed", [True, False])
def test_bound_is_exact_and_keeps_the_newest(packed):
    table = JobTable(10)
    for start in range(0, 47, 7):
        batch = [record(i) for i in range(start, start + 7)]
        if packed:
            table.extend_packed(pack_jobs(batch), "tcp://w:1")
        else:
            for r in batch:
                table.append(r)
    assert len(table) == 10
    assert [r["step"] for r in table] == [f"s{i}" for i in range(39, 49)]
    assert [r["step"] for r in table.read(limit=3)] == ["s46", "s47", "s48"]
    assert table.totals == {"done": 49}  # totals count past the bound
    table.resize(4)
    assert [r["step"] for r in table.read()] == ["s45", "s46", "s47", "s48"]


def test_memory_stays_bounded_over_200k_packed_records():
    table = JobTable(5000)
    chunk = pack_jobs([record(i) for i in range(100)])
    for _ in range(1500):  # 150k records: the table is full long before
        table.extend_packed(chunk, "tcp://w:1")
    tracemalloc.start()
    try:
        for _ in range(250):
            table.extend_packed(chunk, "tcp://w:1")
        at_175k = tracemalloc.get_traced_memory()[0]
        for _ in range(250):
            table.extend_packed(chunk, "tcp://w:1")
        at_200k = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(table) == 5000 and table.totals["done"] == 200_000
    assert at_200k - at_175k < 64_000


def test_plan_rows_are_bounded_to_the_most_recent():
    table = JobTable(10)
    for i in range(MAX_PLAN_ROWS + 5):
        table.append(record(i, plan=f"p{i}"))
    assert len(table.by_plan_lane) == MAX_PLAN_ROWS
    assert ("p0", 1) not in table.by_plan_lane
    assert (f"p{MAX_PLAN_ROWS + 4}", 1) in table.by_plan_lane
