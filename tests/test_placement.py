"""Placement: step resources, lanes, placeability checks and locality."""

from __future__ import annotations

import asyncio
import os
import subprocess
from dataclasses import dataclass, field

import dask
import pytest
from distributed import Worker
from distributed.utils_test import gen_cluster

from obdask.exceptions import PlacementError
from obdask.placement import (
    check_placeable,
    ensure_placeable,
    git_toplevel,
    lanes_in_use,
    locality_keys,
    locality_of,
    model_key,
    model_name,
    step_resources,
    wait_for_placeable,
    worker_lanes,
)
from obdask.resources import lane_resources

GB = 1e9
GiB = 2**30


@dataclass
class FakeStep:
    id: str
    lane: int = 1
    payload: str = "@cmd:true"
    deps: tuple[str, ...] = ()
    resources: dict[str, float] = field(default_factory=dict)
    model: str | None = None
    locality: str | None = None
    line: int = 1

    @property
    def is_model_task(self) -> bool:
        return self.payload.startswith("@file:") and "#" not in self.payload


def _workers(*resource_dicts):
    return {f"tcp://10.0.0.{i}:1": {"resources": r} for i, r in enumerate(resource_dicts)}


# ------------------------------------------------------------ step_resources


def test_plain_step_on_plain_cluster_needs_nothing():
    assert step_resources(FakeStep("a", lane=3), lanes_active=False) == {}


def test_model_task_defaults_to_coder_role():
    res = step_resources(FakeStep("a", payload="@file:spec.md"), lanes_active=False)
    assert res == {"GPU": 1.0, "VRAM": 10e9}
    assert model_name(FakeStep("a", payload="@file:spec.md")) == "qwen2.5-coder:14b"


def test_role_needs_and_explicit_override():
    step = FakeStep("v", payload="@file:img.md", model="vision", resources={"VRAM": 20 * GB})
    assert step_resources(step, lanes_active=False) == {"GPU": 1.0, "VRAM": 20 * GB}
    light = FakeStep("r", payload="@file:q.md", model="researcher")
    assert step_resources(light, lanes_active=False) == {}
    cpu_only = FakeStep("c", payload="@file:q.md", resources={"GPU": 0, "MEM": 2 * GB})
    assert step_resources(cpu_only, lanes_active=False) == {"VRAM": 10e9, "MEM": 2 * GB}


def test_explicit_resources_on_cmd_step_and_lane():
    step = FakeStep("b", lane=2, resources={"CPU": 4})
    assert step_resources(step, lanes_active=True) == {"CPU": 4.0, "lane-2": 1.0}
    assert step_resources(FakeStep("z", lane=0), lanes_active=True) == {}


def test_unknown_role_names_step_and_known_roles():
    step = FakeStep("x", payload="@file:a.md", model="poet", line=7)
    with pytest.raises(PlacementError, match=r"'x' \(line 7\).*'poet'.*coder.*vision"):
        step_resources(step, lanes_active=False)


def test_role_config_override():
    roles = {"tiny": {"model": "smollm", "vram": "1GB", "gpu": 0}}
    with dask.config.set(
        {"obdask.placement.models": roles, "obdask.placement.default-role": "tiny"}
    ):
        assert step_resources(FakeStep("a", payload="@file:x"), False) == {"VRAM": 1e9}


def test_real_plan_steps():
    plan_mod = pytest.importorskip("obdask.plan")
    plan = plan_mod.Plan.from_text(
        "# Plan: t\n"
        "- [ ] id=a lane=1 payload=@git:https://example.org/r.git@abc\n"
        "- [ ] id=b lane=2 deps=a payload=@file:spec.md\n"
    )
    a, b = plan.steps
    assert step_resources(a, lanes_active=True) == {"lane-1": 1.0}
    assert step_resources(b, lanes_active=False) == {"GPU": 1.0, "VRAM": 10e9}
    steps = {s.id: s for s in plan.steps}
    assert locality_of(b, steps) == "git:https://example.org/r.git@abc"


# --------------------------------------------------------------------- lanes


def test_lanes_in_use():
    full = lane_resources()
    assert not lanes_in_use({})
    assert not lanes_in_use(_workers({"CPU": 2}, {"CPU": 2}))
    assert not lanes_in_use(_workers(full, {**full, "GPU": 1}))
    assert lanes_in_use(_workers(full, {"lane-2": 1e6}))
    assert worker_lanes({"lane-2": 1e6, "lane-x": 1, "lane-3": 0, "GPU": 1}) == {2}


# ----------------------------------------------------------- check_placeable


def test_check_placeable_ok_and_empty():
    workers = _workers({"GPU": 1, "VRAM": 24 * GB}, {"CPU": 8})
    check_placeable([("p::a", 1, {}), ("p::b", 2, {"GPU": 1, "VRAM": 16 * GB})], workers)
    check_placeable([("p::a", 1, {})], {})


