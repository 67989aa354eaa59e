"""The bubblewrap sandbox that ``@cmd:`` jobs run in (``obdask.cmd.sandbox``).

The allowlist of :mod:`obdask.payloads.cmd` is a readable first check; this is
the boundary.  When bubblewrap (``bwrap``, Debian package ``bubblewrap``) can
run on the worker, :func:`wrap` turns ``shell -c COMMAND`` into **one**
``bwrap ... -- shell -c COMMAND`` exec (no extra shell, no Python in between)
whose child:

* has no network (``--unshare-net``: not even loopback or the host's abstract
  Unix sockets) unless ``obdask.cmd.sandbox.network`` is true;
* sees the host only through read-only binds of the system paths listed in
  ``obdask.cmd.sandbox.read-only`` (default ``/usr``, ``/etc``, ``/opt`` and
  the ``/bin``-style links), of the directories the job's ``PATH``,
  ``PYTHONPATH`` and ``VIRTUAL_ENV`` name, and of the worker's Python prefix;
  nothing of ``/run``, ``/var``, ``/home``, ``/root`` or the host's ``/tmp``
  (so no daemon's Unix socket is reachable);
* may write only to its workspace (bound read-write at its real path, and the
  working directory), the ``obdask.cmd.sandbox.writable`` paths and a private
  ``/tmp``;
* runs in new PID and IPC namespaces with a fresh ``/proc`` (no other job and
  not the worker: ``/proc/<worker>/environ`` is out of reach), a new session
  (no terminal injection), no capabilities (root inside cannot remount), and
  dies with the worker (``--die-with-parent``).  Killing the job's process
  group kills bwrap, and with it the whole PID namespace: a ``setsid``
  grandchild cannot outlive a timeout.

Without a working bwrap, mode ``auto`` logs one warning per worker process and
runs commands with rlimits only; mode ``require`` refuses
(:class:`~obdask.exceptions.SandboxUnavailable`); mode ``off`` never wraps.
rlimits still apply inside: :mod:`obdask.payloads.launch` sets them on
bwrap's child while it waits on ``--block-fd``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import dask

from obdask.exceptions import ConfigError, PayloadError, SandboxUnavailable

__all__ = ["MODES", "Policy", "confine_diff", "policy", "unavailable_reason", "wrap"]

logger = logging.getLogger(__name__)

MODES = ("auto", "require", "off")
DEFAULT_READ_ONLY = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
                     "/opt")
_ENV_KEYS = ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "HOME")
# Never bound from a job's environment: sockets and other processes' state live there.
_NEVER = ("/run", "/var/run", "/proc", "/dev", "/sys", "/tmp/.X11-unix", "/var/lib/docker")


@dataclass(frozen=True)
class Policy:
    """Parsed ``obdask.cmd.sandbox``.

    Attributes
    ----------
    mode : str
        ``auto``, ``require`` or ``off``.
    network : bool
        Share the host's network namespace (default: none).
    bwrap : str
        The bubblewrap executable.
    read_only : tuple of str
        Host paths visible read-only (missing ones are skipped).
    writable : tuple of str
        Host paths visible read-write besides the workspace.
    bind_env : bool
        Also bind the job's ``PATH``/``PYTHONPATH``/``VIRTUAL_ENV`` directories
        and the worker's Python prefix read-only.
    """

    mode: str = "auto"
    network: bool = False
    bwrap: str = "bwrap"
    read_only: tuple[str, ...] = DEFAULT_READ_ONLY
    writable: tuple[str, ...] = ()
    bind_env: bool = True


_policy_cache: tuple[Any, Policy] | None = None


def policy() -> Policy:
    """``obdask.cmd.sandbox`` of this process, re-parsed only when dask.config changed.

    A plain string is shorthand for ``mode`` (``obdask.cmd.sandbox: require``).
    """
    global _policy_cache
    raw = dask.config.get("obdask.cmd.sandbox", default=None)
    cached = _policy_cache
    if cached is not None and cached[0] == raw:
        return cached[1]
    parsed = _parse(raw)
    _policy_cache = (copy.deepcopy(raw), parsed)
    return parsed


def _parse(raw: Any) -> Policy:
    if raw is None:
        return Policy()
    if isinstance(raw, str):
        raw = {"mode": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"obdask.cmd.sandbox: {raw!r} is neither a mode "
                          f"({', '.join(MODES)}) nor a mapping of sandbox settings")

    def key(name: str, default: Any) -> Any:
        value = raw.get(name, raw.get(name.replace("-", "_")))
        return default if value is None else value

    mode = str(key("mode", "auto")).lower()
    if mode not in MODES:
        raise ConfigError(f"obdask.cmd.sandbox.mode: {key('mode', '')!r} is not one of "
                          f"{', '.join(MODES)}")

    def paths(name: str, default: Sequence[str]) -> tuple[str, ...]:
        value = key(name, default)
        if isinstance(value, str):
            value = [value]
        out = []
        for item in value:
            if not os.path.isabs(str(item)):
                raise ConfigError(f"obdask.cmd.sandbox.{name}: {item!r} is not an absolute "
                                  "path")
            out.append(os.path.normpath(str(item)))
        return tuple(out)

    return Policy(mode=mode, network=bool(key("network", False)),
                  bwrap=str(key("bwrap", "bwrap")),
                  read_only=paths("read-only", DEFAULT_READ_ONLY),
                  writable=paths("writable", ()), bind_env=bool(key("bind-env", True)))


def _depth(path: str) -> int:
    return 0 if path == "/" else path.count("/")


def _under(path: str, root: str) -> bool:
    return path == root or root == "/" or path.startswith(root.rstrip("/") + "/")


@lru_cache(maxsize=8)
def _static(pol: Policy) -> tuple[tuple[str, ...], tuple[tuple[str, str, str], ...]]:
    """bwrap flags and the system mount operations ``(kind, source, dest)`` of ``pol``."""
    exe = shutil.which(pol.bwrap) or pol.bwrap
    flags = [exe, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc",
             "--cap-drop", "ALL"]
    if not pol.network:
        flags.append("--unshare-net")
    ops: list[tuple[str, str, str]] = [("dev", "", "/dev"), ("proc", "", "/proc"),
                                       ("tmpfs", "", "/tmp")]
    for path in pol.read_only:
        if os.path.islink(path):
            ops.append(("symlink", os.readlink(path), path))
        elif os.path.exists(path):
            ops.append(("ro", os.path.realpath(path), path))
    for path in pol.writable:
        if os.path.exists(path):
            real = os.path.realpath(path)
            ops.append(("rw", real, real))
    return tuple(flags), tuple(ops)


def _env_dirs(env: Mapping[str, str]) -> list[str]:
    """Directories a job's environment needs to see: its tools, libraries and Python."""
    found: list[str] = []
    for entry in env.get("PATH", "").split(os.pathsep):
        if not os.path.isabs(entry) or not os.path.isdir(entry):
            continue
        parent = os.path.dirname(os.path.normpath(entry))
        # .../venv/bin -> .../venv (its lib/ holds the packages); never "/" or a home
        if (os.path.basename(os.path.normpath(entry)) == "bin" and _depth(parent) >= 2
                and os.path.isdir(os.path.join(parent, "lib"))):
            entry = parent
        found.append(entry)
    for var in ("PYTHONPATH", "VIRTUAL_ENV"):
        found += [p for p in env.get(var, "").split(os.pathsep) if os.path.isabs(p)]
    found += [sys.prefix, sys.base_prefix, sys.exec_prefix]
    out = []
    for path in found:
        real = os.path.realpath(path)
        if (os.path.isdir(real) and _depth(real) >= 2
                and not any(_under(real, n) or _under(n, real) for n in _NEVER)):
            out.append(real)
    return out


