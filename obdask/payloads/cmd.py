"""The ``@cmd:`` payload: run a checked shell line on a Dask worker.

Plans written for the single-machine tool contain lines such as
``@cmd:echo hi > out.txt && pytest -q | tee log``.  They still run through
the shell (``obdask.cmd.shell``, ``/bin/sh -c``) in a working directory, but:

* :func:`check_command` first reads the line statically and refuses it with
  :class:`~obdask.exceptions.CommandRefused` unless every executable is on
  ``obdask.cmd.allowlist``; nothing runs when the check fails;
* :func:`run_command` runs it with a reduced environment, resource limits,
  a wall timeout that kills the whole process group, and bounded output;
  if the worker dies, a watchdog (:mod:`obdask.payloads.reaper`) kills the
  command's process group, so no orphan finishes a side effect while Dask
  runs the job again elsewhere (process mechanics: :mod:`obdask.payloads.launch`).

The allowlist is a guard against accidents (an LLM-written ``rm -rf``), not a
sandbox: allowed programs such as ``python``, ``make``, ``npm`` or ``git`` can
run arbitrary code of their own.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import dask

from obdask import config as _config
from obdask.exceptions import ConfigError, PayloadError
from obdask.payloads.launch import LAUNCHERS, LIMIT_KEYS, collect, reap, spawn
from obdask.payloads.shell import find_commands
from obdask.redact import redact, redact_bytes

if TYPE_CHECKING:
    from obdask.compile import JobSpec
    from obdask.context import RunContext

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None  # type: ignore[assignment]

__all__ = ["CommandResult", "check_command", "execute_command", "run_command"]

logger = logging.getLogger(__name__)

@dataclass
class CommandResult:
    """Outcome of one :func:`run_command` call (picklable).

    Attributes
    ----------
    command : str
        The shell line as given.
    exit_code : int
        Exit status of the shell; ``-N`` when it was killed by signal ``N``.
    stdout, stderr : bytes
        The first ``max_output`` bytes of each stream.
    stdout_bytes, stderr_bytes : int
        Total bytes written to each stream (kept or not).
    duration_s : float
        Wall time from start to the shell's exit.
    timed_out : bool
        Whether the wall timeout expired and the process group was killed.
    pid : int
        Process id of the shell (also its process-group id).
    """

    command: str
    exit_code: int
    stdout: bytes
    stderr: bytes
    stdout_bytes: int
    stderr_bytes: int
    duration_s: float
    timed_out: bool
    pid: int

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0 within its timeout."""
        return self.exit_code == 0 and not self.timed_out

    @property
    def truncated(self) -> bool:
        """True when stdout or stderr was longer than what was kept."""
        return self.stdout_bytes > len(self.stdout) or self.stderr_bytes > len(self.stderr)


@dataclass(frozen=True)
class _Settings:
    allowlist: frozenset[str]
    allow_substitution: bool
    executable_dirs: frozenset[str]
    env_allowlist: tuple[str, ...]
    shell: str
    max_output: int
    timeout: float | None
    rlimits: tuple[tuple[int, int, int], ...]   # (resource, soft, hard)
    pdeathsig: bool
    launcher: str


_settings_cache: tuple[Any, _Settings] | None = None


def _settings() -> _Settings:
    """Parsed ``obdask.cmd`` config, re-parsed only when dask.config changed."""
    global _settings_cache
    raw = (dask.config.get("obdask.cmd", default={}),
           dask.config.get("obdask.run.timeout", default=None))
    cached = _settings_cache
    if cached is not None and cached[0] == raw:
        return cached[1]
    settings = _parse_settings(*raw)
    # dask.config.set mutates nested dicts in place: keep a private copy to compare with
    _settings_cache = (copy.deepcopy(raw), settings)
    return settings