def test_check_placeable_names_first_missing_resource():
    workers = _workers({"GPU": 1, "VRAM": 10 * GiB}, {"GPU": 2, "VRAM": 12 * GiB})
    jobs = [
        ("p::ok", 1, {"GPU": 1}),
        ("p::vision", 4, {"GPU": 1, "VRAM": 16 * GiB}),
        ("p::later", 5, {"TPU": 1}),
    ]
    with pytest.raises(PlacementError) as info:
        check_placeable(jobs, workers)
    msg = str(info.value)
    assert "p::vision" in msg and "line 4" in msg
    assert "VRAM=16.00 GiB" in msg and "12.00 GiB" in msg and "tcp://10.0.0.1:1" in msg


def test_check_placeable_absent_resource_and_combination():
    with pytest.raises(PlacementError, match="no worker offers TPU"):
        check_placeable([("p::t", "t", {"TPU": 1})], _workers({"GPU": 1}))
    split = _workers({"GPU": 1}, {"VRAM": 24 * GB})
    with pytest.raises(PlacementError, match="no single worker offers all"):
        check_placeable([("p::x", 3, {"GPU": 1, "VRAM": GB})], split)
    with pytest.raises(PlacementError, match="no workers"):
        check_placeable([("p::x", 3, {"GPU": 1})], {})


def test_check_placeable_lane_hint():
    workers = _workers({"lane-2": 1e6})
    with pytest.raises(PlacementError, match="lane-5.*--lanes"):
        check_placeable([("p::x", 3, {"lane-5": 1})], workers)


def test_check_placeable_is_cheap_for_many_jobs():
    workers = _workers(*({"GPU": 1, "lane-1": 1e6} for _ in range(50)))
    jobs = [(f"p::{i}", i, {"GPU": 1, "lane-1": 1}) for i in range(20000)]
    check_placeable(jobs, workers)


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], worker_kwargs={"resources": {"GPU": 1}})
async def test_wait_for_placeable_until_worker_joins(c, s, a):
    jobs = [("p::big", 3, {"GPU": 2})]
    with pytest.raises(PlacementError, match="GPU=2"):
        await wait_for_placeable(c, jobs, timeout=0)
    with pytest.raises(PlacementError, match="waited 0.3s"):
        await wait_for_placeable(c, jobs, timeout=0.3, interval=0.05)

    async def join_later():
        await asyncio.sleep(0.3)
        return await Worker(s.address, nthreads=1, resources={"GPU": 2})

    task = asyncio.create_task(join_later())
    await wait_for_placeable(c, jobs, timeout="10s", interval=0.05)
    w = await task
    with dask.config.set({"obdask.run.wait-for-resources": "5s"}):
        await ensure_placeable(c, jobs)
    await w.close()


# ------------------------------------------------------------------ locality


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    (root / "specs").mkdir(parents=True)
    (root / "specs" / "f.md").write_text("spec\n")
    try:
        subprocess.run(["git", "init", "-q", str(root)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        (root / ".git").mkdir()
    git_toplevel.cache_clear()
    return root


def test_locality_explicit_and_git_dependency():
    src = FakeStep("src", payload="@git:https://example.org/r.git@v1")
    work = FakeStep("work", deps=("other", "src"))
    other = FakeStep("other", payload="@cmd:echo hi")
    steps = {s.id: s for s in (src, work, other)}
    assert locality_of(work, steps) == "git:https://example.org/r.git@v1"
    pinned = FakeStep("pinned", deps=("src",), locality="git:https://x/y@v2")
    assert locality_of(pinned, steps) == "git:https://x/y@v2"
    assert locality_of(other, steps) is None


def test_locality_file_inside_git_repo(repo, tmp_path):
    step = FakeStep("s", payload="@file:specs/f.md#apply")
    assert locality_of(step, {}, base=repo) == f"git:{repo}"
    absolute = FakeStep("t", payload=f"@file:{repo / 'specs' / 'f.md'}")
    assert locality_of(absolute, {}) == f"git:{repo}"
    via_dep = FakeStep("u", deps=("t",))
    assert locality_of(via_dep, {"t": absolute}) == f"git:{repo}"
    # The runner's default (obdask.placement.file-locality: false) ignores @file: repos.
    assert locality_of(step, {}, base=repo, files=False) is None
    assert locality_keys(step, {}, base=repo, files=False) == []
    outside = tmp_path / "plain"
    outside.mkdir()
    (outside / "x.md").write_text("x")
    if git_toplevel(str(tmp_path)) is None:  # tmp is not inside some repo
        assert locality_of(FakeStep("o", payload="@file:x.md"), {}, base=outside) is None


def test_locality_keys_and_model_key(repo):
    step = FakeStep("s", payload="@file:specs/f.md", model="researcher")
    keys = locality_keys(step, {}, base=os.fspath(repo))
    assert keys == [f"git:{repo}", "model:llama3.2:3b"]
    assert model_key("llama3.2") == "model:llama3.2:latest"
    assert model_key("registry.io:5000/ns/m") == "model:registry.io:5000/ns/m:latest"
    assert model_key("m:7b") == "model:m:7b"
