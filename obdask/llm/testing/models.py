"""Installed-model specs and the wire-format helpers of the Ollama test server.

:class:`ModelSpec` describes one model the server pretends to have; the helpers
count tokens (:func:`count_tokens`), split replies into streamed pieces, parse
``keep_alive`` durations and format names and timestamps the way Ollama does.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from obdask.llm.tokens import count_tokens  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
MODEL_PATHS = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings")
_PIECE_RE = re.compile(r"\s*(?:\w+|[^\w\s])")
_FOREVER = float("inf")


def split_pieces(text: str) -> list[str]:
    """Split ``text`` into the fragments the server streams (one token each, whitespace kept)."""
    pieces = _PIECE_RE.findall(text)
    tail = text[len("".join(pieces)) :]
    if tail:
        if pieces:
            pieces[-1] += tail
        else:
            pieces = [tail]
    return pieces


def canonical_name(name: str) -> str:
    """Return ``name`` with the default ``:latest`` tag added when it has no tag."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def _full_name(name: str) -> str:
    base = canonical_name(name)
    parts = base.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    return "/".join(parts)


def _rfc3339(ts: float | None = None) -> str:
    dt = datetime.now(timezone.utc) if ts is None else datetime.fromtimestamp(ts, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any, default: float) -> float:
    """Parse an Ollama ``keep_alive`` (seconds or Go duration) into seconds; <0 is forever."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise ValueError(f"invalid keep_alive {value!r}")
    if isinstance(value, (int, float)):
        return _FOREVER if value < 0 else float(value)
    text = str(value).strip()
    sign = -1.0 if text.startswith("-") else 1.0
    parts = re.findall(r"([0-9.]+)(ns|us|µs|ms|s|m|h)", text.lstrip("+-"))
    if not parts or "".join(n + u for n, u in parts) != text.lstrip("+-"):
        raise ValueError(f'time: missing unit in duration "{text}"')
    seconds = sign * sum(float(n) * _GO_UNITS[u] for n, u in parts)
    return _FOREVER if seconds < 0 else seconds


@dataclass
class ModelSpec:
    """One model the test server pretends to have installed.

    Parameters
    ----------
    name : str
        ``name[:tag]``; ``:latest`` is added when no tag is given.
    capabilities : tuple of str
        Subset of ``completion, tools, insert, vision, embedding, thinking``.
    size : int
        Bytes reported by ``/api/tags`` and ``/api/ps``.
    parallel : int, optional
        Requests served at once (``OLLAMA_NUM_PARALLEL``); None uses the server default.
    family, parameter_size, quantization_level : str
        Reported in ``details``.
    context_length, embedding_length : int
        Reported in ``model_info``; ``embedding_length`` is the embedding dimension.
    size_vram : int, optional
        Bytes on GPU reported by ``/api/ps``; None means all of ``size``.
    """

    name: str
    capabilities: tuple[str, ...] = ("completion", "tools")
    size: int = 2_019_393_189
    parallel: int | None = None
    family: str = "llama"
    parameter_size: str = "3.2B"
    quantization_level: str = "Q4_K_M"
    context_length: int = 4096
    embedding_length: int = 16
    size_vram: int | None = None

    def __post_init__(self) -> None:
        self.name = canonical_name(self.name)
        self.capabilities = tuple(self.capabilities)

    @property
    def digest(self) -> str:
        """Deterministic sha256 hex digest derived from the name."""
        return hashlib.sha256(self.name.encode()).hexdigest()

    def details(self) -> dict[str, Any]:
        """The ``details`` object shared by tags, ps and show."""
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


def _as_spec(model: str | Mapping[str, Any] | ModelSpec) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str):
        return ModelSpec(model)
    return ModelSpec(**dict(model))


def _parameter_count(parameter_size: str) -> int:
    match = re.fullmatch(r"([0-9.]+)\s*([KMBT]?)", parameter_size.strip().upper())
    if not match:
        return 0
    scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[match.group(2)]
    return int(float(match.group(1)) * scale)