def _parse_settings(cfg: Mapping[str, Any], timeout: Any) -> _Settings:
    def key(name: str) -> Any:
        return cfg.get(name, cfg.get(name.replace("-", "_")))

    allow = _config.get_str_list("cmd.allowlist", key("allowlist") or [])
    shell = key("shell") or "/bin/sh"
    max_output = key("max-output")
    max_output = _config.get_bytes("cmd.max-output", "1MiB" if max_output is None else max_output)
    return _Settings(
        allowlist=frozenset(str(a) for a in allow),
        allow_substitution=bool(key("allow-substitution")),
        executable_dirs=frozenset(_config.get_str_list(
            "cmd.executable-dirs", key("executable-dirs") or [])),
        env_allowlist=_config.get_str_list("cmd.env-allowlist", key("env-allowlist") or []),
        shell=str(shell),
        max_output=max_output,
        timeout=_parse_timeout(timeout),
        rlimits=_parse_limits(key("limits") or {}),
        pdeathsig=bool(key("pdeathsig") if key("pdeathsig") is not None else True),
        launcher=_parse_launcher(key("launcher")),
    )


def _parse_launcher(value: Any) -> str:
    launcher = str(value or "spawn")
    if launcher not in LAUNCHERS:
        raise ConfigError(f"obdask.cmd.launcher: {value!r} is not one of {', '.join(LAUNCHERS)}")
    return launcher


def _parse_timeout(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):  # the per-job fast path: already seconds
        return float(value) if value > 0 else None
    seconds = _config.get_seconds("run.timeout", value)
    return seconds if seconds > 0 else None


def _limits_with(limits: Mapping[str, Any]) -> tuple[tuple[int, int, int], ...]:
    """``obdask.cmd.limits`` overridden by ``limits``, parsed once per distinct pair."""
    base = dask.config.get("obdask.cmd.limits", default={}) or {}
    try:
        return _merged_limits(tuple(base.items()), tuple(limits.items()))
    except TypeError:  # an unhashable value: parse without the cache
        return _merged_limits.__wrapped__(tuple(base.items()), tuple(limits.items()))


@lru_cache(maxsize=64)
def _merged_limits(base: tuple[tuple[str, Any], ...], override: tuple[tuple[str, Any], ...]
                   ) -> tuple[tuple[int, int, int], ...]:
    merged = {str(k).replace("_", "-"): v for k, v in base}
    merged.update({str(k).replace("_", "-"): v for k, v in override})
    return _parse_limits(merged)


