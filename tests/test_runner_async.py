"""obdask.run with an asynchronous client (gen_cluster: in-process scheduler and worker)."""

from __future__ import annotations

from distributed.utils_test import gen_cluster

import obdask
from obdask.plan import Plan


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_async_client_is_supported(c, s, a, tmp_path_factory=None):
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    (folder / "plan.md").write_text("- [ ] id=a lane=1 payload=@cmd:echo async > a.txt\n"
                                    "- [ ] id=b lane=1 deps=a payload=@cmd:false\n")
    result = await obdask.run(Plan.from_file(folder / "plan.md"), c)
    assert {r["id"]: r["status"] for r in result.records} == {"a": "done", "b": "failed"}
    assert not result.ok
    assert (folder / "a.txt").read_text() == "async\n"
    assert "obdask" in s.plugins  # the scheduler plugin was installed through the client


@gen_cluster(client=True, nthreads=[])
async def test_cluster_without_workers_fails_fast(c, s):
    import tempfile
    from pathlib import Path

    from obdask.exceptions import PlacementError

    folder = Path(tempfile.mkdtemp())
    (folder / "plan.md").write_text("- [ ] id=a lane=1 payload=@cmd:true\n")
    try:
        await obdask.run(Plan.from_file(folder / "plan.md"), c)
    except PlacementError as exc:
        assert "has no workers" in str(exc)
    else:
        raise AssertionError("a cluster without workers must fail fast")


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_a_run_is_one_dask_span(c, s, a):
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    (folder / "plan.md").write_text("plan_id=spanned\n"
                                    "- [ ] id=a lane=1 payload=@cmd:true\n"
                                    "- [ ] id=b lane=1 deps=a payload=@cmd:true\n"
                                    "- [ ] id=c lane=1 payload=@doc:metadata only\n")
    result = await obdask.run(Plan.from_file(folder / "plan.md"), c)
    assert result.ok
    span_id = result.summary["span"]
    spans = s.extensions["spans"]
    assert span_id in spans.spans
    span = spans.spans[span_id]
    assert span.name == ("obdask", "spanned")
    groups = {tg.name for sp in span.traverse_spans() for tg in sp.groups}
    assert groups == {"spanned"}  # one task group per plan (obdask.keys)
    sizes = [sum(tg.states.values()) for sp in span.traverse_spans() for tg in sp.groups]
    assert sizes == [1]  # a and b fused into one task (obdask.optimize); @doc costs none
    assert [r["status"] for r in result.records] == ["done", "done", "done-at-compile"]
    assert span in spans.spans_search_by_name["obdask", "spanned"]
