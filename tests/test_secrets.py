"""Secret hygiene (issue 13, item 5): planted secrets appear in no output, file, record or log.

Secrets are planted in the environment (the CLI's and its workers'), in config
(``obdask.storage-options``) and in command lines / output (``password=``,
``token=``, ``Authorization: Bearer``); a plan runs and every output is searched.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import dask
import pytest

import obdask
from obdask.redact import MASK, redact, redact_bytes, redact_obj

TAG = uuid.uuid4().hex[:8]
ENV_SECRETS = {
    "AWS_SECRET_ACCESS_KEY": f"aws-secret-{TAG}",
    "OLLAMA_API_KEY": f"ollama-key-{TAG}",
    "MY_SERVICE_TOKEN": f"svc-token-{TAG}",
    "DB_PASSWORD": f"db-pass-{TAG}",
}
CONFIG_SECRETS = {"key": f"s3-key-{TAG}", "secret": f"s3-secret-{TAG}"}
LINE_SECRETS = [f"hunter2-{TAG}", f"tok-{TAG}", f"bearer-{TAG}"]
ALL = [*ENV_SECRETS.values(), *CONFIG_SECRETS.values(), *LINE_SECRETS]

PLAN = (
    f"- [ ] id=echo lane=1 payload=@cmd:echo password={LINE_SECRETS[0]}\n"
    f"- [ ] id=fails lane=1 payload=@cmd:echo token={LINE_SECRETS[1]} >&2; false\n"
    f"- [ ] id=header lane=1 payload=@cmd:echo 'Authorization: Bearer {LINE_SECRETS[2]}'\n"
    "- [ ] id=env lane=1 payload=@cmd:env\n"
)


def _leaks(text: str) -> list[str]:
    return [s for s in ALL if s in text]


def _scan_files(root: Path) -> dict[str, list[str]]:
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and path.name != "plan.md":
            leaks = _leaks(path.read_bytes().decode("utf-8", "replace"))
            if leaks:
                found[str(path)] = leaks
    return found


def test_redact_values_and_patterns(monkeypatch):
    monkeypatch.setenv("OLLAMA_API_KEY", ENV_SECRETS["OLLAMA_API_KEY"])
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    with dask.config.set({"obdask.storage-options": {"s3": dict(CONFIG_SECRETS)}}):
        text = (f"key {ENV_SECRETS['OLLAMA_API_KEY']} s3 {CONFIG_SECRETS['secret']} "
                "password=abc123 --token x9y8z7 url s3://me:pw0rd99@host/b "
                "Authorization: Bearer eyJhbGciOi region us-east-1")
        out = redact(text)
        assert _leaks(out) == [] and "abc123" not in out and "pw0rd99" not in out
        assert "eyJhbGciOi" not in out and "us-east-1" in out and "s3://me:***@host" in out
        assert redact_bytes(b"password=abc123 \xff") == b"password=*** \xff"
        assert redact_obj({"a": [f"x {CONFIG_SECRETS['key']}"], "n": 3}) == {
            "a": [f"x {MASK}"], "n": 3}
        # a record's fields of every kind: plain and nested strings masked, the rest kept
        record = {"error": "password=abc123", "ok": True, "n": None, "t": 1.5,
                  "env": {"K": f"{ENV_SECRETS['OLLAMA_API_KEY']}"},
                  "tries": ({"why": "Bearer eyJhbGciOi0"},)}
        assert redact_obj(record) == {"error": f"password={MASK}", "ok": True, "n": None,
                                      "t": 1.5, "env": {"K": MASK},
                                      "tries": ({"why": f"Bearer {MASK}"},)}
    assert redact("tokens=1024 eval_count: 5 ok") == "tokens=1024 eval_count: 5 ok"


def test_records_are_searched_whole_then_string_by_string(monkeypatch):
    """redact_obj/redact_all search a record's strings together first: same masks."""
    from obdask.redact import redact_all

    monkeypatch.setenv("OLLAMA_API_KEY", ENV_SECRETS["OLLAMA_API_KEY"])
    clean = {"key": "p::s1", "worker": "tcp://127.0.0.1:1", "n": 3, "ok": True,
             "tail": ["done", ("a", None)], "nested": {"x": 1.5}}
    dirty = [{"stderr": f"x {ENV_SECRETS['OLLAMA_API_KEY']}"},  # a known value
             {"out": {"deep": ["fine", "see https://me:pw0rd99@host/x"]}},  # URL password
             {"cmd": "curl -H 'AUTHORIZATION: Bearer eyJhbGciOi'"}]  # a pattern, upper case
    got = redact_all([clean, *dirty])
    assert got[0] == clean and got[0] is not clean  # a copy: callers add fields to it
    assert got[1]["stderr"] == f"x {MASK}"
    assert got[2]["out"]["deep"] == ["fine", f"see https://me:{MASK}@host/x"]
    assert "eyJhbGciOi" not in got[3]["cmd"]
    assert [redact_obj(d) for d in dirty] == got[1:]
    assert dirty[0]["stderr"] != got[1]["stderr"]  # the caller's record is left as it was


