"""The Ollama-compatible test server, exercised with the official ``ollama`` client."""

from __future__ import annotations

import json
import math
import threading
import time

import httpx
import pytest

ollama = pytest.importorskip("ollama")

from obdask.llm.schema import example_instance, validate  # noqa: E402
from obdask.testing import BUSY_MESSAGE, ModelSpec, OllamaTestServer, count_tokens  # noqa: E402

MSG = [{"role": "user", "content": "Write a haiku about Dask, please."}]
FINAL_FIELDS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


@pytest.fixture
def server():
    models = [
        ModelSpec("m1", parallel=4),
        {"name": "vis:7b", "capabilities": ["completion", "vision"], "family": "llava"},
        {"name": "emb", "capabilities": ["embedding"], "embedding_length": 32},
    ]
    with OllamaTestServer(models=models) as srv:
        yield srv


@pytest.fixture
def client(server):
    with ollama.Client(host=server.url, timeout=10) as c:
        yield c


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_root_version_and_unknown_path(server):
    assert httpx.get(server.url).text == "Ollama is running"
    head = httpx.head(server.url + "/")
    assert head.status_code == 200 and head.content == b""
    assert httpx.get(server.url + "/api/version").json() == {"version": server.version}
    r = httpx.get(server.url + "/api/nothing")
    assert r.status_code == 404 and r.text == "404 page not found"
    assert httpx.get(server.url + "/api/chat").status_code == 405
    assert server.host == f"127.0.0.1:{server.port}" and server.url == f"http://{server.host}"


