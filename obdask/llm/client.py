"""One model call from inside a Dask task: failover, slots, budgets, token records.

:func:`call_model` is what obdask's job runner calls for an LLM step.  Per call:

1. the role is mapped to a model (``obdask.placement.models.<role>.model``);
2. candidate endpoints are those whose ``/api/tags`` list the model, healthy
   ones first (see :mod:`obdask.llm.pool`);
3. a slot on one of them is taken (``distributed.Semaphore`` per endpoint and model);
4. the worst-case tokens are reserved in the matching budgets (:mod:`obdask.llm.budget`);
5. the request streams through ``ollama.Client(host=..., timeout=...)``; a
   request running past ``timeout`` is cancelled;
6. failures are sorted: refused connections, 5xx and timeouts mark the
   endpoint down and move on; 503 (busy) and timeouts back off exponentially;
   404 drops the endpoint; 400 fails at once with :class:`~obdask.exceptions.ModelError`;
7. the final chunk's counts settle the reservation, become a token record
   (``worker.log_event("obdask-tokens", record)`` inside a worker), and
8. with a JSON-schema ``fmt`` the reply is validated, and asked again once.
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from obdask import config
from obdask.exceptions import ModelError
from obdask.llm import budget as _budget
from obdask.llm.pool import (
    EndpointPool,
    SlotLease,
    canonical_model,
    dask_context,
    get_pool,
    resolve_model,
)
from obdask.llm.schema import validate

logger = logging.getLogger(__name__)

TOKENS_TOPIC = "obdask-tokens"
_DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
_recent: deque[dict[str, Any]] = deque(maxlen=10_000)


@dataclass
class ModelReply:
    """Result of :func:`call_model`.

    Attributes
    ----------
    text : str
        Assistant message content.
    model, endpoint : str
        Model name as requested and the endpoint that answered.
    prompt_eval_count, eval_count : int
        Token counts from the server's final chunk.
    durations : dict
        ``total_duration``, ``load_duration``, ``prompt_eval_duration``,
        ``eval_duration`` in nanoseconds.
    done_reason : str or None
        ``"stop"``, ``"length"``, ...
    attempts : int
        HTTP requests made (including failed ones and schema retries).
    data : object
        The parsed JSON when ``fmt`` was given, else None.
    tool_calls : list of dict
        ``[{"name": ..., "arguments": {...}}]`` if the model called tools.
    record : dict
        The token record (see :func:`token_records`).
    """

    text: str
    model: str
    endpoint: str
    prompt_eval_count: int
    eval_count: int
    durations: dict[str, int]
    done_reason: str | None
    attempts: int
    data: Any = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        """``prompt_eval_count + eval_count``."""
        return self.prompt_eval_count + self.eval_count


class _Retry(Exception):
    """An attempt failed in a way another attempt may fix."""

    def __init__(self, message: str, endpoint: str, *, down: bool, backoff: bool) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.down = down
        self.backoff = backoff


class _NotFound(Exception):
    """The endpoint answered 404 for the model."""


def token_records() -> list[dict[str, Any]]:
    """Token records of the calls made by this process (newest last, at most 10 000)."""
    return list(_recent)


def estimate_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Upper estimate of the prompt tokens: per message ``max(words+marks, chars/3) + 4``."""
    from obdask.llm.tokens import count_tokens

    total = 0
    for m in messages:
        text = str(m.get("content") or "")
        total += max(count_tokens(text), math.ceil(len(text) / 3)) + 4
    return max(1, total)


