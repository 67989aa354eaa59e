"""Plan-id collisions: two different plans with one plan id on one scheduler."""

from __future__ import annotations

import threading
import time

import pytest

import obdask


def _plan(folder, text):
    folder.mkdir()
    path = folder / "plan.md"  # both plans get the default id 'plan'
    path.write_text(text)
    return path


def test_a_different_plan_with_the_same_id_is_refused(tmp_path, cluster_client):
    first = _plan(tmp_path / "a", "- [ ] id=slow lane=1 payload=@cmd:sleep 4\n")
    other = _plan(tmp_path / "b", "- [ ] id=quick lane=1 payload=@cmd:true\n")
    results = {}
    runner = threading.Thread(target=lambda: results.setdefault(
        "a", obdask.run(first, cluster_client)))
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while not list((tmp_path / "a" / ".obdask" / "records").glob("plan/*/started.json")):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with pytest.raises(obdask.ObdaskError) as err:
            obdask.run(other, cluster_client)
        message = str(err.value)
        assert "plan id 'plan' is in use on this cluster" in message
        assert str(first) in message and str(other) in message and "plan_id=" in message
        # an explicit plan_id= is the user's choice: it runs beside the other one
        renamed = tmp_path / "b" / "renamed.md"
        renamed.write_text("plan_id=b-plan\n- [ ] id=quick lane=1 payload=@cmd:true\n")
        assert obdask.run(renamed, cluster_client).ok
    finally:
        runner.join(timeout=120)
    assert results["a"].ok
    # the id is free again once the first plan's run is over
    assert obdask.run(other, cluster_client).ok