@lru_cache(maxsize=64)
def _job_args(pol: Policy, workspace: str, env_key: tuple[str, str, str, str]
              ) -> tuple[str, ...]:
    flags, static = _static(pol)
    for kind, _, dest in static:
        if kind in ("ro", "symlink") and (_under(workspace, dest) or _under(dest, workspace)):
            raise PayloadError(
                f"@cmd: workspace {workspace!r} overlaps the read-only system path {dest!r} "
                "of the sandbox; use a workspace outside the system paths "
                "(obdask.cmd.sandbox.read-only)")
    ops = list(static) + [("rw", workspace, workspace)]
    if pol.bind_env:
        env = dict(zip(_ENV_KEYS, env_key, strict=True))
        for path in dict.fromkeys(_env_dirs(env)):
            covered = any(kind in ("ro", "rw", "symlink") and _under(path, dest)
                          for kind, _, dest in ops)
            if not covered:
                ops.append(("ro", path, path))
    home = os.path.normpath(env_key[3]) if os.path.isabs(env_key[3]) else ""
    if home not in ("", "/", "/tmp") and not any(_under(home, n) for n in _NEVER) and not any(
            kind in ("ro", "rw", "symlink") and _under(home, dest) for kind, _, dest in ops):
        ops.append(("tmpfs", "", home))  # tools may write caches there; gone with the job
    # shallow mounts first, so /tmp's tmpfs is under /tmp/venv's bind and so on
    ops.sort(key=lambda op: _depth(op[2]))
    args = list(flags)
    for kind, source, dest in ops:
        if kind == "ro":  # -try: a folder removed since it was listed is skipped
            args += ["--ro-bind-try", source, dest]
        elif kind == "rw":
            args += ["--bind", source, dest]
        elif kind == "symlink":
            args += ["--symlink", source, dest]
        else:
            args += [f"--{kind}", dest]
    args += ["--chdir", workspace]
    return tuple(args)


