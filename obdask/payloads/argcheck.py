"""Arguments of allowlisted programs that make them run or write anything.

The allowlist of :mod:`obdask.payloads.shell` names programs; several of
them take arguments that turn them into a way to run any other program or
to write any file: ``git -c core.fsmonitor=CMD``, ``git -c alias.x='!CMD'``,
``git clone --upload-pack=CMD``, ``make --eval``, ``awk 'BEGIN{system(...)}'``,
``sed 'e CMD'`` or ``sed 'w /etc/x'``, ``find -delete``/``-fprint``/``-exec``,
and a ``PATH=`` (or ``LD_PRELOAD=``...) assignment that makes an allowed name
run another file.  :func:`refusal` spots the obvious ones so the readable
check refuses them at compile time.  It is not the boundary (a Makefile or a
script still runs what it contains): the bubblewrap sandbox is
(:mod:`obdask.payloads.sandbox`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from obdask.exceptions import CommandRefused

__all__ = ["ASSIGN_RE", "refusal", "refused", "risky_assignment"]

ASSIGN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def refused(message: str) -> CommandRefused:
    """The checker's one-line refusal, prefixed ``@cmd:``."""
    return CommandRefused("@cmd: " + " ".join(message.split()))

# Variables that change which program runs or what it loads: PATH lookup, the dynamic
# linker, shell start-up files, git's config-from-environment and helper programs.
_RISKY_VAR = re.compile(r"PATH|LD_\w*|BASH_ENV|ENV|IFS|GIT_CONFIG\w*|GIT_SSH\w*|GIT_EXEC_PATH|"
                        r"GIT_ASKPASS|GIT_PAGER|GIT_EDITOR|GIT_PROXY_COMMAND|GIT_EXTERNAL_DIFF")
# git configuration keys whose value is a command git runs (or that loads other config)
_GIT_KEYS = re.compile(
    r"core\.(fsmonitor|sshcommand|pager|editor|hookspath|gitproxy|askpass)|"
    r"(sequence|credential)\.\S*|pager\.\S*|diff\.\S*\.(textconv|command)|diff\.external|"
    r"merge\.\S*\.driver|filter\.\S*|include(if\.\S*)?\.path|uploadpack\.\S*|"
    r"receivepack\.\S*|gpg\.\S*program|protocol\.ext\.allow|remote\.\S*\.(uploadpack|"
    r"receivepack|vcs)|url\.\S*|http\.\S*proxy|core\.\S*command", re.IGNORECASE)
_GIT_OPTS = ("--upload-pack", "--receive-pack", "--exec", "--exec-path", "--config-env",
             "--template", "--separate-git-dir")
_FIND_REFUSED = {
    "-delete": "deletes files", "-exec": "runs a command", "-execdir": "runs a command",
    "-ok": "runs a command", "-okdir": "runs a command", "-fprint": "writes a file",
    "-fprint0": "writes a file", "-fprintf": "writes a file", "-fls": "writes a file",
}
_AWK_RISKY = [
    (re.compile(r"\bsystem\s*\("), "calls system()"),
    # print ... | "cmd" (not ||, and not the | of a regex /a|b/), "cmd" | getline, |&
    (re.compile(r"\bprintf?\b[^;{}]*?(?<!\|)\|(?!\|)"), "pipes its output to a command"),
    (re.compile(r"(?<!\|)\|&?\s*getline\b|\|&"), "reads from a command"),
    (re.compile(r">>?\s*\(?\s*\"(?!/dev/std(out|err)\")(/|\.\./|[^\"]*/\.\./)"),
     "writes a file outside the workspace"),
    (re.compile(r"@load\b"), "loads an extension"),
]
_SETTERS = frozenset({"export", "readonly", "local", "declare", "typeset"})


def risky_assignment(word: str) -> str | None:
    """Why a ``NAME=VALUE`` word must be refused, or None."""
    name = word.split("=", 1)[0]
    if "=" in word and _RISKY_VAR.fullmatch(name):
        return (f"the assignment {name}= is refused (it changes which program runs or what "
                "it loads); use the program's full path from obdask.cmd.executable-dirs")
    return None


def refusal(base: str, args: Sequence[str]) -> str | None:
    """Why running ``base`` (a basename) with ``args`` must be refused, or None.

    Parameters
    ----------
    base : str
        The program's basename (``git``, ``make``...).
    args : sequence of str
        Its arguments after quote removal (expansions as written).

    Returns
    -------
    str or None
        A short reason naming the argument, or None when nothing obvious is wrong.
    """
    check = _CHECKS.get(base)
    if check is None and base in _SETTERS:
        check = _check_setter
    if check is None and base.startswith(("gawk", "mawk", "nawk")):
        check = _check_awk
    return None if check is None else check(args)


def _check_setter(args: Sequence[str]) -> str | None:
    for a in args:
        why = risky_assignment(a)
        if why:
            return why
    return None


def _check_git(args: Sequence[str]) -> str | None:
    i = 0
    while i < len(args):
        a = args[i]
        value = None
        if a in ("-c", "--config") and i + 1 < len(args):
            value = args[i + 1]
            i += 1
        elif a.startswith("--config="):
            value = a.split("=", 1)[1]
        elif a.startswith("-c") and len(a) > 2 and "=" in a:
            value = a[2:]
        if value is not None:
            key, _, setting = value.partition("=")
            if _GIT_KEYS.fullmatch(key.strip()):
                return f"git -c {key}=... sets a key whose value git runs or loads"
            if key.lower().startswith("alias.") and setting.lstrip().startswith("!"):
                return f"git -c {key}=!... defines an alias that runs a shell command"
        for opt in _GIT_OPTS:
            if a == opt or a.startswith(opt + "="):
                return f"git {opt} runs or loads a program or files of its choice"
        if a == "-u" and "clone" in args[:i]:
            return "git clone -u (--upload-pack) runs a program of its choice"
        if a.startswith("ext::") or "::" in a.split("/", 1)[0]:
            return f"git remote helper URL {a!r} runs a program"
        i += 1
    return None


