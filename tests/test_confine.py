"""Path confinement at compile time: @file: paths, protocols, workspaces (issue: security)."""

from __future__ import annotations

import os
import subprocess
import sys

import dask
import pytest

from obdask.exceptions import PlanError
from obdask.plan import Plan
from obdask.runner import prepare


def _plan(tmp_path, body, workspace=None):
    (tmp_path / "spec.md").write_text("inside")
    path = tmp_path / "plan.md"
    path.write_text((f"workspace={workspace}\n" if workspace else "") + body)
    return Plan.from_file(path)


@pytest.mark.parametrize("payload", [
    "@file:../../../etc/passwd#test",
    "@file:/etc/shadow#test",
    "@file:/etc/passwd",            # a model task would send it to the endpoint
    "@file:link.md#test",           # a symlink to /etc/passwd
])
def test_files_outside_the_plan_folder_are_refused_naming_the_step(tmp_path, payload):
    (tmp_path / "link.md").symlink_to("/etc/passwd")
    plan = _plan(tmp_path, f"- [ ] id=peek lane=1 payload={payload}\n")
    with pytest.raises(PlanError, match=r"plan.md:1: step 'peek'.*outside"):
        prepare(plan)


def test_files_inside_pass_and_roots_widen_them(tmp_path):
    prepare(_plan(tmp_path, "- [ ] id=ok lane=1 payload=@file:spec.md#test\n"))
    other = tmp_path.parent / f"{tmp_path.name}-shared"
    other.mkdir()
    (other / "s.md").write_text("x")
    plan = _plan(tmp_path, f"- [ ] id=far lane=1 payload=@file:{other}/s.md#test\n")
    with pytest.raises(PlanError, match="outside"):
        prepare(plan)
    with dask.config.set({"obdask.security.roots": [str(other)]}):
        prepare(plan)


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest", "ssh://host/etc/passwd"])
def test_protocols_not_allowlisted_are_refused(tmp_path, url):
    plan = _plan(tmp_path, f"- [ ] id=fetch lane=1 payload=@file:{url}#test\n")
    with pytest.raises(PlanError, match="protocol .* is not allowed"):
        prepare(plan)


@pytest.mark.parametrize("workspace", ["/", "/etc", "/usr/lib"])
def test_system_folders_are_no_workspace(tmp_path, workspace):
    plan = _plan(tmp_path, "- [ ] id=a lane=1 payload=@cmd:true\n", workspace=workspace)
    with pytest.raises(PlanError, match="system folder"):
        prepare(plan)


def test_cli_refuses_before_running_anything(tmp_path):
    (tmp_path / "plan.md").write_text("- [ ] id=peek lane=1 payload=@file:/etc/passwd#test\n")
    done = subprocess.run([sys.executable, "-m", "obdask.cli", "run", str(tmp_path / "plan.md")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DASK_OBDASK__RUN__N_WORKERS": "1"})
    assert done.returncode == 2 and "step 'peek'" in done.stderr
    assert "Traceback" not in done.stderr and "cluster:" not in done.stderr