def test_chat_non_stream_and_stream_agree(server, client):
    whole = client.chat(model="m1", messages=MSG)
    assert whole.done and whole.done_reason == "stop"
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.prompt_eval_count == count_tokens(MSG[0]["content"])
    assert whole.eval_count == count_tokens(whole.message.content)
    parts = list(client.chat(model="m1", messages=MSG, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert len(parts) - 1 == whole.eval_count
    for name in FINAL_FIELDS:
        assert isinstance(getattr(parts[-1], name), int)
        assert getattr(parts[0], name) is None
    assert server.stats.total("/api/chat", "m1") == 2


def test_raw_ndjson_wire_format(server):
    body = {"model": "m1", "messages": MSG}  # no "stream" key: streaming is the default
    with httpx.stream("POST", server.url + "/api/chat", json=body) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = list(r.iter_lines())
    assert lines and all(line.strip() for line in lines)
    objs = [json.loads(line) for line in lines]
    assert [o["done"] for o in objs] == [False] * (len(objs) - 1) + [True]
    assert "done_reason" not in objs[0] and "eval_count" not in objs[0]
    final = objs[-1]
    assert final["done_reason"] == "stop" and final["message"]["content"] == ""
    assert all(isinstance(final[k], int) and final[k] > 0 for k in FINAL_FIELDS)
    assert final["created_at"].endswith("Z")


def test_generate_stream_and_num_predict(client):
    full = client.generate(model="m1", prompt="Explain futures.")
    assert full.done_reason == "stop" and full.response and full.context
    cut = client.generate(model="m1", prompt="Explain futures.", options={"num_predict": 3})
    assert cut.done_reason == "length" and cut.eval_count == 3
    assert full.response.startswith(cut.response)
    parts = list(client.generate(model="m1", prompt="Explain futures.", stream=True))
    assert "".join(p.response for p in parts) == full.response
    assert parts[-1].eval_count == full.eval_count


def test_scripted_replies_and_stop(server, client):
    server.script(
        "first reply",
        {
            "content": "",
            "tool_calls": [{"function": {"name": "run_tests", "arguments": {"path": "tests"}}}],
        },
    )
    assert client.chat(model="m1", messages=MSG).message.content == "first reply"
    call = client.chat(model="m1", messages=MSG).message.tool_calls[0]
    assert call.function.name == "run_tests" and call.function.arguments == {"path": "tests"}
    with OllamaTestServer(replies=lambda body: body["prompt"].upper() + " END more") as srv:
        c = ollama.Client(host=srv.url)
        reply = c.generate(model="m1", prompt="abc", options={"stop": [" END"]})
        assert reply.response == "ABC" and reply.eval_count == 1


def test_embed(client):
    out = client.embed(model="emb", input=["one", "two words"])
    assert len(out.embeddings) == 2 and len(out.embeddings[0]) == 32
    assert all(math.isclose(sum(v * v for v in vec), 1.0) for vec in out.embeddings)
    assert out.prompt_eval_count == 3
    assert client.embed(model="emb", input="one").embeddings[0] == out.embeddings[0]
    short = client.embed(model="emb", input="one", dimensions=4).embeddings[0]
    assert len(short) == 4 and math.isclose(sum(v * v for v in short), 1.0)
    assert client.embed(model="emb", input=[]).embeddings == []
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="emb", messages=MSG)
    assert err.value.status_code == 400 and err.value.error == '"emb" does not support chat'


def test_list_show_ps_and_keep_alive(server, client):
    names = sorted(m.model for m in client.list().models)
    assert names == ["emb:latest", "m1:latest", "vis:7b"]
    info = client.show("vis:7b")
    assert "vision" in info.capabilities and info.modelinfo["general.architecture"] == "llava"
    assert info.details.family == "llava"
    assert client.ps().models == []
    loaded = client.chat(model="m1", messages=[])
    assert loaded.done_reason == "load" and loaded.message.content == ""
    client.generate(model="vis:7b", prompt="hi", keep_alive=-1)
    ps = client.ps().models
    assert [m.model for m in ps] == ["vis:7b", "m1:latest"]  # longest keep-alive first
    assert ps[0].size_vram == ps[0].size and ps[0].context_length == 4096
    assert client.chat(model="m1", messages=[], keep_alive=0).done_reason == "unload"
    client.generate(model="vis:7b", prompt="bye", keep_alive=0)
    assert client.ps().models == []
    client.chat(model="m1", messages=MSG, keep_alive=0.2, options={"num_ctx": 2048})
    assert client.ps().models[0].context_length == 2048
    wait_until(lambda: server.loaded_models() == [])


def test_format_json_and_schema(client):
    reply = client.chat(model="m1", messages=MSG, format="json")
    assert isinstance(json.loads(reply.message.content), dict)
    schema = {
        "$defs": {
            "Step": {
                "type": "object",
                "properties": {"cmd": {"type": "string"}},
                "required": ["cmd"],
            }
        },
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "score": {"type": "integer", "minimum": 3},
            "kind": {"enum": ["fix", "feat"]},
            "steps": {"type": "array", "items": {"$ref": "#/$defs/Step"}, "minItems": 2},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["ok", "score", "kind", "steps"],
    }
    for stream in (False, True):
        out = client.chat(model="m1", messages=MSG, format=schema, stream=stream)
        text = out.message.content if not stream else "".join(p.message.content for p in out)
        value = json.loads(text)
        assert validate(value, schema) == []
        assert value["score"] == 3 and value["kind"] == "fix" and len(value["steps"]) == 2


def test_schema_validator():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert validate({"a": 1}, schema) == []
    assert validate({"a": True}, schema) == ["$.a: True is not of type 'integer'"]
    assert validate({}, schema) == ["$: 'a' is a required property"]
    assert validate([], schema) == ["$: [] is not of type 'object'"]
    assert validate(example_instance(schema), schema) == []


def test_error_status_codes(server, client):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="nope", messages=MSG)
    assert err.value.status_code == 404 and err.value.error == "model 'nope' not found"
    with pytest.raises(ollama.ResponseError) as err:
        list(client.generate(model="nope:1b", prompt="x", stream=True))
    assert err.value.status_code == 404 and err.value.error == "model 'nope:1b' not found"
    for call in (lambda: client.show("nope"), lambda: client.embed(model="nope", input="x")):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="m1", prompt="what is this", images=[b"\x89PNG fake"])
    assert err.value.status_code == 400
    assert err.value.error == "registry.ollama.ai/library/m1:latest does not support vision"
    img = {"role": "user", "content": "describe", "images": [b"\x89PNG fake"]}
    assert client.chat(model="vis:7b", messages=[img]).message.content
    r = httpx.post(server.url + "/api/chat", json={"model": "", "messages": MSG})
    assert (r.status_code, r.json()) == (400, {"error": "model is required"})
    r = httpx.post(server.url + "/api/generate", json={"model": "", "prompt": "x"})
    assert (r.status_code, r.json()) == (404, {"error": "model '' not found"})
    r = httpx.post(server.url + "/api/show", content=b"")
    assert (r.status_code, r.json()) == (400, {"error": "missing request body"})


