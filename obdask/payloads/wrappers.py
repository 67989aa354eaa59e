"""Commands that run another command (``env``, ``nice``, ``timeout``, ``xargs``...).

The checker of :mod:`obdask.payloads.shell` follows them to the command they
run: :data:`WRAPPERS` gives each one's option grammar, :func:`command_index`
finds where the command it runs starts in its arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from obdask.payloads.argcheck import ASSIGN_RE, refused, risky_assignment

__all__ = ["WRAPPERS", "Opts", "command_index"]


@dataclass(frozen=True)
class Opts:
    """Option grammar of a command that runs another command (``env``, ``xargs``...)."""

    flags: str = ""              # short options without argument
    with_arg: str = ""           # short options taking the next word (or the rest of the cluster)
    attached: str = ""           # short options whose argument can only be attached (xargs -i)
    long_flags: frozenset[str] = frozenset()
    long_arg: frozenset[str] = frozenset()
    positional: int = 0          # operands before the command (timeout's duration)
    assignments: bool = False    # NAME=VALUE words before the command (env)
    no_exec: str = ""            # short options meaning "runs nothing" (command -v)
    default: str | None = None   # command run when none is given (xargs: echo)


WRAPPERS: dict[str, Opts] = {
    "env": Opts(flags="i0v", with_arg="uC", long_flags=frozenset({"ignore-environment", "null",
                 "debug"}), long_arg=frozenset({"unset", "chdir"}), assignments=True),
    "nice": Opts(flags="0123456789", with_arg="n", long_arg=frozenset({"adjustment"})),
    "nohup": Opts(),
    "timeout": Opts(flags="v", with_arg="ks", long_flags=frozenset({"preserve-status",
                     "foreground", "verbose"}), long_arg=frozenset({"kill-after", "signal"}),
                     positional=1),
    "stdbuf": Opts(with_arg="ioe", long_arg=frozenset({"input", "output", "error"})),
    "time": Opts(flags="pavq", with_arg="fo", long_flags=frozenset({"append", "verbose",
                  "portability", "quiet"}), long_arg=frozenset({"format", "output"})),
    "command": Opts(flags="p", no_exec="vV"),
    "builtin": Opts(),
    "exec": Opts(flags="cl", with_arg="a"),
    "xargs": Opts(flags="0rtpxo", with_arg="aEILnsPd", attached="iel",
                   long_flags=frozenset({"null", "no-run-if-empty", "verbose", "interactive",
                                         "exit", "open-tty", "show-limits", "replace", "eof",
                                         "max-lines"}),
                   long_arg=frozenset({"arg-file", "delimiter", "max-args", "max-procs",
                                       "max-chars", "process-slot-var"}), default="echo"),
}


def command_index(base: str, opts: Opts, args: Sequence[Any]) -> int | None:
    """Index in ``args`` of the command a wrapper runs (== len(args): none); None: it runs none."""
    i = 0
    while i < len(args):
        a = args[i]
        if a.dynamic:
            raise refused(f"cannot check the command run by {base}: {a.raw!r} is not literal")
        v = a.value
        if v == "--":
            i += 1
            break
        if v.startswith("--"):
            name, eq, _ = v[2:].partition("=")
            if name in opts.long_arg and not eq:
                i += 1
            elif name not in opts.long_arg and name not in opts.long_flags:
                raise refused(f"cannot check option {v!r} of {base}")
        elif v.startswith("-") and len(v) > 1 and not (base == "env" and v == "-"):
            for k, ch in enumerate(v[1:], 1):
                if ch in opts.no_exec:
                    return None
                if ch in opts.attached:
                    break
                if ch in opts.with_arg:
                    i += k == len(v) - 1
                    break
                if ch not in opts.flags:
                    raise refused(f"cannot check option {v!r} of {base}")
        elif v == "-":
            pass
        else:
            break
        i += 1
    i += opts.positional
    while opts.assignments and i < len(args) and ASSIGN_RE.match(args[i].raw):
        why = risky_assignment(args[i].raw)
        if why:
            raise refused(f"{base}: {why}")
        i += 1
    return min(i, len(args))
