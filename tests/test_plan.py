"""Plan parsing and validation: every field, every error, property tests."""

from __future__ import annotations

import os
import subprocess
import sys

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




def test_step_fingerprints_stay_what_earlier_versions_recorded():
    # --resume trusts a record only when its fingerprint matches the step's: a change
    # in how fingerprints are computed would re-run every step of a resumed plan.
    from obdask.compile import fingerprint

    plan = Plan.from_text(
        "- [ ] id=a lane=1 payload=@cmd:make all\n"
        "- [ ] id=b lane=2 deps=a resources=VRAM:16GB,GPU:1 retries=1 payload=@cmd:pytest -q\n"
        "- [ ] id=c lane=1 deps=b,a network=true payload=@cmd:curl -s https://example.org\n"
        "- [ ] id=d lane=3 deps=a dedupe=k1 model=llama3 payload=@file:specs/x.md\n",
        path="fp.md")
    assert {s.id: fingerprint(s) for s in plan.steps} == {
        "a": "111dfb494a9a90f5", "b": "1cd0d4d41ef75d72", "c": "40ab3c0dd93fa55e",
        "d": "8da8040e104b9df8"}  # computed by 43875ba (json.dumps per step)
@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("- [x]id=lanepyload@cmdfile:#,\n .sha1deps"
                                             "retimouscg0129_eE+`~\ufeff\u0661\uff11")),
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


# ----------------------------------------------------------- special files and sizes

def _from_file_in_child(path) -> str:
    """``Plan.from_file(path)`` in a child with 1 GiB of address space and a timeout.

    Today's code reads ``/dev/zero`` until memory runs out and blocks forever on
    a FIFO: a child keeps that from taking the test run (or the machine) down.
    """
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))\n"
            "from obdask.plan import Plan\n"
            "from obdask.exceptions import PlanError\n"
            "try:\n    Plan.from_file(sys.argv[1])\n"
            "except PlanError as exc:\n    print(exc)\n")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                              text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"Plan.from_file({path}) hangs")
    return done.stdout + done.stderr[-300:]


