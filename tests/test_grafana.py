"""The Grafana dashboard in docs/ (issue 12, item 5): valid JSON, every PromQL expression
names only series a real scheduler's ``/metrics`` exports."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")

DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana-obdask.json"
NAME = re.compile(r"\b((?:gen_ai|obdask)_[a-zA-Z0-9_]*)")


def exported_series():
    """Series names on a real scheduler's /metrics after every kind of record."""
    from distributed import Scheduler

    from obdask.server import ObdaskPlugin, extension

    async def main():
        async with Scheduler(dashboard_address="127.0.0.1:0", port=0) as s:
            await s.register_scheduler_plugin(ObdaskPlugin(), idempotent=True)
            push = extension(s, "metrics").stream_handlers["obdask_metrics_record"]
            push(worker="tcp://127.0.0.1:1", kind="tokens", record={
                "model": "m", "endpoint": "http://h:11434", "prompt_eval_count": 3,
                "eval_count": 2, "total_duration": 10**9, "ts": time.time()})
            push(worker="tcp://127.0.0.1:1", kind="job", record={"status": "done", "job": "p::a"})
            push(worker="tcp://127.0.0.1:1", kind="sample", record={
                "cpu_percent": 5.0, "memory_used": 1.0, "memory_total": 10.0,
                "gpus": [{"index": 0, "utilization": 50, "memory_used": 1e9}]})
            url = f"http://127.0.0.1:{s.http_server.port}/metrics"
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                None, lambda: urllib.request.urlopen(url, timeout=10).read().decode())

    text = asyncio.run(main())
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_dashboard_json_names_only_exported_series():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10 and len({p["id"] for p in dashboard["panels"]}) == len(
        dashboard["panels"])
    exported = exported_series()
    assert "gen_ai_client_token_usage_sum" in exported  # the scrape really holds obdask's
    for expr in exprs:
        series = re.sub(r"\b(?:by|without)\s*\([^)]*\)|\{[^}]*\}", "", expr)  # not labels
        used = set(NAME.findall(series))
        assert used, f"{expr!r} names no obdask series"
        assert used <= exported, f"{expr!r}: {sorted(used - exported)} not on /metrics"


def test_observability_docs_link_the_dashboard():
    docs = (DASHBOARD.parent / "observability.md").read_text()
    assert "(grafana-obdask.json)" in docs