def wrap(argv: Sequence[str], cwd: str | os.PathLike[str], env: Mapping[str, str],
         options: Sequence[str] = (), network: bool = False) -> list[str] | None:
    """``argv`` run inside bwrap in ``cwd``, or None when this worker runs unsandboxed.

    Parameters
    ----------
    argv : sequence of str
        The command (``[shell, "-c", line]``); it follows ``--`` unchanged.
    cwd : str or path
        The job's workspace: the only host path it may write (bound at its
        real path, which is also the working directory).
    env : mapping
        The job's environment (its ``PATH``, ``PYTHONPATH`` and
        ``VIRTUAL_ENV`` directories are bound read-only).
    options : sequence of str
        Extra bwrap options (``--block-fd N``) put before ``--``.
    network : bool
        Share the host's network for this command (a step's ``network=true``)
        even when ``obdask.cmd.sandbox.network`` is false.

    Raises
    ------
    SandboxUnavailable
        ``obdask.cmd.sandbox.mode: require`` and bwrap cannot run here.
    ConfigError
        ``obdask.cmd.sandbox`` is invalid.
    PayloadError
        The workspace overlaps a read-only system path.
    """
    pol = policy()
    if pol.mode == "off":
        return None
    if network and not pol.network:
        pol = dataclasses.replace(pol, network=True)
    reason = _probe(pol)
    if reason is not None:
        if pol.mode == "require":
            raise SandboxUnavailable(
                f"@cmd: obdask.cmd.sandbox.mode is 'require' but bubblewrap cannot run on "
                f"this worker ({reason}); install bubblewrap (apt-get install bubblewrap) "
                "and allow user namespaces, or set obdask.cmd.sandbox.mode: auto to run "
                "with rlimits only")
        _warn_once(reason)
        return None
    workspace = os.path.realpath(cwd)
    env_key = tuple(env.get(k, "") for k in _ENV_KEYS)
    return [*_job_args(pol, workspace, env_key), *_git_args(workspace), *options, "--", *argv]


def _git_args(workspace: str) -> list[str]:
    """Mounts that make a git workspace usable but keep its hooks and config read-only.

    The worker itself runs git in these repositories outside the sandbox
    (``git worktree add``, ``git apply``), so a hook or a ``core.fsmonitor``
    a job planted there would run unsandboxed.  For a repository in the
    workspace: its ``.git/hooks`` is an empty private tmpfs and ``.git/config``
    read-only.  For a worktree (``.git`` is a file, as
    :func:`obdask.workspace.checkout` makes them): the shared repository is
    bound read-only but its ``objects`` (``git add``/``commit``) and the
    worktree's own admin folder (index, HEAD) writable.  Checked per job: a
    job may ``git init``.
    """
    dotgit = os.path.join(workspace, ".git")
    if os.path.islink(dotgit):
        return []  # a link out of the workspace is not followed
    if os.path.isdir(dotgit):
        return ["--tmpfs", os.path.join(dotgit, "hooks"),
                "--ro-bind-try", *[os.path.join(dotgit, "config")] * 2]
    if not os.path.isfile(dotgit):
        return []
    try:
        with open(dotgit, encoding="utf-8") as f:
            line = f.readline().strip()
        if not line.startswith("gitdir:"):
            return []
        gitdir = os.path.realpath(os.path.join(workspace, line[7:].strip()))
        with open(os.path.join(gitdir, "commondir"), encoding="utf-8") as f:
            common = os.path.realpath(os.path.join(gitdir, f.readline().strip()))
    except OSError:
        return []
    if any(_under(p, n) for p in (gitdir, common) for n in _NEVER) or _depth(common) < 2:
        return []
    args: list[str] = []
    if _under(common, workspace):
        args += ["--tmpfs", os.path.join(common, "hooks"),
                 "--ro-bind-try", *[os.path.join(common, "config")] * 2]
    else:
        objects = os.path.join(common, "objects")
        args += ["--ro-bind", common, common, "--bind-try", objects, objects]
    if not _under(gitdir, workspace):
        args += ["--bind", gitdir, gitdir]
    return args


