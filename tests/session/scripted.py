"""The scripted test-server replies of the session tests (see ``conftest.py``)."""

from __future__ import annotations

import json
import re
import threading

from obdask.session.model import SessionState

FULL = "S1P123S2P123S3P123S4P123S5P123"
MODELS = {"orchestrator": "orch:1b", "coder": "coder:1b", "researcher": "res:1b"}
FLOW = re.compile(r"^flow code: (\S+)$", re.M)
POSITION = re.compile(r"^position: (\S+)$", re.M)


class Model:
    """The test server's reply function: default moves, scripted exceptions, a log."""

    def __init__(self, orchestrator=None):
        self.orchestrator = orchestrator  # callable(flow code, n-th ask) -> reply or None
        self.log: list[tuple[str, str]] = []  # (model, position or flow code)
        self.lock = threading.Lock()
        self.process_reply = None  # callable(position) -> a process reply or None

    def __call__(self, body):
        if self.process_reply is not None and body["model"].split(":")[0] != "orch":
            pos = POSITION.search(body["messages"][-1]["content"])
            scripted = self.process_reply(pos.group(1) if pos else None)
            if scripted is not None:
                with self.lock:
                    self.log.append((body["model"].split(":")[0], pos.group(1) if pos else "?"))
                return scripted
        text = body["messages"][-1]["content"]
        model = body["model"].split(":")[0]
        if model == "orch" and isinstance(body.get("format"), dict):
            code = FLOW.search(text).group(1)
            code = "" if code == "-" else code
            with self.lock:
                self.log.append(("orch", code))
                n = sum(1 for m, c in self.log if m == "orch" and c == code)
            if self.orchestrator is not None:
                scripted = self.orchestrator(code, n)
                if scripted is not None:
                    return json.dumps(scripted)
            return json.dumps(SessionState.from_flow_code(code).default_move().to_dict()
                              | {"justification": "default"})
        pos = POSITION.search(text)
        with self.lock:
            self.log.append((model, pos.group(1) if pos else "?"))
        return f"{model} output for {pos.group(1) if pos else 'a question'}."

    def processes(self):
        return [p for m, p in self.log if m in ("coder", "res")]
