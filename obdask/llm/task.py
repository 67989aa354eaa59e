"""Model tasks: a bare ``@file:spec.md`` step answered by its role's Ollama model.

The role's system prompt, the spec and the outputs of the step's
dependencies go to the model (:func:`obdask.llm.client.call_model`: endpoint
pool, per-model caps, budgets, token accounting).  The reply is stored as an
artifact: a unified diff when the reply is one (fenced or bare), otherwise
the text.  A dependent step reads it with ``@file:job:<step id>``, e.g.
``@file:job:gen#apply`` applies the diff a model wrote.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from obdask import config
from obdask.exceptions import ModelError

if TYPE_CHECKING:
    from obdask.compile import JobSpec
    from obdask.context import RunContext

logger = logging.getLogger(__name__)

ROLE_PROMPTS = {
    "orchestrator": "You are the orchestrator of a coding team. Choose the next step and "
                    "justify it briefly. Never write code yourself.",
    "coder": "You are an expert software engineer. Answer with exactly one unified diff "
             "(paths relative to the repository root, a/ and b/ prefixes) and nothing else, "
             "unless the task asks for file contents.",
    "researcher": "You are a careful researcher. Extract the facts the task needs, cite "
                  "where each comes from, and structure your findings.",
    "vision": "You are a vision expert. Describe what the images show that matters to the "
              "task, precisely.",
}
DEP_OUTPUT_LIMIT = 16_000  # characters of each dependency's output put in the prompt
_FENCE_RE = re.compile(r"```(?:diff|patch)?\s*\n(.*?)```", re.DOTALL)


def system_prompt(role: str) -> str:
    """``obdask.llm.system-prompts.<role>``, else the built-in prompt for the role."""
    custom = (config.get("llm.system-prompts") or {}).get(role)
    return custom or ROLE_PROMPTS.get(role, ROLE_PROMPTS["coder"])


def extract_diff(text: str) -> str | None:
    """The unified diff in a reply (fenced or bare), or None."""
    for block in _FENCE_RE.findall(text):
        if "\n+++ " in block or block.startswith("--- "):
            return block if block.endswith("\n") else block + "\n"
    start = text.find("--- ")
    if start >= 0 and "\n+++ " in text[start:] and "\n@@" in text[start:]:
        body = text[start:]
        return body if body.endswith("\n") else body + "\n"
    return None


def _dependency_context(ctx: RunContext, deps: Sequence[dict[str, Any]]) -> str:
    parts = []
    for dep in deps:
        key = dep.get("reply") or dep.get("stdout")
        if not key:
            continue
        text = ctx.artifacts.get(key).decode(errors="replace")[:DEP_OUTPUT_LIMIT]
        parts.append(f"### Output of step {dep.get('step')}\n{text}")
    return "\n\n".join(parts)


def _endpoints(ctx: RunContext) -> list[str] | None:
    from obdask.llm.pool import endpoint_urls

    if ctx.llm_endpoints:
        return list(ctx.llm_endpoints)
    local = config.get("llm.local-endpoint")
    if config.get("llm.endpoints") or local or _worker_endpoint():
        return None  # the worker's own configuration
    # OLLAMA_HOST, else the official client's default http://127.0.0.1:11434
    return endpoint_urls()


def _worker_endpoint() -> str | None:
    try:
        from distributed import get_worker

        from obdask.server.worker import state_of

        return state_of(get_worker()).local_endpoint
    except (ImportError, ValueError):
        return None


def run_model_task(spec: JobSpec, ctx: RunContext,
                   deps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Run one model task; returns the job record fields (reply artifact, tokens)."""
    from obdask.payloads.read import read_payload_file

    endpoints = _endpoints(ctx)
    if spec.payload.prefix == "doc":  # @doc:LLM_TASK <task> (policy llm_doc_tasks=true)
        text = spec.payload.body[len("LLM_TASK"):].strip()
    else:
        text = read_payload_file(spec, ctx, deps).decode(errors="replace").strip()
    if not text:
        raise ModelError(f"job {spec.key}: spec {spec.payload.body} is empty; write the task "
                         "for the model in it")
    role = spec.model or config.get("placement.default-role") or "coder"
    model = ctx.llm_models.get(role, role)
    prompt = text
    context = _dependency_context(ctx, deps)
    if context:
        prompt += "\n\n## Results of earlier steps\n\n" + context
    from obdask.llm.client import call_model

    messages = [{"role": "system", "content": system_prompt(role)},
                {"role": "user", "content": prompt}]
    reply = call_model(model, messages, job=spec.key, plan=spec.plan_id,
                       timeout=spec.timeout if spec.timeout else None, endpoints=endpoints)
    diff = extract_diff(reply.text)
    content = (diff if diff is not None else reply.text).encode()
    return {
        "model": reply.model, "role": role, "endpoint": reply.endpoint,
        "prompt_eval_count": reply.prompt_eval_count, "eval_count": reply.eval_count,
        "tokens": reply.total_tokens, "model_attempts": reply.attempts,
        "done_reason": reply.done_reason,
        "reply": ctx.artifacts.put(content), "reply_kind": "diff" if diff is not None else "text",
    }
