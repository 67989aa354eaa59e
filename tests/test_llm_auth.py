"""OLLAMA_API_KEY goes only to the endpoints configured for it (real test servers)."""

from __future__ import annotations

import logging

import dask
import pytest

pytest.importorskip("ollama")

from obdask.llm.auth import api_key_for  # noqa: E402
from obdask.llm.client import call_model  # noqa: E402
from obdask.llm.pool import reset_pools  # noqa: E402
from obdask.testing import OllamaTestServer  # noqa: E402

KEY = "sk-obdask-test-6f1d2c"


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    reset_pools()
    yield
    reset_pools()


def test_key_only_to_the_configured_endpoint():
    with OllamaTestServer(models=["m1"]) as trusted, OllamaTestServer(models=["m1"]) as other:
        with dask.config.set({"obdask.llm.api-key-endpoints": [trusted.url]}):
            call_model("m1", "hi", endpoints=[trusted.url])
            call_model("m1", "hi", endpoints=[other.url])
        assert set(trusted.stats.authorizations) == {f"Bearer {KEY}"}
        assert trusted.stats.authorizations[f"Bearer {KEY}"] >= 2  # /api/tags and /api/chat
        assert set(other.stats.authorizations) == {None}, other.stats.authorizations


def test_ollama_host_gets_it_by_default_nothing_else(monkeypatch):
    with OllamaTestServer(models=["m1"]) as host, OllamaTestServer(models=["m1"]) as other:
        monkeypatch.setenv("OLLAMA_HOST", host.url)
        call_model("m1", "hi", endpoints=[host.url])
        call_model("m1", "hi", endpoints=[other.url])
        assert set(host.stats.authorizations) == {f"Bearer {KEY}"}
        assert set(other.stats.authorizations) == {None}


def test_plain_http_to_a_remote_host_warns_once(caplog):
    remote = "http://gpu1.example:11434"
    with dask.config.set({"obdask.llm.api-key-endpoints": [remote, "http://127.0.0.1:9"]}), \
            caplog.at_level(logging.WARNING, logger="obdask.llm.auth"):
        assert api_key_for(remote) == KEY and api_key_for(remote) == KEY
        assert api_key_for("http://127.0.0.1:9") == KEY  # loopback: no warning
        assert api_key_for("http://10.0.0.9:11434") is None  # not configured
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "gpu1.example" in warnings[0] and KEY not in warnings[0]