def unavailable_reason(bwrap: str | None = None) -> str | None:
    """Why bwrap cannot run on this machine with the sandbox's flags; None when it can."""
    pol = policy()
    if bwrap is not None:
        pol = Policy(mode=pol.mode, network=pol.network, bwrap=bwrap,
                     read_only=pol.read_only, writable=pol.writable, bind_env=pol.bind_env)
    return _probe(pol)


@lru_cache(maxsize=8)
def _probe(pol: Policy) -> str | None:
    """Run ``true`` in the sandbox once per policy and process; the failure, or None."""
    exe = shutil.which(pol.bwrap)
    if exe is None:
        return f"{pol.bwrap!r} not found"
    true = shutil.which("true") or "/bin/true"
    flags, _ = _static(pol)
    argv = [*flags, "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
            "--tmpfs", "/tmp", "--", true]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{exe} failed to start: {exc}"
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return (f"{exe} exited {done.returncode}: {err[0][:200]} (user namespaces may be "
                "disabled: kernel.unprivileged_userns_clone, user.max_user_namespaces or an "
                "AppArmor/seccomp policy of the container)")
    return None


@lru_cache(maxsize=8)
def _warn_once(reason: str) -> None:
    logger.warning("@cmd: no sandbox on this worker (%s): commands run with rlimits only, "
                   "with the network and every file this worker can reach; install "
                   "bubblewrap, or set obdask.cmd.sandbox.mode: require to refuse to run "
                   "without it", reason)


# ------------------------------------------------------------------ diffs


_HUNK = re.compile(rb"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")
_ESCAPES = {ord(k): v for k, v in zip("abtnvfr\"\\", b"\a\b\t\n\v\f\r\"\\", strict=True)}


class _Refused(Exception):
    pass


def confine_diff(diff: bytes, workspace: str | os.PathLike[str], what: str = "") -> list[str]:
    """Check that a unified/git diff only touches files inside ``workspace``.

    The same policy as the command sandbox, for the in-process writer of
    ``#apply``: every path the diff names (``---``/``+++`` headers, ``diff
    --git``, ``rename``/``copy`` lines, C-quoted names decoded) must be
    relative, free of ``..`` and ``.git`` components, and must not pass
    through or end at a symbolic link that exists in the workspace; a diff
    that creates a symbolic link or a submodule (mode 120000/160000) is
    refused too.  Lines inside hunks are skipped by their counts, so a removed
    line that reads ``--- /etc/passwd`` is content, not a header.

    Parameters
    ----------
    diff : bytes
        The diff as given to ``git apply`` (``-p1``: ``a/``/``b/`` prefixes).
    workspace : str or path
        The folder the diff is applied in.
    what : str
        Prefix of the error message (``job KEY: FILE``).

    Returns
    -------
    list of str
        The workspace-relative paths the diff touches, in order.

    Raises
    ------
    PayloadError
        Naming the first offending path; nothing has been written.
    """
    root = os.path.realpath(workspace)
    found: list[str] = []
    try:
        for path in _diff_paths(diff):
            _confine(root, path)
            found.append(path)
    except _Refused as exc:
        head = f"{what}: " if what else ""
        raise PayloadError(
            f"{head}diff refused before anything was written: {exc}; a diff may only touch "
            f"files inside the workspace {root} (no '..', absolute paths, .git or symbolic "
            "links): fix the diff") from None
    return list(dict.fromkeys(found))