def check_limits(limits: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` if ``obdask.cmd.limits``-style ``limits`` are invalid."""
    _parse_limits(limits)


def _parse_limits(limits: Mapping[str, Any]) -> tuple[tuple[int, int, int], ...]:
    """``obdask.cmd.limits`` -> ``(resource, soft, hard)``, clamped to the current hard limits.

    A null value leaves that limit as inherited.  The hard limit is never raised
    (an unprivileged process could not); the soft limit is ``min(value, hard)``.
    """
    if resource is None:
        return ()
    out = []
    for name, value in limits.items():
        canon = str(name).replace("_", "-")
        if canon not in LIMIT_KEYS:
            raise ConfigError(f"obdask.cmd.limits.{name}: unknown limit "
                              f"(use one of {', '.join(LIMIT_KEYS)})")
        if value is None:
            continue
        rname, kind, _ = LIMIT_KEYS[canon]
        full = f"cmd.limits.{canon}"
        if kind == "bytes":
            want = _config.get_bytes(full, value)
        elif kind == "seconds":
            want = int(max(1.0, _config.get_seconds(full, value)))
        else:
            want = _config.get_int(full, value, minimum=None)
            if want < 0:
                raise ConfigError(f"obdask.{full}: {value!r} is negative")
        rid = getattr(resource, rname, None)
        if rid is None:  # pragma: no cover - platform without this limit
            continue
        hard = resource.getrlimit(rid)[1]
        soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        out.append((rid, max(soft, 0), hard))
    return tuple(out)


def check_command(command: str, allowlist: Iterable[str] | None = None,
                  allow_substitution: bool | None = None,
                  executable_dirs: Iterable[str] | None = None) -> list[str]:
    """Check a shell line statically; return the executable of every simple command.

    The line is tokenized as POSIX ``sh`` does it: quotes and escapes, the
    operators ``&& || ; | &`` and newlines, redirections (``>``, ``>>``, ``<``,
    ``2>&1``, ``2>file``, here-documents), subshells ``( ... )``, groups
    ``{ ...; }``, leading ``VAR=value`` assignments, comments, and the compound
    commands ``if/then/elif/else/fi``, ``while``/``until``/``for ... do/done``
    and ``!``.  ``case``, ``[[ ]]``, function definitions and ``;;`` are
    refused as unsupported.

    Rules:

    * every executable must be on the allowlist.  A word naming a path
      (``.venv/bin/python``, ``/usr/bin/git``) is allowed when the path itself
      or its **basename** is listed **and** its directory is one of
      ``obdask.cmd.executable-dirs`` (default: the system ``bin`` folders):
      ``./ls`` or ``b/cat`` could be any file copied there.  ``PATH=``,
      ``LD_*=`` and similar assignments (also through ``env`` and ``export``)
      are refused, and so are the obvious ways allowed programs run or write
      anything (``git -c core.fsmonitor=``, ``make --eval``, ``awk system()``,
      ``sed e``/``w``, ``find -delete``/``-exec``...:
      :mod:`obdask.payloads.argcheck`);
    * an executable must be a literal word: ``$CMD``, ``"$(which x)"`` or a
      pattern such as ``py*`` is refused (its value is unknown until run time);
    * ``$(...)``, backticks and ``<(...)`` are refused unless
      ``allow_substitution``; then the commands inside are checked too, as are
      substitutions inside ``"..."``, ``${...}``, ``$((...))`` and unquoted
      here-documents;
    * commands run by ``env``, ``nice``, ``nohup``, ``timeout``, ``stdbuf``,
      ``time``, ``command``, ``builtin``, ``exec``, ``xargs`` (default ``echo``)
      and ``find -exec/-execdir/-ok/-okdir`` are checked too, and so is the
      string of ``eval`` and of ``sh``/``bash ... -c STRING`` when those are
      allowlisted (they are not by default, nor are ``exec``, ``source`` and
      ``.``).  A script file given to an allowlisted shell is not read.

    Parameters
    ----------
    command : str
        The shell line (without the ``@cmd:`` prefix).
    allowlist : iterable of str, optional
        Allowed executable names; default ``obdask.cmd.allowlist``.
    allow_substitution : bool, optional
        Default ``obdask.cmd.allow-substitution``.
    executable_dirs : iterable of str, optional
        Default ``obdask.cmd.executable-dirs``.

    Returns
    -------
    list of str
        The executables as written, in order of appearance (repeats kept).

    Raises
    ------
    CommandRefused
        Naming the offending executable or construct and how to allow it.
    """
    if isinstance(allowlist, str):
        allowlist = [allowlist]
    settings = _settings()
    allow = settings.allowlist if allowlist is None else frozenset(allowlist)
    if allow_substitution is None:
        allow_substitution = settings.allow_substitution
    dirs = (settings.executable_dirs if executable_dirs is None
            else frozenset([executable_dirs] if isinstance(executable_dirs, str)
                           else executable_dirs))
    return list(_check_cached(command, allow, bool(allow_substitution), dirs))


@lru_cache(maxsize=512)
def _check_cached(command: str, allow: frozenset[str], allow_sub: bool,
                  dirs: frozenset[str]) -> tuple[str, ...]:
    return tuple(find_commands(command, allow, allow_sub, dirs))


def run_command(command: str, cwd: str | os.PathLike[str], *, timeout: float | None = None,
                env: Mapping[str, str] | None = None, extra_env: Mapping[str, str] | None = None,
                max_output: int | None = None, limits: Mapping[str, Any] | None = None,
                allowlist: Iterable[str] | None = None,
                allow_substitution: bool | None = None,
                env_allowlist: Iterable[str] | None = None,
                pdeathsig: bool | None = None,
                executable_dirs: Iterable[str] | None = None,
                network: bool = False) -> CommandResult:
    """Check ``command`` and run it with ``obdask.cmd.shell -c`` in ``cwd``.

    The child runs in a new session (its own process group) with stdin from
    ``/dev/null``, an environment made of the ``obdask.cmd.env-allowlist``
    variables of ``env`` plus ``extra_env``, and the ``obdask.cmd.limits``
    rlimits.  When the wall timeout expires the whole group gets SIGTERM, then
    SIGKILL after a short grace.  Background jobs still in the group when the
    shell exits are killed too (SIGKILL): a step that starts background work
    must ``wait`` for it.  A process that left the group (``setsid``) is not
    killed, and its output is read only for a moment after the shell exits.

    Parameters
    ----------
    command : str
        Shell line, checked with :func:`check_command` first.
    cwd : str or path
        Working directory; must exist.
    timeout : float, optional
        Wall timeout in seconds; default ``obdask.run.timeout``; ``<= 0`` or a
        null config value: none.
    env : mapping, optional
        Source environment to filter; default ``os.environ``.
    extra_env : mapping, optional
        Variables added after filtering (not filtered).
    max_output : int, optional
        Bytes of stdout and of stderr kept (the first ones); default
        ``obdask.cmd.max-output``.  Totals are counted in full.
    limits : mapping, optional
        Overrides of ``obdask.cmd.limits`` keys (``cpu-seconds``,
        ``address-space``, ``file-size``, ``processes``); ``None`` values
        leave a limit as inherited.
    allowlist, allow_substitution, executable_dirs : optional
        Passed to :func:`check_command`; default from config.
    env_allowlist : iterable of str, optional
        Variables kept from ``env``; default ``obdask.cmd.env-allowlist``.
    pdeathsig : bool, optional
        Kill the shell when this process dies; default ``obdask.cmd.pdeathsig``.
    network : bool
        Let this command use the host's network inside the sandbox (a step's
        ``network=true``); ``obdask.cmd.sandbox.network: true`` does it for all.

    Returns
    -------
    CommandResult

    Raises
    ------
    CommandRefused
        If the check fails (nothing is run).
    PayloadError
        If ``cwd`` or the shell does not exist, or the child cannot be set up.
    """
    settings = _settings()
    if isinstance(allowlist, str):
        allowlist = [allowlist]
    allow = settings.allowlist if allowlist is None else frozenset(allowlist)
    allow_sub = settings.allow_substitution if allow_substitution is None else allow_substitution
    dirs = (settings.executable_dirs if executable_dirs is None
            else frozenset(executable_dirs))
    _check_cached(command, allow, bool(allow_sub), dirs)
    wall = settings.timeout if timeout is None else _parse_timeout(timeout)
    if max_output is None or isinstance(max_output, int):
        keep = settings.max_output if max_output is None else max_output
    else:
        keep = _config.get_bytes("cmd.max-output", max_output)
    rlimits = settings.rlimits
    if limits:
        rlimits = _limits_with(limits)
    keep_vars = settings.env_allowlist if env_allowlist is None else env_allowlist
    if env is None:
        child_env = _environ_subset(tuple(keep_vars))
    else:
        child_env = {k: env[k] for k in keep_vars if k in env}
    if extra_env:
        child_env.update(extra_env)
    if "PATH" in child_env:
        child_env["PATH"] = _safe_path(child_env["PATH"], cwd)

    start = time.monotonic()
    proc = spawn(settings.shell, command, cwd, child_env, rlimits,
                  settings.pdeathsig if pdeathsig is None else pdeathsig, settings.launcher,
                  network=network)
    logger.debug("@cmd: pid %d in %s: %s", proc.pid, cwd, command)
    try:
        out, err, nout, nerr, timed_out = collect(proc, wall, keep)
    finally:
        reap(proc)
    duration = time.monotonic() - start
    if timed_out:
        logger.warning("@cmd: timed out after %.1fs, process group %d killed: %s",
                       duration, proc.pid, redact(command))
    return CommandResult(command, proc.returncode, out, err, nout, nerr, duration,
                         timed_out, proc.pid)


_environ_cache: tuple[Any, tuple[str, ...], dict[str, str]] = (None, (), {})


def _environ_subset(keep: tuple[str, ...]) -> dict[str, str]:
    """The variables of ``os.environ`` named in ``keep`` (a new dict each call).

    Cached until the environment changes: ``os.environ``'s own byte mapping,
    compared item by item, is an exact stamp that costs a microsecond, where
    looking up and decoding the allowlist's variables cost about 60 us a job.
    """
    global _environ_cache
    data = getattr(os.environ, "_data", None)
    if not isinstance(data, dict):  # not CPython's os.environ: no stamp to compare
        return {k: os.environ[k] for k in keep if k in os.environ}
    stamp = tuple(data.items())
    cached_stamp, cached_keep, subset = _environ_cache
    if cached_stamp != stamp or cached_keep != keep:
        subset = {k: os.environ[k] for k in keep if k in os.environ}
        _environ_cache = (stamp, keep, subset)
    return dict(subset)


def _safe_path(path: str, cwd: str | os.PathLike[str]) -> str:
    """``PATH`` without relative or empty entries and without folders in the workspace.

    A bare ``ls`` must not find a file the job (or an earlier step) put in its
    workspace: the allowlist names programs, and those live outside it.
    """
    return _safe_path_for(path, os.fspath(cwd))


@lru_cache(maxsize=64)
def _safe_path_for(path: str, cwd: str) -> str:
    # The workspace's real path is resolved once per (PATH, workspace) too: realpath()
    # cost ~30 us a job, and the reasoning below holds for it as well.
    return _safe_path_in(path, os.path.realpath(cwd))


@lru_cache(maxsize=64)
def _safe_path_in(path: str, root: str) -> str:
    # Cached per (PATH, real workspace): resolving a dozen PATH entries is ~1 ms a job.
    # What this guards against is configuration (a PATH entry that is or resolves into
    # the workspace); a job able to re-point a PATH entry into its workspace can write
    # a program into that entry directly, so a fresh resolution would not stop it.
    keep = []
    for entry in path.split(os.pathsep):
        if not os.path.isabs(entry):
            continue
        real = os.path.realpath(entry)
        if real == root or real.startswith(root.rstrip("/") + "/"):
            continue
        keep.append(entry)
    return os.pathsep.join(keep)


def _store(ctx: RunContext, data: bytes) -> str | None:
    """Artifact key of a non-empty stream, secrets masked (empty output stores nothing)."""
    return ctx.artifacts.put(redact_bytes(data)) if data else None


def execute_command(spec: JobSpec, ctx: RunContext,
                    deps: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Run a job's ``@cmd:`` payload in the run's workspace; return record fields.

    Settings come from ``ctx.command`` (the client's config snapshot) and the
    job's own ``timeout``; ``ctx.env`` is added to the filtered environment.
    stdout and stderr are stored in ``ctx.artifacts``; the record gets their
    digests, sizes, ``exit_code`` and ``timed_out``.

    Raises
    ------
    CommandRefused
        The line failed the check (nothing ran).
    PayloadError
        Non-zero exit or timeout; ``.exit_code`` and ``.fields`` (the record
        fields above) are attached for the job record.
    """
    policy = ctx.command
    # the step's timeout= (0: no wall timeout, as run_command reads <= 0), else the run's
    timeout = policy.timeout if spec.timeout is None else spec.timeout
    body = spec.payload.body
    try:
        res = run_command(
            body, ctx.workspace, timeout=timeout, extra_env=ctx.env or None,
            max_output=policy.max_output, limits=policy.limits, allowlist=policy.allowlist,
            allow_substitution=policy.allow_substitution, env_allowlist=policy.env_allowlist,
            pdeathsig=policy.pdeathsig, executable_dirs=policy.executable_dirs,
            network=getattr(spec, "network", False),
        )
    except PayloadError as exc:
        raise type(exc)(f"job {spec.key}: {exc}") from None
    fields: dict[str, Any] = {
        "exit_code": res.exit_code, "timed_out": res.timed_out,
        "stdout": _store(ctx, res.stdout), "stderr": _store(ctx, res.stderr),
        "stdout_bytes": res.stdout_bytes, "stderr_bytes": res.stderr_bytes,
        "command_s": res.duration_s,
    }
    if res.ok:
        return fields
    if res.timed_out:
        message = f"job {spec.key}: @cmd: timed out after {timeout:g}s (process group killed)"
    else:
        tail = res.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        message = f"job {spec.key}: @cmd: exit code {res.exit_code}: {body}"
        if tail[0]:
            message += f" (stderr: {tail[0][:200]})"
    error = PayloadError(redact(message))
    error.exit_code = res.exit_code  # type: ignore[attr-defined]
    error.fields = fields  # type: ignore[attr-defined]
    raise error