@pytest.mark.parametrize("special", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_device_files_are_refused_at_once(special):
    if not os.path.exists(special):
        pytest.skip(f"no {special}")
    assert f"{special}: not a regular file (a character device)" in _from_file_in_child(special)


def test_a_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "plan.md"
    os.mkfifo(fifo)
    assert f"{fifo}: not a regular file (a FIFO)" in _from_file_in_child(fifo)


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(PlanError, match="not a regular file \\(a directory\\)"):
        Plan.from_file(tmp_path)


def test_plan_size_is_capped_by_config(tmp_path):
    import dask

    path = tmp_path / "big.md"
    path.write_text("- [ ] id=a lane=1 payload=@doc:x\n" + "x" * 2000 + "\n")
    with dask.config.set({"obdask.plan.max-bytes": "1kB"}):
        with pytest.raises(PlanError, match=r"big.md: plan file is 2\d{3} bytes, more than "
                                            r"obdask.plan.max-bytes \(1000\)"):
            Plan.from_file(path)
    assert Plan.from_file(path).steps  # the default cap is far larger


def test_plan_max_bytes_default_is_in_the_defaults_file():
    from obdask import config

    assert config.get_bytes("plan.max-bytes") >= 16 * 2**20


@pytest.mark.parametrize("length, ok", [(128, True), (129, False), (300, False)])
def test_step_id_length_is_limited(length, ok):
    text = f"- [ ] id={'s' * length} lane=1 payload=@doc:x\n"
    if ok:
        assert parse(text).steps[0].id == "s" * length
    else:
        message = error_of(text)
        assert "demo.md:1" in message and f"is {length} characters long; at most 128" in message


def test_plan_id_length_is_limited():
    message = error_of(f"plan_id={'p' * 200}\n- [ ] id=a lane=1 payload=@doc:x\n")
    assert "plan_id" in message and "is 200 characters long; at most 128" in message
    # a long file name gives a long derived plan id: the message says how to fix it
    message = error_of("- [ ] id=a lane=1 payload=@doc:x\n", path=f"{'n' * 200}.md")
    assert "add a shorter plan_id= line" in message


def test_non_ascii_ids_are_limited_in_bytes():
    # ids name files: 128 bytes of UTF-8 at most (a file name holds 255)
    message = error_of(f"- [ ] id={'é' * 100} lane=1 payload=@doc:x\n")
    assert "200 bytes long in UTF-8; at most 128" in message


# ----------------------------------------------------------------------- numbers

@pytest.mark.parametrize(("field", "expected"), [
    ("retries=99999999999999999999999", "retries='99999999999999999999999' is more than 100"),
    ("retries=101", "retries='101' is more than 100"),
    ("lane=12345678901234567890123", "lane='12345678901234567890123' is more than 9999"),
    ("lane=1_0", "lane='1_0' is not an integer (digits 0-9 only)"),
    ("lane=\u0661\u0662", "lane='\u0661\u0662' is not an integer (digits 0-9 only)"),
    ("lane=\uff11", "is not an integer (digits 0-9 only)"),  # fullwidth digit one
    ("lane=+1", "lane='+1' is not an integer"),
    ("lane=-1", "lane='-1' must not be negative"),
    ("retries=1.0", "retries='1.0' is not an integer"),
    ("timeout=1e400", "timeout='1e400' is more than 30 days"),
    ("timeout=1e400s", "timeout='1e400s' is more than 30 days"),
    ("timeout=31d", "timeout='31d' is more than 30 days"),
    ("timeout=inf", "timeout='inf' is not a duration"),
    ("timeout=nan", "timeout='nan' is not a duration"),
    ("timeout=1_0s", "timeout='1_0s' is not a duration"),
    ("timeout=\u0661\u0660s", "is not a duration"),
    ("resources=GPU:1e400", "resources GPU='1e400' is more than 1e+18"),
    ("resources=VRAM:1e20GB", "resources VRAM='1e20GB' is more than 1e+18"),
    ("resources=GPU:nan", "resources GPU='nan' is not an amount"),
    ("resources=GPU:inf", "resources GPU='inf' is not an amount"),
    ("resources=GPU:1_0", "resources GPU='1_0' is not an amount"),
    ("resources=GPU:\u0661", "is not an amount"),
])
def test_numbers_are_ascii_and_bounded(field, expected):
    message = error_of(f"- [ ] id=a lane=1 {field} payload=@cmd:true\n".replace(
        "lane=1 lane=", "lane="))
    assert message.startswith("plans/demo.md:1: step 'a': ") and expected in message


def test_numbers_at_their_bounds_parse():
    step = parse("- [ ] id=a lane=9999 retries=100 timeout=30d resources=GPU:1e18,VRAM:0.5GB "
                 "payload=@cmd:true\n").steps[0]
    assert (step.lane, step.retries, step.timeout) == (9999, 100, 30 * 86400.0)
    assert step.resources == {"GPU": 1e18, "VRAM": 5e8}
    assert parse("- [ ] id=a lane=007 timeout=.5s payload=@cmd:true").steps[0].timeout == 0.5


numbers = st.one_of(
    st.integers(min_value=-10, max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet="0123456789_.eE+-kKmMgGiBsdh\u0661\u0662\uff11\u00b2 ", min_size=1,
            max_size=12).map(lambda s: s.replace(" ", "")).filter(bool),
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["lane", "retries", "timeout", "resources"]), numbers)
def test_numeric_fields_parse_bounded_or_raise_plan_error(field, value):
    import math

    text = f"- [ ] id=a lane=1 {field}={'GPU:' if field == 'resources' else ''}{value} " \
           "payload=@cmd:true\n"
    if field == "lane":
        text = text.replace("lane=1 ", "", 1)
    try:
        step = Plan.from_text(text, path="n.md").steps[0]
    except PlanError:
        return
    assert value.isascii()
    if field in ("lane", "retries"):
        number = getattr(step, field)
        assert isinstance(number, int) and value.isdigit()
        assert 0 <= number <= (9999 if field == "lane" else 100)
    elif field == "timeout":
        assert math.isfinite(step.timeout) and 0 <= step.timeout <= 30 * 86400
    else:
        amount = step.resources["GPU"]
        assert math.isfinite(amount) and 0 <= amount <= 1e18


