"""Job kinds and their executors: the registry, and one conformance mixin per kind."""

from __future__ import annotations

import json

import dask
import pytest

from obdask.compile import KINDS
from obdask.exceptions import PayloadError
from obdask.payloads import execute, get_executor, known_executors, register_executor
from obdask.plan import Plan
from obdask.runner import prepare
from obdask.testing import OllamaTestServer


def _job(tmp_path, line, files=None):
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    plan_path = tmp_path / "plan.md"
    plan_path.write_text(line + "\n")
    compiled, ctx = prepare(Plan.from_file(plan_path))
    (job,) = compiled.jobs
    return job.spec, ctx


class ExecutorConformance:
    """What every executor promises; a subclass names a kind and a good and a bad job."""

    kind: str
    good: str
    bad: str
    files: dict[str, str] = {}

    def test_kind_is_decided_at_compile_time(self, tmp_path):
        spec, _ = _job(tmp_path, self.good, self.files)
        assert spec.kind == self.kind and self.kind in KINDS

    def test_good_job_returns_json_fields(self, tmp_path):
        spec, ctx = _job(tmp_path, self.good, self.files)
        fields = execute(spec, ctx, ())
        assert isinstance(fields, dict)
        json.dumps(fields)  # records are JSON lines

    def test_bad_job_raises_payload_error_naming_the_job(self, tmp_path):
        spec, ctx = _job(tmp_path, self.bad, self.files)
        with pytest.raises(PayloadError, match="p::x|plan::x|::x"):
            execute(spec, ctx, ())


class TestCmd(ExecutorConformance):
    kind = "cmd"
    good = "- [ ] id=x lane=1 payload=@cmd:echo hi"
    bad = "- [ ] id=x lane=1 payload=@cmd:false"


class TestFileTest(ExecutorConformance):
    kind = "test"
    good = "- [ ] id=x lane=1 payload=@file:there.txt#test"
    bad = "- [ ] id=x lane=1 payload=@file:missing.txt#test"
    files = {"there.txt": "here"}


DIFF = """--- a/app.py
+++ b/app.py
@@ -1,2 +1,2 @@
 def answer():
-    return 41
+    return 42
"""


class TestApply(ExecutorConformance):
    kind = "apply"
    good = "- [ ] id=x lane=1 payload=@file:fix.diff#apply"
    bad = "- [ ] id=x lane=1 payload=@file:empty.diff#apply"
    files = {"fix.diff": DIFF, "empty.diff": ""}

    @pytest.fixture(autouse=True)
    def workspace(self, git_repo):
        with dask.config.set({"obdask.workspace": str(git_repo)}):
            yield git_repo


class TestModel(ExecutorConformance):
    kind = "model"
    good = "- [ ] id=x lane=1 payload=@file:spec.md"
    bad = "- [ ] id=x lane=1 payload=@file:empty.md"
    files = {"spec.md": "Say hello.", "empty.md": ""}

    @pytest.fixture(autouse=True)
    def server(self, monkeypatch):
        with OllamaTestServer(models=["qwen2.5-coder:14b"]) as server:
            monkeypatch.setenv("OLLAMA_HOST", server.url)
            yield server


def test_metadata_never_runs_on_a_worker(tmp_path):
    spec, ctx = _job(tmp_path, "- [ ] id=x lane=1 payload=@doc:a note")
    assert spec.kind == "metadata"
    with pytest.raises(PayloadError, match="compile time"):
        execute(spec, ctx, ())


def test_a_third_party_kind_can_be_registered(tmp_path):
    with pytest.raises(ValueError, match="already registered"):
        register_executor("cmd", lambda spec, ctx, deps: {})
    register_executor("echo", lambda spec, ctx, deps: {"echo": spec.key})
    try:
        assert get_executor("echo")(type("S", (), {"key": "p::e"})(), None, ()) == {
            "echo": "p::e"}
    finally:
        register_executor("echo", "json:dumps", clobber=True)
        known_executors.pop("echo")
    with pytest.raises(PayloadError, match="no executor for job kind 'nope'"):
        get_executor("nope")


def test_timeout_zero_means_no_wall_timeout(tmp_path):
    # Regression: `spec.timeout or policy.timeout` turned a step's timeout=0 into the
    # run's default (120 s), here 0.3 s, which would kill the sleep.
    with dask.config.set({"obdask.run.timeout": "0.3s"}):
        spec, ctx = _job(tmp_path, "- [ ] id=x lane=1 timeout=0 payload=@cmd:sleep 0.6")
        assert execute(spec, ctx, ())["exit_code"] == 0
        spec, ctx = _job(tmp_path, "- [ ] id=x lane=1 payload=@cmd:sleep 0.6")
        with pytest.raises(PayloadError, match="timed out"):
            execute(spec, ctx, ())