def _normalize_messages(messages: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    out = [dict(m) for m in messages]
    for m in out:
        if "role" not in m:
            raise ModelError(f"message {m!r} has no 'role'; use {{'role': 'user', 'content': ...}}")
    return out


def _local_endpoint(local: str | None) -> str | None:
    """Explicit value, else the worker's local endpoint (preload), else config."""
    if local:
        return local
    kind, ctx = dask_context()
    if kind == "worker":
        from obdask.server.worker import state_of

        if state_of(ctx).local_endpoint:
            return state_of(ctx).local_endpoint
    return config.get("llm.local-endpoint")


@dataclass
class _CallSpec:
    """Everything one :func:`call_model` needs, resolved once."""

    model: str
    messages: list[dict[str, Any]]
    fmt: Any
    options: dict[str, Any]
    keep_alive: Any
    job: str | None
    plan: str | None
    timeout: float
    attempts: int
    backoff: float
    backoff_max: float
    slot_timeout: float | None
    reserve_tokens: int
    num_predict: int
    role: str | None = None
    attempts_made: int = 0
    session: str | None = None
    schedule: str | None = None
    process: str | None = None
    format_try: int = 0  # > 0: asked again after a reply that did not match ``fmt``

    def where(self, endpoint: str | None = None) -> str:
        """``model 'm' on http://h:1 (job 'j')`` for error messages."""
        text = f"model {self.model!r}"
        if self.role:
            text += f" (role {self.role!r})"
        if endpoint:
            text += f" on {endpoint}"
        if self.job:
            text += f" (job {self.job!r})"
        return text


def call_model(
    role_or_model: str,
    messages: str | Sequence[Mapping[str, Any]],
    *,
    fmt: str | dict[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    job: str | None = None,
    plan: str | None = None,
    timeout: float | str | None = None,
    endpoints: str | Sequence[str] | None = None,
    local_endpoint: str | None = None,
    keep_alive: str | float | None = None,
    session: str | None = None,
    schedule: str | None = None,
    process: str | None = None,
) -> ModelReply:
    """Make one chat call to an Ollama endpoint, with failover, caps and budgets.

    Parameters
    ----------
    role_or_model : str
        A role from ``obdask.placement.models`` (``"coder"``) or a model name.
    messages : str or list of dict
        Chat messages (``{"role", "content"}``); a string is one user message.
    fmt : "json" or dict, optional
        Structured output; a dict is a JSON schema the reply must match.
    options : dict, optional
        Ollama options (``temperature``, ``num_ctx``, ``num_predict``, ...).
    job, plan : str, optional
        Names recorded with the tokens; ``plan`` also selects plan budgets.
    timeout : float or str, optional
        Limit of one request; default ``obdask.llm.timeout``.
    endpoints : str or list of str, optional
        Endpoint URLs; default ``obdask.llm.endpoints`` + ``OLLAMA_HOST``.
    local_endpoint : str, optional
        Endpoint to prefer; default the worker's (``--ollama-endpoint``) or
        ``obdask.llm.local-endpoint``.
    keep_alive : str or float, optional
        Passed to Ollama.
    session : str, optional
        Session id recorded with the tokens (``obdask.metrics``); the OpenTelemetry
        GenAI name of this attribute is ``gen_ai.conversation.id``.
    schedule, process : str, optional
        The session's schedule (``"S2"``) and process (``"P1"``) the call is made
        for, recorded with the tokens.

    Returns
    -------
    ModelReply

    Raises
    ------
    ModelError
        The model is on no endpoint, the request is invalid (400), the reply
        does not match ``fmt`` after a retry, or every attempt failed.
    BudgetExceeded
        A token budget has no room (see :mod:`obdask.llm.budget`).
    """
    model = resolve_model(role_or_model)
    opts = dict(options or {})
    msgs = _normalize_messages(messages)
    num_predict = opts.get("num_predict")
    if not isinstance(num_predict, int) or num_predict < 0:
        num_predict = config.get_int("llm.num-predict", minimum=1)
    slot_timeout = config.get("llm.slot-timeout")
    spec = _CallSpec(
        model=model,
        messages=msgs,
        fmt=fmt,
        options=opts,
        keep_alive=keep_alive,
        job=job,
        plan=plan,
        timeout=config.get_seconds("llm.timeout", timeout),
        attempts=config.get_int("llm.attempts", minimum=1),
        backoff=config.get_seconds("llm.backoff"),
        backoff_max=config.get_seconds("llm.backoff-max"),
        slot_timeout=None if slot_timeout is None else config.get_seconds("llm.slot-timeout"),
        reserve_tokens=estimate_prompt_tokens(msgs) + num_predict,
        num_predict=num_predict,
        role=role_or_model if role_or_model != model else None,
        session=session,
        schedule=schedule,
        process=process,
    )
    pool = get_pool(endpoints, _local_endpoint(local_endpoint))
    tries = 1 + config.get_int("llm.schema-retries") if fmt else 1
    problems: list[str] = []
    for attempt in range(tries):
        spec.format_try = attempt
        reply = _call_with_failover(pool, spec)
        reply.data, problems = _check_format(reply.text, fmt)
        if not problems:
            return reply
        logger.warning(
            "%s: reply does not match the format: %s",
            spec.where(reply.endpoint),
            "; ".join(problems[:3]),
        )
    raise ModelError(
        f"{spec.where(reply.endpoint)} returned output that does not match the requested "
        f"format {tries} times: {'; '.join(problems[:3])}; ask for JSON in the prompt, "
        "simplify the schema or raise obdask.llm.schema-retries"
    )


def backoff_delay(delay: float, limit: float) -> float:
    """The pause before the next attempt: ``delay`` capped at ``limit``, with jitter.

    Workers that all got a 503 from one endpoint would otherwise retry in lockstep
    and hit it together again; a uniform draw in ``[delay/2, delay]`` spreads them.
    """
    capped = min(delay, limit)
    return random.uniform(capped / 2, capped)


def _check_format(text: str, fmt: Any) -> tuple[Any, list[str]]:
    """Parse and validate ``text`` for ``fmt``; returns ``(data, problems)``."""
    if not fmt:
        return None, []
    try:
        data = json.loads(text)
    except ValueError as exc:
        return None, [f"not JSON ({exc})"]
    if isinstance(fmt, dict):
        return data, validate(data, fmt)
    return data, []


def _call_with_failover(pool: EndpointPool, spec: _CallSpec) -> ModelReply:
    """Try endpoints until one answers; bounded by ``obdask.llm.attempts``."""
    not_found: list[str] = []
    busy: list[str] = []
    last = "no attempt made"
    delay = spec.backoff
    n = 0
    while n < spec.attempts:
        urls = pool.candidates(spec.model, exclude=not_found)
        if not urls:
            _raise_missing(pool, spec, not_found)
        urls = [u for u in urls if u not in busy] + [u for u in urls if u in busy]
        n += 1
        spec.attempts_made += 1
        try:
            return _attempt(pool, spec, urls)
        except _NotFound as exc:
            n -= 1  # not a failure of the service: the model is simply not there
            not_found.append(str(exc))
            pool.forget_tags(str(exc))
            continue
        except _Retry as exc:
            last = str(exc)
            url = exc.endpoint
            if exc.down:
                pool.mark_down(url, last)
            elif url not in busy:
                busy.append(url)
            logger.info("%s: attempt %d/%d failed: %s", spec.where(), n, spec.attempts, last)
            if n < spec.attempts and (exc.backoff or not any(map(pool.healthy, pool.urls))):
                time.sleep(backoff_delay(delay, spec.backoff_max))
                delay *= 2
    raise ModelError(
        f"{spec.where()}: all {spec.attempts} attempts failed, last: {last}; check the Ollama "
        f"servers ({', '.join(pool.urls)}) or raise obdask.llm.attempts / obdask.llm.timeout"
    )


def _raise_missing(pool: EndpointPool, spec: _CallSpec, not_found: list[str]) -> None:
    where = "; ".join(
        f"{u}: {'answered 404' if u in not_found else s}"
        for u, s in pool.where_is(spec.model).items()
    )
    raise ModelError(
        f"{spec.where()} is not available on any endpoint ({where}); run "
        f"`ollama pull {spec.model}` there, or fix obdask.placement.models / obdask.llm.endpoints"
    )


def _reserve(pool: EndpointPool, spec: _CallSpec, lease: SlotLease) -> tuple[SlotLease, Any]:
    """Reserve budget tokens for a call on ``lease.url``; never wait while holding the slot."""
    attrs = {"model": spec.model, "endpoint": lease.url, "plan": spec.plan, "job": spec.job}
    res = _budget.reserve(spec.reserve_tokens, timeout=0, **attrs)
    if res is not None:
        return lease, res
    url = lease.url
    lease.release()
    logger.info("%s: waiting for token budget", spec.where(url))
    res = _budget.reserve(spec.reserve_tokens, timeout=None, **attrs)
    try:
        return _acquire(pool, spec, [url]), res
    except BaseException:
        res.release()
        raise


def _acquire(pool: EndpointPool, spec: _CallSpec, urls: list[str]) -> SlotLease:
    try:
        return pool.acquire_slot(urls, spec.model, spec.slot_timeout)
    except TimeoutError as exc:
        raise ModelError(f"{spec.where()}: {exc}") from exc


def _attempt(pool: EndpointPool, spec: _CallSpec, urls: list[str]) -> ModelReply:
    """One request on the first of ``urls`` with a free slot."""
    lease = _acquire(pool, spec, urls)
    try:
        lease, res = _reserve(pool, spec, lease)
        options = dict(spec.options)
        if res.budgets:  # the reservation only holds if the output is capped
            options["num_predict"] = spec.num_predict
        try:
            final, text, tool_calls = _request(lease.url, spec, options)
        except BaseException:
            res.release()
            raise
        res.settle((final.prompt_eval_count or 0) + (final.eval_count or 0))
    finally:
        lease.release()
    pool.mark_up(lease.url)
    record = _record_tokens(final, spec, lease.url)
    return ModelReply(
        text=text,
        model=spec.model,
        endpoint=lease.url,
        prompt_eval_count=final.prompt_eval_count or 0,
        eval_count=final.eval_count or 0,
        durations={k: int(getattr(final, k) or 0) for k in _DURATIONS},
        done_reason=final.done_reason,
        attempts=spec.attempts_made,
        tool_calls=tool_calls,
        record=record,
    )


_clients = threading.local()


def _client_for(url: str, timeout: Any) -> Any:
    """One ``ollama.Client`` per (thread, endpoint, timeout), reused across calls.

    Building a client builds an httpx client and its SSL context (~20 ms);
    a model call should not pay that each time.
    """
    from obdask.llm.auth import ollama_client

    cache = getattr(_clients, "cache", None)
    if cache is None:
        cache = _clients.cache = {}
    from obdask.llm.auth import api_key_for

    key = (url, repr(timeout), api_key_for(url))  # a key set or removed later is seen
    client = cache.get(key)
    if client is None:
        client = cache[key] = ollama_client(url, timeout)
    return client


def _request(url: str, spec: _CallSpec, options: dict[str, Any]) -> tuple[Any, str, list]:
    """Stream one chat request; returns ``(final_chunk, text, tool_calls)``.

    Raises :class:`_Retry`, :class:`_NotFound` or :class:`ModelError`.
    """
    import httpx
    import ollama
    import pydantic

    where = spec.where(url)
    timeout = httpx.Timeout(spec.timeout, connect=min(spec.timeout, 10.0))
    try:
        return _consume(_client_for(url, timeout), spec, options, url)
    except ollama.ResponseError as exc:
        code = exc.status_code
        if code == 404:
            raise _NotFound(url) from exc
        if code in (429, 503):
            raise _Retry(
                f"{where}: busy ({exc.error}, HTTP {code})", url, down=False, backoff=True
            ) from exc
        if code == -1 or code >= 500:
            status = "error mid-stream" if code == -1 else f"HTTP {code}"
            raise _Retry(f"{where}: {exc.error} ({status})", url, down=True, backoff=False) from exc
        raise ModelError(
            f"{where} rejected the request: {exc.error} (HTTP {code}); check the model's "
            "capabilities (ollama show) and the options/format sent"
        ) from exc
    except (httpx.TimeoutException, TimeoutError) as exc:
        raise _Retry(
            f"{where}: timed out after {spec.timeout:g}s ({type(exc).__name__})",
            url,
            down=True,
            backoff=True,
        ) from exc
    except (ConnectionError, httpx.TransportError) as exc:
        raise _Retry(
            f"{where}: cannot connect ({type(exc).__name__}: {exc})", url, down=True, backoff=False
        ) from exc
    except (pydantic.ValidationError, ValueError) as exc:
        raise ModelError(
            f"{where} sent a reply that is not Ollama's format ({exc}); is {url} an Ollama server?"
        ) from exc


def _consume(client: Any, spec: _CallSpec, options: dict[str, Any], url: str) -> tuple:
    deadline = time.monotonic() + spec.timeout
    stream = client.chat(
        model=spec.model,
        messages=spec.messages,
        format=spec.fmt or None,
        options=options or None,
        keep_alive=spec.keep_alive,
        stream=True,
    )
    parts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    final = None
    try:
        for chunk in stream:
            parts.append(chunk.message.content or "")
            for call in chunk.message.tool_calls or []:
                tool_calls.append(
                    {"name": call.function.name, "arguments": dict(call.function.arguments)}
                )
            if chunk.done:
                final = chunk
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"generation still running after {spec.timeout:g}s")
    finally:
        stream.close()
    if final is None:
        raise _incomplete_stream(url)
    return final, "".join(parts), tool_calls


def _incomplete_stream(url: str) -> Exception:
    """The error used when a stream ends without its final ``done`` line."""
    import httpx

    return httpx.RemoteProtocolError(f"stream from {url} ended without a final done line")


def _publish(worker: Any, final: Any, spec: _CallSpec, record: dict[str, Any]) -> None:
    """Send the call's metrics record to the scheduler (one batched message)."""
    from obdask.server.worker import send_record

    row = dict(record, role=spec.role, respent=spec.format_try > 0,
               attempts=spec.attempts_made, done_reason=final.done_reason)
    for name in _DURATIONS[1:]:
        row[name] = int(getattr(final, name, 0) or 0)
    try:
        send_record("tokens", row, worker)
    except Exception:  # accounting must not fail the call
        logger.debug("could not send the metrics record %s", row, exc_info=True)


def _record_tokens(final: Any, spec: _CallSpec, url: str) -> dict[str, Any]:
    """Build the token record from the final chunk and publish it."""
    kind, ctx = dask_context()
    record = {
        "prompt_eval_count": int(final.prompt_eval_count or 0),
        "eval_count": int(final.eval_count or 0),
        "total_duration": int(final.total_duration or 0),
        "model": canonical_model(spec.model),
        "endpoint": url,
        "worker": ctx.address if kind == "worker" else None,
        "job": spec.job,
        "plan": spec.plan,
        # gen_ai.conversation.id: on every record of a session's calls (and events)
        "session": spec.session,
        "schedule": spec.schedule,
        "process": spec.process,
        "ts": time.time(),
    }
    _recent.append(record)
    if kind == "worker":
        _publish(ctx, final, spec, record)
    try:
        if kind == "worker":
            ctx.log_event(TOKENS_TOPIC, record)
        elif kind == "client" and not ctx.asynchronous:
            ctx.log_event(TOKENS_TOPIC, record)
    except Exception:  # accounting must not fail the call
        logger.warning("could not log token record %s", record, exc_info=True)
    return record