def test_secrets_in_subclassed_strings_and_named_tuples_are_masked(monkeypatch):
    """The record-wide first search sees every string _redact_obj would mask."""
    from collections import namedtuple

    class Text(str):
        pass

    monkeypatch.setenv("OLLAMA_API_KEY", ENV_SECRETS["OLLAMA_API_KEY"])
    pair = namedtuple("pair", "name value")
    record = {"a": Text(f"x {ENV_SECRETS['OLLAMA_API_KEY']}"),
              "b": pair("n", f"y {ENV_SECRETS['OLLAMA_API_KEY']}")}
    got = redact_obj(record)
    assert got["a"] == f"x {MASK}" and got["b"][1] == f"y {MASK}"


def test_log_records_of_obdask_loggers_are_redacted(caplog):
    with caplog.at_level(logging.DEBUG, logger="obdask"):
        logging.getLogger(f"obdask.made.later.{TAG}").warning(
            "running %s", f"echo password={LINE_SECRETS[0]}")
    assert caplog.records and not _leaks(caplog.text), caplog.text
    assert "password=***" in caplog.text


def _cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "obdask.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_cli_run_leaks_no_secret_anywhere(tmp_path):
    plan = tmp_path / "plan.md"
    plan.write_text(PLAN)
    env = {**os.environ, **ENV_SECRETS,
           "DASK_OBDASK__STORAGE_OPTIONS": repr({"s3": CONFIG_SECRETS}),
           "DASK_LOGGING__OBDASK": "debug"}
    table = _cli(["run", str(plan), "--workers", "1"], tmp_path, env)
    as_json = _cli(["run", str(plan), "--workers", "1", "--json"], tmp_path, env)
    assert table.returncode == 1 and as_json.returncode == 1, (table.stderr, as_json.stderr)
    jobs = {j["id"]: j for j in json.loads(as_json.stdout)["jobs"]}
    assert jobs["echo"]["status"] == "done" and jobs["fails"]["status"] == "failed"
    assert "token=***" in jobs["fails"]["error"], jobs["fails"]
    for name, out in [("table", table.stdout + table.stderr),
                      ("json", as_json.stdout + as_json.stderr)]:
        assert not _leaks(out), (name, _leaks(out), out[-3000:])
    assert not _scan_files(tmp_path), _scan_files(tmp_path)
    records = list((tmp_path / ".obdask").rglob("records.jsonl"))
    assert len(records) == 2 and "password=***" in "".join(
        p.read_text() for p in (tmp_path / ".obdask" / "artifacts").rglob("*") if p.is_file())
    listing = _cli(["runs", str(plan), "--json"], tmp_path, env)
    logs = _cli(["logs", str(plan)], tmp_path, env)
    assert not _leaks(listing.stdout + listing.stderr + logs.stdout + logs.stderr)


