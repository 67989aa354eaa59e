"""Secret hygiene of a session (issue 13, item 5): planted secrets appear in no output.

:mod:`tests.test_secrets` searches what a plan run leaves; this runs a whole session
(the scripted test server of ``conftest.py``) with secrets planted in the environment,
in ``obdask.storage-options``, in the prompt, in model replies, in a plan fragment's
command and in a human answer, then searches every file of the session store and of
the fragment's workspace, the session's events, ``obdask session show --json``, the
scheduler's shared state, the metrics frames and obdask's log records.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import dask
from click.testing import CliRunner

from obdask import metrics
from obdask.session.api import Session
from tests.session.scripted import FULL

TAG = uuid.uuid4().hex[:8]
ENV = {"AWS_SECRET_ACCESS_KEY": f"aws-secret-{TAG}", "OLLAMA_API_KEY": f"ollama-key-{TAG}"}
OPTIONS = {"key": f"s3-key-{TAG}", "secret": f"s3-secret-{TAG}"}
PROMPT_PW, REPLY_PW, CMD_PW, ANSWER_KEY = (f"prompt-pw-{TAG}", f"reply-pw-{TAG}",
                                           f"cmd-pw-{TAG}", f"answer-key-{TAG}")
ALL = [*ENV.values(), *OPTIONS.values(), PROMPT_PW, REPLY_PW, CMD_PW, ANSWER_KEY]

PROMPT = (f"Deploy with password={PROMPT_PW}; the S3 secret is {OPTIONS['secret']} and "
          f"the AWS one {ENV['AWS_SECRET_ACCESS_KEY']}.")
# the model "repeats" secrets it saw: as known values and as an assignment
REPLY = (f"Connecting with password={REPLY_PW}, key {ENV['OLLAMA_API_KEY']} and "
         f"{OPTIONS['key']}.")
FRAGMENT = f"""Jobs:

```plan
- [ ] id=login lane=1 payload=@cmd:echo password={CMD_PW}
```
"""


def _leaks(text: str) -> list[str]:
    return [s for s in ALL if s in text]


def _scan(root: Path) -> dict[str, list[str]]:
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            leaks = _leaks(path.read_bytes().decode("utf-8", "replace"))
            if leaks:
                found[str(path)] = leaks
    return found


def _replies(position):
    if position == "S3P1":
        return FRAGMENT
    if position in ("S1P1", "S2P1", "S3P3", "S4P1"):  # S3P3: the question asked
        return REPLY
    return None


def test_a_session_leaks_no_planted_secret(cluster, model, tmp_path, monkeypatch, caplog):
    from obdask.cli import main

    m, _ = model
    m.process_reply = _replies
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    with dask.config.set({"obdask.storage-options": {"s3": dict(OPTIONS)},
                          "obdask.sessions.consultation-timeout": "60s"}), \
            caplog.at_level(logging.INFO), caplog.at_level(logging.DEBUG, logger="obdask"):
        s = Session.start(cluster, PROMPT, workspace=str(workspace))
        deadline = time.monotonic() + 60
        while s.state()["state"] != "waiting":
            assert time.monotonic() < deadline, s.state()
            time.sleep(0.05)
        waiting = json.dumps(s.state(), default=str)
        s.answer(f"Fine, use api_key={ANSWER_KEY} for it.")
        final = s.wait(timeout=90)
        assert final["state"] == "done" and final["flow_code"] == FULL, final
        addr = ["--scheduler", cluster.scheduler.address]
        shown = CliRunner().invoke(main, ["session", "show", s.id, "--json", *addr])
        assert shown.exit_code == 0, shown.output
        listed = CliRunner().invoke(main, ["session", "list", "--json", *addr])
        watched = CliRunner().invoke(main, ["session", "watch", s.id, *addr])
        assert listed.exit_code == 0 and watched.exit_code == 0, watched.output
        events = s.events()
        live = s.live()
        time.sleep(1.5)  # the workers send their token records in batches
        frames = {"tokens": metrics.tokens(cluster), "events": metrics.events(cluster),
                  "sessions": metrics.sessions(cluster), "jobs": metrics.jobs(cluster)}
    record = s.record()
    # the planted values did go through the session: what follows is not vacuous
    assert "password=***" in record.prompt, record.prompt
    (frag,) = [x for x in record.snapshots if x.position == "S3P1"]
    assert frag.payload["fragment"]["ok"] is True, frag.payload
    assert [x for x in record.snapshots if x.position == "S1P1"][0].payload
    assert "api_key=***" in record.consultations[0].answer
    assert len(frames["tokens"]) >= 15 and len(events) > 15
    assert "password=***" in shown.output and "password=***" in json.dumps(events)
    outputs = {"show --json": shown.output, "list --json": listed.output,
               "watch": watched.output, "events": json.dumps(events, default=str),
               "live": json.dumps(live, default=str), "waiting": waiting,
               "log": caplog.text, "record": json.dumps(record.to_dict(), default=str)}
    outputs.update({f"metrics.{k}": v.to_json(default_handler=str) for k, v in frames.items()})
    for name, text in outputs.items():
        assert not _leaks(text), (name, _leaks(text))
    assert not _scan(tmp_path), _scan(tmp_path)
