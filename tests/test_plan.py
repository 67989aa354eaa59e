"""Plan parsing and validation: every field, every error, property tests."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from obdask.exceptions import PlanError
from obdask.plan import Plan, parse_payload, slugify

SHA = "a" * 40


def parse(text: str, path: str = "plans/demo.md") -> Plan:
    return Plan.from_text(text, path=path)


def error_of(text: str, path: str = "plans/demo.md") -> str:
    with pytest.raises(PlanError) as info:
        parse(text, path)
    return str(info.value)


def test_concepts_example_parses():
    plan = parse(
        "# Plan: Read Tools\n"
        "policy: accrue_all_ideas=true, no_refactor=true\n\n"
        "- [ ] id=learn.context lane=1 payload=@cmd:git log --oneline -5\n"
        "- [ ] id=code.feature lane=2 deps=learn.context payload=@file:specs/feature.diff#apply\n"
        "- [ ] id=test.feature lane=3 deps=code.feature payload=@cmd:pytest -q\n"
    )
    assert plan.plan_id == "demo"
    assert plan.title == "Read Tools"
    assert plan.policy == {"accrue_all_ideas": True, "no_refactor": True}
    assert [s.id for s in plan.steps] == ["learn.context", "code.feature", "test.feature"]
    assert plan.steps[0].payload.prefix == "cmd"
    assert plan.steps[0].payload.body == "git log --oneline -5"
    assert plan.steps[1].payload.apply and plan.steps[1].payload.body == "specs/feature.diff"
    assert plan.steps[2].deps == ("code.feature",)
    assert plan.key("test.feature") == "demo::test.feature"


def test_plan_id_line_wins_and_slug_from_file_name():
    assert parse("plan_id=custom\n- [ ] id=a lane=1 payload=@doc:x").plan_id == "custom"
    assert parse("- [ ] id=a lane=1 payload=@doc:x", "dir/my plan+v2.md").plan_id == \
        "my_plan_v2"
    assert slugify("a b/c") == "a_b_c"


def test_policy_is_case_insensitive_and_orphans_fail():
    text = "POLICY: Accrue_All_Ideas=TRUE\n- [ ] id=a lane=1 payload=@doc:x\nTODO_ORPHAN: y\n"
    message = error_of(text)
    assert "demo.md:3" in message and "TODO_ORPHAN" in message
    # Without the policy the marker is just text.
    assert parse("- [ ] id=a lane=1 payload=@doc:x\nTODO_ORPHAN: y").steps


def test_done_steps_are_marked():
    plan = parse("- [x] id=a lane=1 payload=@cmd:true\n- [X] id=b lane=1 payload=@cmd:true\n"
                 "- [ ] id=c lane=1 deps=a,b payload=@cmd:true")
    assert [s.done for s in plan.steps] == [True, True, False]


def test_payload_text_never_changes_a_field():
    plan = parse("- [ ] id=a lane=1 payload=@cmd:echo id=x lane=9 model=vision retries=7")
    step = plan.steps[0]
    assert (step.id, step.lane, step.model, step.retries) == ("a", 1, None, None)
    assert step.payload.body == "echo id=x lane=9 model=vision retries=7"


def test_trailing_deps_and_dedupe_still_count():
    plan = parse("- [ ] id=a lane=1 payload=@doc:x\n"
                 "- [ ] id=b lane=2 payload=@cmd:make all deps=a dedupe=k1")
    step = plan.steps[1]
    assert step.deps == ("a",) and step.dedupe == "k1" and step.payload.body == "make all"


def test_extension_fields():
    plan = parse(
        f"- [ ] id=a lane=1 resources=GPU:1,VRAM:16GB retries=2 timeout=90s model=coder "
        f"locality=git:https://x/r.git@main payload=@file:spec.md#sha1={SHA}\n"
        "workspace=../ws\n"
    )
    step = plan.steps[0]
    assert step.resources == {"GPU": 1.0, "VRAM": 16e9}
    assert (step.retries, step.timeout, step.model) == (2, 90.0, "coder")
    assert step.locality == "git:https://x/r.git@main"
    assert step.payload.sha1 == SHA and step.dedupe_key == SHA
    assert step.is_model_task
    assert plan.workspace == "../ws"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- [ ] lane=1 payload=@cmd:true", "missing required field(s): id"),
        ("- [ ] id=a payload=@cmd:true", "missing required field(s): lane"),
        ("- [ ] id=a lane=1", "missing required field(s): payload"),
        ("- [ ] id=a lane=one payload=@cmd:true", "lane='one' is not an integer"),
        ("- [ ] id=a lane=1 payload=@cmd:true\n- [ ] id=a lane=1 payload=@cmd:true",
         "duplicate step id 'a' (first defined on line 1)"),
        ("- [ ] id=a lane=1 deps=bb payload=@cmd:true\n- [ ] id=b lane=1 payload=@cmd:true",
         "unknown step 'bb' (did you mean 'b'?)"),
        ("- [ ] id=a lane=1 payload=@bash:true", "invalid payload prefix '@bash:'"),
        ("- [ ] id=a lane=1 payload=cmd", "invalid payload prefix"),
        ("- [ ] id=a lane=1 lnae=2 payload=@cmd:true",
         "unknown field 'lnae' (did you mean 'lane'?)"),
        ("- [ ] id=a lane=1 retries=x payload=@cmd:true", "retries='x' is not an integer"),
        ("- [ ] id=a lane=1 timeout=soon payload=@cmd:true", "timeout='soon' is not a duration"),
        ("- [ ] id=a lane=1 resources=GPU payload=@cmd:true", "must be NAME:AMOUNT"),
        ("- [ ] id=a lane=1 payload=@file:x#sha1=zz", "#sha1= needs 40 hex digits"),
        ("- [ ] id=a lane=1 payload=@file:x#frobnicate", "unknown @file: fragment"),
        ("- [ ] id=a lane=1 payload=@cmd:", "@cmd: payload is empty"),
        ("- [ ] id=a lane=1 deps=a payload=@cmd:true", "depends on itself"),
        ("- [ ] id=a lane=1 junk payload=@cmd:true", "expected key=value, got 'junk'"),
    ],
)
def test_errors_name_file_line_and_cause(text, expected):
    message = error_of(text)
    assert message.startswith("plans/demo.md:")
    assert expected in message


def test_cycle_names_its_ids():
    message = error_of(
        "- [ ] id=x lane=1 payload=@doc:x\n"
        "- [ ] id=a lane=1 deps=c payload=@cmd:true\n"
        "- [ ] id=b lane=1 deps=a,x payload=@cmd:true\n"
        "- [ ] id=c lane=1 deps=b payload=@cmd:true\n"
    )
    assert "dependency cycle" in message
    cycle = message.split("dependency cycle: ")[1].split(" -> ")
    assert set(cycle) == {"a", "b", "c"} and cycle[0] == cycle[-1]


def test_all_errors_are_collected():
    with pytest.raises(PlanError) as info:
        parse("- [ ] id=a lane=x payload=@cmd:true\n- [ ] id=b lane=1 payload=@zz:1")
    assert len(info.value.errors) == 2
    assert "and 1 more" in str(info.value)


def test_missing_file_is_a_plan_error(tmp_path):
    with pytest.raises(PlanError, match="plan file not found"):
        Plan.from_file(tmp_path / "nope.md")


def test_parse_payload_helper():
    payload = parse_payload(f"@file:s3://b/k.diff#sha1={SHA.upper()}#apply")
    assert payload.body == "s3://b/k.diff" and payload.sha1 == SHA and payload.apply
    assert parse_payload("@gh:owner/repo#12").is_metadata
    with pytest.raises(PlanError):
        parse_payload("@file:x#apply#test")


def test_twelve_thousand_step_chain_parses():
    # Size only; the time is tracked by benchmarks/bench_run.py (compile times).
    lines = [f"- [ ] id=s{i} lane={i % 3} deps=s{i - 1} payload=@cmd:true" for i in range(1, 12000)]
    text = "- [ ] id=s0 lane=0 payload=@cmd:true\n" + "\n".join(lines)
    plan = parse(text)
    assert len(plan.steps) == 12000
    assert plan.steps[-1].deps == ("s11998",)


ids = st.text(alphabet="abcdefghijklmnop0123456789_.-", min_size=1, max_size=8).filter(
    lambda s: s.strip("."))  # "." and ".." are refused (path parts)


@st.composite
def dags(draw):
    names = draw(st.lists(ids, min_size=1, max_size=25, unique=True))
    deps = {n: draw(st.lists(st.sampled_from(names[:i]), unique=True, max_size=4))
            if i else [] for i, n in enumerate(names)}
    return names, deps


@settings(max_examples=60, deadline=None)
@given(dags())
def test_random_valid_plans_compile_to_the_declared_graph(dag):
    from obdask.compile import compile_plan

    names, deps = dag
    lines = []
    for name in reversed(names):  # order in the file does not matter
        dep = f" deps={','.join(deps[name])}" if deps[name] else ""
        lines.append(f"- [ ] id={name} lane=1{dep} payload=@cmd:echo {name} id=z")
    plan = Plan.from_text("\n".join(lines), path="p.md")
    compiled = compile_plan(plan)
    graph = {j.key: set(j.spec.deps) for j in compiled.jobs}
    assert graph == {f"p::{n}": {f"p::{d}" for d in deps[n]} for n in names}
    position = {j.key: i for i, j in enumerate(compiled.jobs)}
    assert all(position[d] < position[k] for k, ds in graph.items() for d in ds)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("- [x]id=lanepyload@cmdfile:#,\n .sha1deps")),
               max_size=200))
def test_garbage_raises_nothing_but_plan_error(text):
    try:
        Plan.from_text(text, path="g.md")
    except PlanError:
        pass


@pytest.mark.parametrize("plan_id", ["..", ".", "../x", "a/b"])
def test_plan_ids_that_would_be_paths_are_refused(plan_id):
    # The plan id names the run-record folder: ".." would write outside it.
    message = error_of(f"plan_id={plan_id}\n- [ ] id=a lane=1 payload=@doc:x\n")
    assert f"plan_id {plan_id!r} may only hold" in message


@pytest.mark.parametrize("step_id", ["..", ".", "a/b"])
def test_step_ids_that_would_be_paths_are_refused(step_id):
    message = error_of(f"- [ ] id={step_id} lane=1 payload=@doc:x\n")
    assert "demo.md:1" in message and f"step id {step_id!r} may only hold" in message


def test_dot_file_names_get_a_usable_slug():
    assert slugify("..") == "plan" and slugify(".") == "plan" and slugify("") == "plan"
    assert parse("- [ ] id=..a lane=1 payload=@doc:x").steps[0].id == "..a"


@pytest.mark.parametrize("key", ["../../x", "a/b", "..", "a\\b"])
def test_dedupe_keys_that_would_be_paths_are_refused(key):
    message = error_of(f"- [ ] id=a lane=1 payload=@cmd:true dedupe={key}\n")
    assert "demo.md:1" in message and f"dedupe={key!r} may only hold" in message


def test_ordinary_dedupe_keys_parse():
    plan = parse(f"- [ ] id=a lane=1 payload=@cmd:true dedupe=build-v1.2\n"
                 f"- [ ] id=b lane=1 payload=@cmd:true dedupe={SHA}\n")
    assert [s.dedupe_key for s in plan.steps] == ["build-v1.2", SHA]


@pytest.mark.parametrize("line", [
    "- [] id=a lane=1 payload=@cmd:true",
    "-[ ] id=a lane=1 payload=@cmd:true",
    "- [ ]id=a lane=1 payload=@cmd:true",
    "1. [ ] id=a lane=1 payload=@cmd:true",
    "id=a lane=1 payload=@cmd:true",
])
def test_near_miss_step_lines_are_errors_not_silently_dropped(line):
    message = error_of(f"- [ ] id=ok lane=1 payload=@doc:x\n{line}\n")
    assert "demo.md:2" in message and "is not a step line" in message


def test_step_fields_inside_code_fences_are_examples():
    plan = parse("```\nid=x lane=1 payload=@cmd:true\n```\n- [ ] id=a lane=1 payload=@doc:x\n")
    assert [s.id for s in plan.steps] == ["a"]


@pytest.mark.parametrize("text", ["", "# Plan: nothing yet\n\nsome notes\n"])
def test_a_plan_without_steps_is_an_error(text):
    assert "no steps found" in error_of(text)