def test_overload_returns_503(client):
    with OllamaTestServer(models=["m1"], num_parallel=1, max_queue=1) as srv:
        c = ollama.Client(host=srv.url, timeout=10)
        srv.stall(0.5, n=2)
        threads = [threading.Thread(target=c.chat, args=("m1", MSG)) for _ in range(2)]
        threads[0].start()
        wait_until(lambda: srv.stats.concurrency("m1") == 1)
        threads[1].start()
        wait_until(lambda: srv.stats.concurrency("m1") == 2)
        with pytest.raises(ollama.ResponseError) as err:
            c.chat(model="m1", messages=MSG)
        assert err.value.status_code == 503 and err.value.error == BUSY_MESSAGE
        for t in threads:
            t.join()
        assert srv.stats.statuses[("/api/chat", 503)] == 1
        assert srv.stats.peak("m1") == 2 and srv.stats.peak_running("m1") == 1
        assert len(srv.stats.calls) == 2


def test_injected_faults(server, client):
    server.fail_mid_stream(after_tokens=2, message="runner died")
    parts = []
    with pytest.raises(ollama.ResponseError) as err:
        for part in client.chat(model="m1", messages=MSG, stream=True):
            parts.append(part)
    assert err.value.status_code == -1 and err.value.error == "runner died"
    assert len(parts) == 2
    server.fail_mid_stream()
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="m1", messages=MSG)
    assert err.value.status_code == 500
    server.fail_next(2, status=500, message="boom")
    for _ in range(2):
        with pytest.raises(ollama.ResponseError) as err:
            client.generate(model="m1", prompt="x")
        assert (err.value.status_code, err.value.error) == (500, "boom")
    assert client.generate(model="m1", prompt="x").done
    server.stall(1.0)
    with ollama.Client(host=server.url, timeout=0.2) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            list(impatient.generate(model="m1", prompt="x", stream=True))
    server.clear_faults()


def test_refuse_connections_keeps_port(server, client):
    port = server.port
    assert client.chat(model="m1", messages=MSG).done
    server.refuse_connections()
    assert not server.running
    with pytest.raises(ConnectionError):
        client.chat(model="m1", messages=MSG)
    with pytest.raises(httpx.ConnectError):
        list(client.chat(model="m1", messages=MSG, stream=True))
    server.accept_connections()
    assert server.port == port and client.chat(model="m1", messages=MSG).done


def test_stop_breaks_streams_in_flight():
    with OllamaTestServer(models=["m1"], token_latency=0.05) as srv:
        c = ollama.Client(host=srv.url, timeout=10)
        stream = c.chat(model="m1", messages=MSG, stream=True)
        next(stream)
        srv.stop()
        with pytest.raises(httpx.HTTPError):
            list(stream)
        wait_until(lambda: srv.stats.concurrency("m1") == 0)


def test_peak_concurrency_under_threads():
    with OllamaTestServer(models=[ModelSpec("m1", parallel=3)], token_latency=0.01) as srv:
        barrier = threading.Barrier(8)

        def call():
            with ollama.Client(host=srv.url, timeout=30) as c:
                barrier.wait()
                return c.chat(model="m1", messages=MSG)

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert srv.stats.peak_running("m1") == 3
        assert 3 < srv.stats.peak("m1") <= 8
        assert srv.stats.concurrency("m1") == 0 and len(srv.stats.calls) == 8

    with OllamaTestServer(models=[ModelSpec("m1", parallel=8)], token_latency=0.005) as srv:
        gate = threading.Semaphore(2)

        def gated():
            with gate, ollama.Client(host=srv.url, timeout=30) as c:
                c.generate(model="m1", prompt="p")

        threads = [threading.Thread(target=gated) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert srv.stats.peak("m1") == 2


def test_two_instances_side_by_side():
    with OllamaTestServer(models=["a"]) as one, OllamaTestServer(models=["b"]) as two:
        assert one.port != two.port
        ca, cb = ollama.Client(host=one.url), ollama.Client(host=two.url)
        assert [m.model for m in ca.list().models] == ["a:latest"]
        assert [m.model for m in cb.list().models] == ["b:latest"]
        reply = cb.generate(model="b", prompt="same prompt")
        with pytest.raises(ollama.ResponseError):
            ca.generate(model="b", prompt="same prompt")
        assert one.stats.total(model="b") == 1 and two.stats.total(model="b") == 1
        assert two.stats.tokens("b") == (reply.prompt_eval_count, reply.eval_count)
        assert one.stats.calls == []
