"""``obdask validate``: everything ``run`` would refuse without a cluster, in one pass."""

from __future__ import annotations

import dask
import pytest

from obdask.exceptions import PlanError
from obdask.payloads.launch import MAX_COMMAND_BYTES

BAD = (
    "# Plan: refusals\n"                                              # 1
    "- [ ] id=rm lane=1 payload=@cmd:rm -rf build\n"                   # 2
    "- [ ] id=sub lane=1 payload=@cmd:echo $(git rev-parse HEAD)\n"    # 3
    "- [ ] id=lanex lane=x payload=@cmd:true\n"                        # 4
    "- [ ] id=c1 lane=1 deps=c2 payload=@cmd:true\n"                   # 5
    "- [ ] id=c2 lane=1 deps=c1 payload=@cmd:true\n"                   # 6
    f"- [ ] id=long lane=1 payload=@cmd:echo {'x' * MAX_COMMAND_BYTES}\n"  # 7
    "- [ ] id=role lane=1 model=nosuchrole payload=@file:spec.md\n"    # 8
    "- [x] id=done lane=1 payload=@cmd:rm -rf old\n"                   # 9: never runs
    "- [ ] id=ok lane=1 payload=@cmd:make -j4 && pytest -q\n"          # 10
)


def _problems(tmp_path, text):
    from obdask.validate import validate_file

    path = tmp_path / "bad.md"
    path.write_text(text)
    return validate_file(path)


def test_every_refusal_is_reported_with_file_and_line_in_one_pass(tmp_path):
    plan, problems = _problems(tmp_path, BAD)
    where = str(tmp_path / "bad.md")
    expected = [
        (2, "step 'rm': @cmd: 'rm' is not on the allowlist"),
        (3, "step 'sub': @cmd: command substitution $(...) is refused"),
        (4, "lane='x' is not an integer"),
        (5, "dependency cycle: c1 -> c2 -> c1"),
        (7, "step 'long': @cmd: the command is too long"),
        (8, "step 'role': unknown model role 'nosuchrole'"),
    ]
    assert len(problems) == len(expected), problems
    for (line, text), problem in zip(expected, problems, strict=True):
        assert problem.startswith(f"{where}:{line}: ") and text in problem, problem
    assert plan is None


def test_substitution_allowed_by_config_is_not_reported(tmp_path):
    with dask.config.set({"obdask.cmd.allow-substitution": True}):
        _, problems = _problems(tmp_path, "- [ ] id=a lane=1 payload=@cmd:echo $(git log)\n")
    assert problems == []


def test_bad_config_is_reported_with_the_plan(tmp_path):
    with dask.config.set({"obdask.run.retries": "x"}):
        _, problems = _problems(tmp_path, "- [ ] id=a lane=1 payload=@cmd:rm x\n")
    assert any("obdask.run.retries: 'x' is not a whole number" in p for p in problems)
    assert any(":1: step 'a': @cmd: 'rm' is not on the allowlist" in p for p in problems)


def test_a_valid_plan_has_no_problems(tmp_path):
    plan, problems = _problems(tmp_path, "- [ ] id=a lane=1 payload=@cmd:make\n"
                                         "- [ ] id=b lane=1 model=coder payload=@file:s.md\n")
    assert problems == [] and [s.id for s in plan.steps] == ["a", "b"]


def test_unreadable_plan_file_is_one_problem(tmp_path):
    from obdask.validate import validate_file

    plan, problems = validate_file(tmp_path / "missing.md")
    assert plan is None and problems == [f"{tmp_path / 'missing.md'}: plan file not found"]


def test_plan_from_file_still_raises_for_plan_errors_only(tmp_path):
    from obdask.plan import Plan

    path = tmp_path / "p.md"
    path.write_text("- [ ] id=a lane=1 payload=@cmd:rm x\n")
    assert Plan.from_file(path).steps[0].id == "a"  # refusals are run's (and validate's) job
    path.write_text("- [ ] id=a lane=x payload=@cmd:rm x\n")
    with pytest.raises(PlanError):
        Plan.from_file(path)


def test_a_model_task_needs_the_default_role_to_exist(tmp_path):
    with dask.config.set({"obdask.placement.default-role": "ghost"}):
        _, problems = _problems(tmp_path, "- [ ] id=a lane=1 payload=@file:spec.md\n")
    assert len(problems) == 1
    assert ":1: step 'a': unknown model role 'ghost' (obdask.placement.default-role)" in \
        problems[0]