def _diff_paths(diff: bytes):
    """Yield every path a diff names, ``a/``/``b/`` stripped; raise _Refused on modes."""
    old_left = new_left = 0
    for raw in diff.split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if old_left > 0 or new_left > 0:
            tag = line[:1]
            if tag in (b" ", b""):
                old_left, new_left = old_left - 1, new_left - 1
                continue
            if tag == b"-":
                old_left -= 1
                continue
            if tag == b"+":
                new_left -= 1
                continue
            if tag == b"\\":
                continue
            old_left = new_left = 0  # a short hunk: read it as a header line
        hunk = _HUNK.match(line)
        if hunk:
            old_left = int(hunk[1]) if hunk[1] is not None else 1
            new_left = int(hunk[2]) if hunk[2] is not None else 1
        elif line.startswith((b"--- ", b"+++ ")):
            path = _header_path(line[4:])
            if path is not None:
                yield path
        elif line.startswith(b"diff --git "):
            yield from _git_header_paths(line[11:])
        elif line.startswith((b"rename from ", b"rename to ", b"copy from ", b"copy to ")):
            yield _name(line.split(b" ", 2)[2], strip=False)
        elif line.startswith((b"new file mode ", b"new mode ")):
            mode = line.rsplit(b" ", 1)[1]
            if mode == b"120000":
                raise _Refused("it creates a symbolic link")
            if mode == b"160000":
                raise _Refused("it creates a submodule (gitlink)")


def _unquote(value: bytes) -> tuple[bytes, bytes]:
    """A C-quoted name at the start of ``value`` (git's quoting); (name, rest)."""
    out = bytearray()
    i = 1
    while i < len(value):
        c = value[i]
        if c == ord('"'):
            return bytes(out), value[i + 1:]
        if c == ord("\\") and i + 1 < len(value):
            nxt = value[i + 1]
            if 48 <= nxt <= 55:  # \NNN octal byte
                out.append(int(value[i + 1:i + 4], 8) & 0xFF)
                i += 4
                continue
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        out.append(c)
        i += 1
    raise _Refused(f"the quoted name {value!r} is not terminated")


def _name(value: bytes, strip: bool) -> str:
    if value.startswith(b'"'):
        value = _unquote(value)[0]
    path = value.decode("utf-8", "surrogateescape")
    if path.startswith("/"):
        raise _Refused(f"path {path!r} is absolute")
    if strip:
        path = path.split("/", 1)[1] if "/" in path else path
    return path


def _header_path(value: bytes) -> str | None:
    if not value.startswith(b'"'):
        value = value.split(b"\t", 1)[0]  # GNU diff: name TAB timestamp
    if value == b"/dev/null":
        return None
    return _name(value, strip=True)


def _git_header_paths(rest: bytes) -> list[str]:
    """Both names of ``diff --git a/X b/Y`` (quoted or not, possibly with spaces)."""
    if rest.startswith(b'"'):
        first, tail = _unquote(rest)
        second = tail[1:]
        return [_name(b'"' + first.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"',
                      strip=True), _name(second, strip=True)]
    half = (len(rest) - 1) // 2
    if len(rest) % 2 == 1 and rest[half:half + 1] == b" " and rest[2:half] == rest[half + 3:]:
        return [_name(rest[:half], strip=True)]  # a/P b/P: P may contain spaces
    if b" b/" in rest:
        left, right = rest.split(b" b/", 1)
        return [_name(left, strip=True), _name(b"b/" + right, strip=True)]
    return [_name(part, strip=True) for part in rest.split(b" ", 1)]


def _confine(root: str, path: str) -> None:
    parts = path.split("/")
    if not path or not any(p not in ("", ".") for p in parts):
        raise _Refused(f"path {path!r} names no file")
    if ".." in parts:
        raise _Refused(f"path {path!r} goes through '..'")
    if any(p.lower().rstrip(". ") == ".git" for p in parts):
        raise _Refused(f"path {path!r} is inside .git (hooks and config run code)")
    current = root
    for part in parts:
        if part in ("", "."):
            continue
        current = os.path.join(current, part)
        if os.path.islink(current):
            raise _Refused(f"path {path!r} goes through the symbolic link "
                           f"{os.path.relpath(current, root)!r}")
        if not os.path.lexists(current):
            break
    if not _under(os.path.realpath(os.path.join(root, path)), root):
        raise _Refused(f"path {path!r} resolves outside the workspace")
