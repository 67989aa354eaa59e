"""The allowlist bypasses a tester got through (issue 13, item 6), each refused at compile time.

The sandbox is the boundary; these are the readable check's obvious refusals, each a
one-line error naming the step and the reason.
"""

from __future__ import annotations

import os
import textwrap

import dask
import pytest

import obdask
from obdask.exceptions import CommandRefused
from obdask.payloads.cmd import check_command, run_command
from obdask.validate import validate_file

# verbatim from the issue text where it gives the line, else the obvious form
BYPASSES = [
    ("cp /bin/rm ./ls && ./ls -f victim", "'./ls' is not in a directory"),
    ("mkdir -p b && cp /bin/rm b/cat && PATH=b cat -f victim", "PATH="),
    ("mkdir -p b && cp /bin/rm b/cat && b/cat -f victim", "'b/cat' is not in a directory"),
    ("env PATH=b cat -f victim", "PATH="),
    ("export PATH=b; cat -f victim", "PATH="),
    ("LD_PRELOAD=./evil.so ls", "LD_PRELOAD="),
    ("/tmp/x/../../bin/ls", "'..'"),
    ("git -c alias.x='!rm -rf ~' x", "alias"),
    ("git -c core.fsmonitor='touch /tmp/pwned' status", "core.fsmonitor"),
    ("git -c core.sshCommand='sh -c id' fetch origin", "core.sshCommand"),
    ("git -c core.pager='sh -c id' log", "core.pager"),
    ("git clone --upload-pack='touch /tmp/pwned' x y", "--upload-pack"),
    ("git clone -u 'touch /tmp/pwned' x y", "upload-pack"),
    ("git fetch 'ext::sh -c touch% /tmp/pwned'", "remote helper"),
    ("make --eval='all:; @rm -f victim'", "--eval"),
    ("make -E 'all:; @rm -f victim'", "--eval"),
    ("awk 'BEGIN { system(\"rm -f victim\") }'", "system()"),
    ("awk 'BEGIN { print \"id\" | \"sh\" }'", "pipes its output"),
    ("awk 'BEGIN { \"id\" | getline x; print x }'", "reads from a command"),
    ("awk 'BEGIN { print \"x\" > \"/etc/cron.d/x\" }'", "outside the workspace"),
    ("sed 'e rm -f victim' in.txt", "'e' runs a command"),
    ("sed -n '1e id' in.txt", "'e' runs a command"),
    ("sed 's/x/rm -f victim/e' in.txt", "s///e"),
    ("sed -e 'w /etc/x' in.txt", "'w' writes a file"),
    ("sed 's/a/b/w /tmp/out' in.txt", "s///w"),
    ("find . -delete", "-delete"),
    ("find . -name x -fprint /tmp/out", "-fprint"),
    ("find . -fprintf /tmp/out %p", "-fprintf"),
    ("find . -exec rm {} \\;", "-exec"),
    ("find . -ok rm {} \\;", "-ok"),
]


@pytest.mark.parametrize(("command", "why"), BYPASSES, ids=[c for c, _ in BYPASSES])
def test_bypass_is_refused(command, why):
    with pytest.raises(CommandRefused) as info:
        check_command(command)
    message = str(info.value)
    assert why in message and "\n" not in message, message


@pytest.mark.parametrize("command", [
    "/usr/bin/git status", "git -c user.name=x commit -m m", "git clone ../a b",
    "make -C sub test", "make -j4", "awk '{ print $1 }' f", "awk '/a|b/ && $1 || $2' f",
    "awk '{ print $1 > \"out.txt\"; print > \"/dev/stderr\" }' f",
    "sed -i 's/a/b/g' f", "sed -n '/x/p; $=' f", "sed -e '1d' -e 's|a|b|' f",
    "sed '/start/,/end/{s/a/b/;p}' f", "sed 'y/abc/xyz/' f",
    "find . -name '*.py' -print", "X=1 ls", "env FOO=1 ls",
])
def test_ordinary_uses_still_pass(command):
    assert check_command(command)


def test_workspace_relative_dir_is_opt_in():
    with pytest.raises(CommandRefused, match="executable-dirs"):
        check_command(".venv/bin/python -m pytest")
    assert check_command(".venv/bin/python -m pytest",
                         executable_dirs=[".venv/bin", "/usr/bin"]) == [".venv/bin/python"]


def test_bare_names_do_not_run_from_the_workspace(tmp_path):
    """A relative (or empty) PATH entry, or one inside the workspace, is dropped."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "cat").write_text("#!/bin/sh\necho hijacked\n")
    (fake / "cat").chmod(0o755)
    path = os.pathsep.join([str(fake), "bin", "", os.environ["PATH"]])
    with dask.config.set({"obdask.cmd.sandbox.mode": "off"}):
        res = run_command("echo safe | cat", tmp_path, env={"PATH": path}, timeout=30)
    assert res.ok and res.stdout == b"safe\n", res


def test_refusal_names_the_step_at_compile_time(tmp_path):
    plan = tmp_path / "plan.md"
    plan.write_text(textwrap.dedent("""\
        - [ ] id=ok lane=1 payload=@cmd:true
        - [ ] id=evil lane=1 payload=@cmd:git -c core.fsmonitor='touch pwned' status
        """))
    parsed, problems = validate_file(plan)
    assert parsed is None and len(problems) == 1, problems
    assert "step 'evil'" in problems[0] and "core.fsmonitor" in problems[0], problems
    # obdask run checks again on the worker: the job fails with the reason, nothing runs
    result = obdask.run(plan, workspace=tmp_path)
    error = result.frame.loc["evil", "error"]
    assert result.frame.loc["evil", "status"] == "failed" and "core.fsmonitor" in error
    assert not (tmp_path / "pwned").exists()
