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