def _check_make(args: Sequence[str]) -> str | None:
    for a in args:
        if a.startswith("--eval") or (a.startswith("-") and not a.startswith("--")
                                      and "E" in a[1:]):
            return "make --eval (-E) runs make code given on the command line"
        if re.match(r"(SHELL|MAKESHELL|\.SHELLFLAGS)=", a):
            return f"make {a.split('=')[0]}= changes the shell make runs recipes with"
    return None


def _awk_program(args: Sequence[str]) -> tuple[list[str], str | None]:
    """The program texts of an awk command line, or a refusal."""
    texts: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            i += 1
            break
        if a in ("-l", "--load") or a.startswith(("-l", "--load=")):
            return texts, "awk -l (--load) loads an extension"
        if a in ("-f", "--file", "-E", "--exec") or a.startswith(("--file=", "--exec=")):
            return texts, None  # a program file: not read here (the sandbox holds it)
        if a in ("-F", "-v", "--assign", "--field-separator"):
            i += 2
            continue
        if a.startswith("--source="):
            texts.append(a.split("=", 1)[1])
        elif a in ("--source", "-e"):
            texts.append(args[i + 1] if i + 1 < len(args) else "")
            i += 2
            continue
        elif not a.startswith("-") or a == "-":
            break
        i += 1
    if not texts and i < len(args):
        texts.append(args[i])
    return texts, None


def _check_awk(args: Sequence[str]) -> str | None:
    texts, why = _awk_program(args)
    if why:
        return why
    for text in texts:
        for pattern, what in _AWK_RISKY:
            if pattern.search(text):
                return f"the awk program {what}"
    return None


def _check_sed(args: Sequence[str]) -> str | None:
    scripts: list[str] = []
    explicit = False
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-e", "--expression") and i + 1 < len(args):
            scripts.append(args[i + 1])
            explicit = True
            i += 2
            continue
        if a.startswith("--expression="):
            scripts.append(a.split("=", 1)[1])
            explicit = True
        elif a.startswith("-e") and len(a) > 2:
            scripts.append(a[2:])
            explicit = True
        elif a in ("-f", "--file") or a.startswith("--file="):
            explicit = True  # a script file: not read here
        elif a == "--":
            i += 1
            break
        elif not a.startswith("-") or a == "-":
            break
        i += 1
    if not explicit and i < len(args):
        scripts.append(args[i])
    for script in scripts:
        why = _sed_refusal(script)
        if why:
            return why
    return None


def _sed_refusal(script: str) -> str | None:
    """Find the ``e`` command, ``w``/``W`` commands and ``s///e``/``s///w`` flags."""
    s, n, i = script, len(script), 0
    while i < n:
        while i < n and s[i] in " \t\n;{}!":
            i += 1
        i = _sed_address(s, i)
        while i < n and s[i] in " \t!":
            i += 1
        if i >= n:
            break
        cmd = s[i]
        i += 1
        if cmd in "ewW":
            return f"the sed command {cmd!r} {'runs a command' if cmd == 'e' else 'writes a file'}"
        if cmd in "sy":
            if i >= n:
                break
            delim = s[i]
            i += 1
            for _ in range(2):
                while i < n and s[i] != delim:
                    i += 2 if s[i] == "\\" else 1
                i += 1
            flags_start = i
            while i < n and s[i] not in ";\n}":
                i += 1
            flags = s[flags_start:i]
            if cmd == "s" and ("e" in flags.split("w")[0] or "w" in flags):
                return "the sed s///e flag runs a command" if "e" in flags.split("w")[0] \
                    else "the sed s///w flag writes a file"
        elif cmd in "aicrR:#":  # text, file name or label up to the end of the line
            while i < n and s[i] != "\n":
                i += 1
        elif cmd in "btT":  # a label up to ';' or the end of the line
            while i < n and s[i] not in ";\n":
                i += 1
    return None


def _sed_address(s: str, i: int) -> int:
    """Index after a sed address (``1``, ``$``, ``/re/I``, ``\\%re%``, ``a,b``, ``a~b``)."""
    n = len(s)
    for _ in range(2):
        if i < n and (s[i] == "/" or s[i] == "\\"):
            delim = s[i] if s[i] == "/" else s[i + 1:i + 2]
            i += 1 if s[i] == "/" else 2
            while i < n and s[i] != delim:
                i += 2 if s[i] == "\\" else 1
            i += 1
            while i < n and s[i] in "IM":
                i += 1
        else:
            while i < n and (s[i].isdigit() or s[i] in "$~+"):
                i += 1
        if i < n and s[i] == ",":
            i += 1
            continue
        break
    return i


def _check_find(args: Sequence[str]) -> str | None:
    for a in args:
        if a in _FIND_REFUSED:
            return f"find {a} {_FIND_REFUSED[a]}; list the files and use an allowed command " \
                   "(xargs), or run a script"
    return None


_CHECKS = {"git": _check_git, "make": _check_make, "gmake": _check_make, "awk": _check_awk,
           "sed": _check_sed, "find": _check_find}