_made = iter(range(10**9))


@st.composite
def special_files(draw, tmp):
    kind = draw(st.sampled_from(["fifo", "dir", "socket", "link-to-fifo", "devnull"]))
    path = os.path.join(tmp, f"{kind}-{next(_made)}.md")  # a new file for every example
    if kind in ("fifo", "link-to-fifo"):
        target = path + ".fifo" if kind == "link-to-fifo" else path
        os.mkfifo(target)
        if kind == "link-to-fifo":
            os.symlink(target, path)
    elif kind == "dir":
        os.mkdir(path)
    elif kind == "socket":
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
        sock.close()
    else:
        path = os.devnull
    return path


def test_special_files_are_plan_errors_never_hangs(tmp_path):
    import signal

    def hung(*_):
        raise TimeoutError("Plan.from_file hangs")

    old = signal.signal(signal.SIGALRM, hung)

    @settings(max_examples=25, deadline=None)
    @given(special_files(str(tmp_path)))
    def check(path):
        signal.alarm(10)
        try:
            with pytest.raises(PlanError, match="not a regular file"):
                Plan.from_file(path)
        finally:
            signal.alarm(0)

    try:
        check()
    finally:
        signal.signal(signal.SIGALRM, old)


def test_units_are_dask_parsers_with_ascii_digits():
    import math

    import dask.utils

    from obdask.units import parse_bytes, parse_duration

    for text in ("90s", "5m", "1.5h", "2d", "300ms", "1w"):
        assert parse_duration(text) == dask.utils.parse_timedelta(text)
    for text in ("16GB", "512MiB", "1kB", "3G"):
        assert parse_bytes(text) == dask.utils.parse_bytes(text)
    assert parse_duration("2 min") == 120 and parse_duration("1hr") == 3600
    assert parse_duration(".5s") == 0.5  # dask alone reads ".5s" as 1.5 s
    assert parse_bytes("0.5") == 0.5  # a plain amount keeps its fraction
    assert math.isinf(parse_duration("1e400")) and math.isinf(parse_bytes("1e400GB"))
    for bad in ("1_0s", "\u0661\u0660s", "inf", "nan", "", "s", "-1s", "5 parsecs"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    for bad in ("1_0", "\uff11", "inf", "-1", "5 foos"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


# ----------------------------------------------------------------- fenced examples

STEP = "- [ ] id=a lane=1 payload=@doc:x\n"


@pytest.mark.parametrize("text", [
    "```\n- [ ] id=ex lane=1 payload=@cmd:echo ran\n```\n" + STEP,
    "~~~\n- [ ] id=ex lane=1 payload=@cmd:echo ran\n~~~\n" + STEP,
    "```markdown\n- [x] id=ex lane=1 payload=@cmd:echo ran\n```\n" + STEP,
    "  ```\n  - [ ] id=ex lane=1 payload=@cmd:echo ran\n  ```\n" + STEP,
    # a fence closes only with the same character, at least as long
    "```\n~~~\n- [ ] id=ex lane=1 payload=@cmd:echo ran\n```\n" + STEP,
    "````\n```\n- [ ] id=ex lane=1 payload=@cmd:echo ran\n````\n" + STEP,
    "~~~\n```\n- [ ] id=ex lane=1 payload=@cmd:echo ran\n~~~\n" + STEP,
])
def test_lines_inside_fenced_code_blocks_are_never_steps(text):
    assert [s.id for s in parse(text).steps] == ["a"]


def test_plan_settings_inside_fences_are_examples_too():
    plan = parse("```\nplan_id=other\nworkspace=/elsewhere\npolicy: llm_doc_tasks=true\n"
                 "# Plan: example\n```\n" + STEP)
    assert (plan.plan_id, plan.workspace, plan.policy, plan.title) == ("demo", None, {}, None)


def test_inline_backticks_do_not_open_a_fence():
    # "```x```" on one line is inline code, not a fence (no backtick in a fence's info)
    plan = parse("```inline``` code, not a fence\n" + STEP + "- [ ] id=b lane=1 payload=@doc:y\n")
    assert [s.id for s in plan.steps] == ["a", "b"]


def test_an_unclosed_fence_that_hides_steps_is_an_error():
    message = error_of(STEP + "```\n- [ ] id=b lane=1 payload=@doc:y\n")
    assert "demo.md:2" in message and "never closed" in message


# ------------------------------------------------------------ silently ignored input

@pytest.mark.parametrize(("field", "expected"), [
    ("locality=zzz", "locality='zzz' is not a locality; use locality=git:<url>@<rev>"),
    ("locality=git:", "locality='git:' is not a locality"),
    ("locality=model:x", "locality='model:x' is not a locality"),
    ("deps=,a,,", "deps=',a,,' has an empty item"),
    ("deps=a,,0", "deps='a,,0' has an empty item"),
    ("deps=a,a", "deps='a,a' names 'a' twice"),
    ("deps=0,0", "deps='0,0' names '0' twice"),
    ("resources=,GPU:1", "resources=',GPU:1' has an empty item"),
])
def test_malformed_fields_are_errors_not_ignored(field, expected):
    message = error_of("- [ ] id=0 lane=1 payload=@doc:x\n- [ ] id=a lane=1 payload=@doc:y\n"
                       f"- [ ] id=c lane=1 {field} payload=@cmd:true\n")
    assert message.startswith("plans/demo.md:3: step 'c': ") and expected in message


def test_a_bom_before_the_first_line_is_dropped(tmp_path):
    plan = parse("\ufeff- [ ] id=a lane=1 payload=@doc:x\n")
    assert [s.id for s in plan.steps] == ["a"]
    path = tmp_path / "bom.md"
    path.write_bytes(b"\xef\xbb\xbfplan_id=bom\n- [ ] id=a lane=1 payload=@doc:x\n")
    plan = Plan.from_file(path)
    assert plan.plan_id == "bom" and [s.id for s in plan.steps] == ["a"]


# ------------------------------------------------------------- graph (graphlib)

def test_a_cycle_is_reported_with_every_other_error_in_one_pass():
    with pytest.raises(PlanError) as info:
        parse("- [ ] id=a lane=1 deps=b payload=@cmd:true\n"
              "- [ ] id=b lane=1 deps=a payload=@cmd:true\n"
              "- [ ] id=c lane=x payload=@cmd:true\n"
              "- [ ] id=d lane=1 deps=zz payload=@cmd:true\n")
    errors = info.value.errors
    assert any("demo.md:1: dependency cycle: a -> b -> a" in e for e in errors), errors
    assert any("demo.md:3:" in e and "lane='x'" in e for e in errors)
    assert any("demo.md:4:" in e and "unknown step 'zz'" in e for e in errors)


def test_topological_order_keeps_file_order_when_it_already_fits():
    from obdask.plan import topological_order

    plan = parse("- [ ] id=a lane=1 payload=@cmd:true\n"
                 "- [ ] id=b lane=1 deps=a payload=@cmd:true\n"
                 "- [ ] id=c lane=1 payload=@cmd:true\n"
                 "- [ ] id=e lane=1 deps=d payload=@cmd:true\n"
                 "- [ ] id=d lane=1 payload=@cmd:true\n")
    assert [s.id for s in topological_order(plan.steps)] == ["a", "b", "c", "d", "e"]