@pytest.mark.slow
def test_run_events_metrics_and_frame_leak_nothing(tmp_path, monkeypatch, caplog):
    from distributed import Client, LocalCluster

    from obdask import metrics
    from obdask.execute import EVENT_TOPIC

    for name, value in ENV_SECRETS.items():
        monkeypatch.setenv(name, value)
    plan = tmp_path / "plan.md"
    plan.write_text(PLAN)
    with dask.config.set({"obdask.storage-options": {"s3": dict(CONFIG_SECRETS)}}), \
            caplog.at_level(logging.DEBUG, logger="obdask"), \
            LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                         dashboard_address=":0", silence_logs=logging.CRITICAL) as cluster, \
            Client(cluster) as client:
        result = obdask.run(plan, client)
        events = client.get_events(EVENT_TOPIC)
        jobs_frame = metrics.jobs(client)
        event_frame = metrics.events(client)
    outputs = {
        "frame": result.frame.to_json(), "json": json.dumps(result.to_json(), default=str),
        "events": repr(events), "metrics": jobs_frame.to_json(),
        "metric-events": event_frame.to_json(), "log": caplog.text,
    }
    assert result.frame.loc["fails", "status"] == "failed"
    # the job's environment is scrubbed: `env` printed none of the worker's secrets
    env_out = result.frame.loc["env"]
    assert env_out["status"] == "done"
    for name, text in outputs.items():
        assert not _leaks(text), (name, _leaks(text))
    assert not _scan_files(tmp_path), _scan_files(tmp_path)


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_job_environment_is_scrubbed(tmp_path, mode):
    """Neither the sandbox nor the rlimit-only mode passes the worker's secrets to a job."""
    from obdask.payloads.cmd import run_command

    with dask.config.set({"obdask.cmd.sandbox.mode": mode}):
        res = run_command("env", tmp_path, env={**os.environ, **ENV_SECRETS}, timeout=60)
    assert res.ok and b"PATH=" in res.stdout, res
    names = [n for n in ENV_SECRETS if n.encode() in res.stdout]
    assert not names and not _leaks(res.stdout.decode()), names


def test_run_records_are_written_with_one_lookup_of_the_known_secrets(tmp_path, monkeypatch):
    """write_records masks every record, looking the secrets up once, not once per record
    (about 8 us each: a 2000-job run paid it twice per job at its end)."""
    import obdask.redact as redact_module
    from obdask.records import RunStore

    calls = []
    original = redact_module._compiled
    monkeypatch.setattr(redact_module, "_compiled", lambda: calls.append(1) or original())
    monkeypatch.setenv("OLLAMA_API_KEY", ENV_SECRETS["OLLAMA_API_KEY"])
    records = [{"key": f"p::s{i}", "error": f"key {ENV_SECRETS['OLLAMA_API_KEY']}"}
               for i in range(50)]
    store = RunStore(str(tmp_path), "p", "r1")
    store.write_records(records, {"ok": True})
    text = (Path(store.root) / "records.jsonl").read_text()
    assert text.count(MASK) == 50 and _leaks(text) == []
    assert len(calls) == 2  # the records, the summary


def test_records_already_masked_are_written_without_a_second_pass(tmp_path, monkeypatch):
    """A run's records come masked from collect(); ``redacted=True`` writes them as they
    are (the summary is still masked), the default masks them."""
    from obdask.records import RunStore

    monkeypatch.setenv("OLLAMA_API_KEY", ENV_SECRETS["OLLAMA_API_KEY"])
    secret = ENV_SECRETS["OLLAMA_API_KEY"]
    records = [{"key": "p::a", "step": "a", "error": f"saw {secret}"}]
    summary = {"ok": False, "note": f"saw {secret}"}
    for redacted, expected in ((True, 1), (False, 0)):
        store = RunStore(str(tmp_path), "p", f"r{int(redacted)}")
        store.write_records(records, summary, redacted=redacted)
        lines = (Path(store.root) / "records.jsonl").read_text()
        assert lines.count(secret) == expected, lines
        assert secret not in (Path(store.root) / "summary.json").read_text()
