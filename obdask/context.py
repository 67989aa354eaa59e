"""The run context shipped to workers with every job (picklable, config snapshot).

Workers on a remote cluster have their own ``dask.config``; the context
carries the client's resolved settings so a run behaves the same wherever
its jobs land.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from obdask import config
from obdask.artifacts import ArtifactStore
from obdask.exceptions import ConfigError
from obdask.records import RunStore

logger = logging.getLogger(__name__)


@dataclass
class CommandPolicy:
    """Resolved ``obdask.cmd`` settings."""

    allowlist: tuple[str, ...]
    allow_substitution: bool
    env_allowlist: tuple[str, ...]
    max_output: int
    limits: dict[str, Any]
    timeout: float
    pdeathsig: bool = True
    executable_dirs: tuple[str, ...] | None = None  # None: the worker's config

    @classmethod
    def from_config(cls) -> CommandPolicy:
        from obdask.payloads.cmd import check_limits

        limits = config.get("cmd.limits") or {}
        if not isinstance(limits, Mapping):
            raise ConfigError(f"obdask.cmd.limits: {limits!r} is not a mapping of limits")
        check_limits(limits)  # a bad limit fails here, before any job is submitted
        return cls(
            allowlist=config.get_str_list("cmd.allowlist"),
            allow_substitution=config.get_bool("cmd.allow-substitution"),
            env_allowlist=config.get_str_list("cmd.env-allowlist"),
            max_output=config.get_bytes("cmd.max-output"),
            limits=dict(limits),
            timeout=config.get_seconds("run.timeout"),
            pdeathsig=config.get_bool("cmd.pdeathsig"),
            executable_dirs=config.get_str_list("cmd.executable-dirs"),
        )


@dataclass(frozen=True)
class RunContext:
    """Everything a job needs besides its own spec.

    Frozen: its pickled form is computed once and cached (every task carries it),
    so a field changed afterwards would ship stale; ``dataclasses.replace`` makes a
    new context with a cache of its own.
    """

    run_id: str
    plan_id: str
    workspace: str
    plan_folder: str
    artifacts: ArtifactStore
    records: RunStore
    command: CommandPolicy
    storage_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    llm_endpoints: tuple[str, ...] = ()  # the client's Ollama endpoints; () = the worker's
    llm_models: dict[str, str] = field(default_factory=dict)  # role -> model name

    def __reduce__(self):
        # Every task of a run carries the context: pickle its fields once (the
        # scheduler re-sends it with each task) and unpickle once per process.
        blob = self.__dict__.get("_blob")
        if blob is None:
            state = {f.name: getattr(self, f.name) for f in fields(self)}
            blob = self.__dict__["_blob"] = pickle.dumps(state, protocol=5)
        return (_restore, (blob,))

    def __dask_tokenize__(self) -> tuple[str, str]:
        # One hash of the pickled fields per run, not a generic normalisation per task.
        token = self.__dict__.get("_token")
        if token is None:
            self.__reduce__()  # computes the blob
            token = self.__dict__["_token"] = hashlib.sha1(self.__dict__["_blob"]).hexdigest()
        return ("obdask.RunContext", token)

    @staticmethod
    def llm_from_config() -> tuple[tuple[str, ...], dict[str, str]]:
        """The client's endpoints (config + ``OLLAMA_HOST``) and role -> model names."""
        endpoints = list(config.get("llm.endpoints") or [])
        if os.environ.get("OLLAMA_HOST"):
            endpoints.append(os.environ["OLLAMA_HOST"])
        if endpoints:
            from obdask.llm.pool import normalize_url

            endpoints = [normalize_url(e) for e in endpoints]  # ConfigError if malformed
        models = {role: entry.get("model") if isinstance(entry, dict) else entry
                  for role, entry in (config.get("placement.models") or {}).items()}
        return tuple(endpoints), {k: v for k, v in models.items() if v}

    def options_for(self, url: str) -> dict[str, Any]:
        """fsspec storage options for ``url``'s protocol (``obdask.storage-options``)."""
        return config.storage_options(url, self.storage_options)

    def resolve(self, path: str) -> str:
        """A payload path as a URL: relative paths are relative to the plan's folder."""
        if "://" in path or path.startswith("/"):
            return path
        return os.path.join(self.plan_folder, path)


@functools.lru_cache(maxsize=32)
def _restore(blob: bytes) -> RunContext:
    return RunContext(**pickle.loads(blob))
