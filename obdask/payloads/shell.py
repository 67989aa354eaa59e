"""Static checker for the shell lines of ``@cmd:`` payloads.

:func:`find_commands` reads a POSIX ``sh`` command line the way the shell
would (quoting, escapes, operators, redirections, here-documents, groups,
``if``/``while``/``until``/``for`` compound commands) and returns the
executable of every simple command in it, refusing with
:class:`~obdask.exceptions.CommandRefused` anything it cannot account for.
Nothing is executed.  The public entry point with config defaults is
:func:`obdask.payloads.cmd.check_command`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from obdask.payloads.argcheck import ASSIGN_RE, refusal, refused, risky_assignment
from obdask.payloads.wrappers import WRAPPERS as _WRAPPERS
from obdask.payloads.wrappers import command_index as _command_index

_HOW = "add it to obdask.cmd.allowlist (or the allowlist argument) to allow it"
_HOW_DIRS = "add its directory to obdask.cmd.executable-dirs to allow it"
_HOW_SUB = (
    "set obdask.cmd.allow-substitution: true (or allow_substitution=True) to allow it; "
    "the commands inside are checked too"
)
_MAX_DEPTH = 24
_META = frozenset(" \t\n&|;()<>")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ASSIGN_RE = ASSIGN_RE
# Longest first.  ``&>`` is deliberately absent: in dash it is ``&`` then ``>``,
# which makes the next word a command; lexing it that way is the stricter reading.
_OPS = (";;&", "<<-", "<<<", "&&", "||", ";;", ";&", "|&", "<<", ">>", "<&", ">&", "<>", ">|",
        "&", "|", ";", "(", ")", "<", ">")
_REDIRS = frozenset({"<<-", "<<<", "<<", ">>", "<&", ">&", "<>", ">|", "<", ">"})
_SEPARATORS = frozenset({"&&", "||", "|&", "&", "|", ";"})
_OPENERS = frozenset({"if", "then", "else", "elif", "do", "while", "until", "{", "!"})
_CLOSERS = frozenset({"fi", "done", "}", "esac"})
_AFTER_CLOSE = _CLOSERS | {"then", "do", "else", "elif"}
_UNSUPPORTED = {
    "case": "'case' statements are not supported by the @cmd: checker; use if/elif or a script",
    "[[": "'[[ ... ]]' is not supported by the @cmd: checker; use '[ ... ]' (test)",
    "select": "'select' is not supported by the @cmd: checker",
    "function": "function definitions are not supported by the @cmd: checker",
    "coproc": "'coproc' is not supported by the @cmd: checker",
}
_RISKY = {
    "eval": " (it runs its arguments as shell code)",
    "exec": " (it replaces the shell with another program)",
    "source": " (it runs a file as shell code)",
    ".": " (it runs a file as shell code)",
    "sh": " (a nested shell)", "bash": " (a nested shell)", "dash": " (a nested shell)",
    "zsh": " (a nested shell)", "ksh": " (a nested shell)",
}
_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash", "mksh"})


_FIND_EXEC = frozenset({"-exec", "-execdir", "-ok", "-okdir"})


_refuse = refused


@dataclass
class _Word:
    value: str          # after quote removal; expansions kept as written
    raw: str            # as written
    quoted: bool        # some part was quoted or escaped
    dynamic: bool       # contains an expansion or substitution: value unknown until run time
    glob: bool          # contains an unquoted pattern character


class _Parser:
    """One pass over a command line; appends executables to ``out``."""

    def __init__(self, text: str, allow: frozenset[str], allow_sub: bool, out: list[str],
                 depth: int = 0, dirs: frozenset[str] = frozenset()) -> None:
        if depth > _MAX_DEPTH:
            raise _refuse("nesting is too deep to check")
        self.s, self.i, self.n = text, 0, len(text)
        self.allow, self.allow_sub, self.out, self.depth = allow, allow_sub, out, depth
        self.dirs = dirs   # directories a path-qualified executable may be in
        self.heredocs: list[tuple[str, bool, bool]] = []

    # ------------------------------------------------------------------ lexer
    def _next(self) -> tuple[str, object]:
        """Return the next token: ("word", _Word), ("op", str), ("io"|"nl"|"eof", str)."""
        s, n = self.s, self.n
        while self.i < n:
            c = s[self.i]
            if c in " \t":
                self.i += 1
            elif s.startswith("\\\n", self.i):
                self.i += 2
            elif c == "#":
                j = s.find("\n", self.i)
                self.i = n if j < 0 else j
            else:
                break
        if self.i >= n:
            return "eof", ""
        c = s[self.i]
        if c == "\n":
            self.i += 1
            self._read_heredocs()
            return "nl", "\n"
        if c in "<>" and s.startswith("(", self.i + 1):
            start = self.i
            self.i += 2
            self._substitution("process substitution <(...)")
            return "word", _Word("<(...)", s[start:self.i], False, True, False)
        if c in "&|;()<>":
            for op in _OPS:
                if s.startswith(op, self.i):
                    self.i += len(op)
                    return "op", op
        word = self._word()
        if (not word.quoted and word.raw.isdigit() and self.i < n and s[self.i] in "<>"):
            return "io", word.raw
        return "word", word

    def _word(self) -> _Word:
        s, n, start = self.s, self.n, self.i
        buf: list[str] = []
        quoted = dynamic = glob = bracket = False
        while self.i < n:
            c = s[self.i]
            if c in _META:
                break
            if c == "\\":
                nxt = s[self.i + 1:self.i + 2]
                if nxt != "\n":
                    buf.append(nxt or "\\")
                    quoted = True
                self.i += 2
            elif c == "'":
                j = s.find("'", self.i + 1)
                if j < 0:
                    raise _refuse("unterminated single quote")
                buf.append(s[self.i + 1:j])
                quoted, self.i = True, j + 1
            elif c == '"':
                self.i += 1
                text, dyn = self._dquote('"')
                buf.append(text)
                quoted, dynamic = True, dynamic or dyn
            elif c == "$":
                text, dyn = self._dollar(in_dq=False)
                buf.append(text)
                dynamic = dynamic or dyn
            elif c == "`":
                buf.append(self._backtick(in_dq=False))
                dynamic = True
            else:
                if c in "*?" or (c == "]" and bracket):
                    glob = True
                bracket = bracket or c == "["
                buf.append(c)
                self.i += 1
        return _Word("".join(buf), s[start:self.i], quoted, dynamic, glob)

    def _dquote(self, end: str | None) -> tuple[str, bool]:
        """Scan a double-quoted body (``end='"'``) or a here-document body (``end=None``)."""
        s, n = self.s, self.n
        buf: list[str] = []
        dynamic = False
        escapable = '$`\\"' if end else "$`\\"
        while self.i < n:
            c = s[self.i]
            if c == end:
                self.i += 1
                return "".join(buf), dynamic
            if c == "\\":
                nxt = s[self.i + 1:self.i + 2]
                if nxt and nxt in escapable:
                    buf.append(nxt)
                elif nxt != "\n":
                    buf.append("\\" + nxt)
                self.i += 2
            elif c == "$":
                text, dyn = self._dollar(in_dq=True)
                buf.append(text)
                dynamic = dynamic or dyn
            elif c == "`":
                buf.append(self._backtick(in_dq=True))
                dynamic = True
            else:
                buf.append(c)
                self.i += 1
        if end:
            raise _refuse("unterminated double quote")
        return "".join(buf), dynamic

    def _dollar(self, in_dq: bool) -> tuple[str, bool]:
        """Consume a ``$`` expansion at ``self.i``; return its text and whether it expands."""
        s, start = self.s, self.i
        self.i = self._cont(self.i + 1)
        nxt = s[self.i:self.i + 1]
        if nxt == "(" and s.startswith("(", self._cont(self.i + 1)):
            self.i = self._cont(self.i + 1) + 1
            self._arithmetic()
        elif nxt == "(":
            self.i += 1
            self._substitution("command substitution $(...)")
        elif nxt == "{":
            self.i += 1
            self._braced(in_dq)
        elif nxt and nxt in "@*#?-$!0123456789":
            self.i += 1
        else:
            m = _NAME_RE.match(s, self.i)
            if m is None:
                return "$", False
            self.i = m.end()
        return s[start:self.i], True

    def _cont(self, i: int) -> int:
        """Index after any line continuations (backslash-newline) at ``i``."""
        while self.s.startswith("\\\n", i):
            i += 2
        return i

    def _substitution(self, what: str) -> None:
        """Check the commands of ``$(...)`` / ``<(...)``; ``self.i`` is after the ``(``."""
        if not self.allow_sub:
            raise _refuse(f"{what} is refused; {_HOW_SUB}")
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise _refuse("nesting is too deep to check")
        self._parse_list(closing=True)
        self.depth -= 1

    def _backtick(self, in_dq: bool) -> str:
        if not self.allow_sub:
            raise _refuse(f"command substitution `...` (backticks) is refused; {_HOW_SUB}")
        s, n = self.s, self.n
        start = self.i
        self.i += 1
        body: list[str] = []
        escapable = '$`\\"' if in_dq else "$`\\"
        while self.i < n:
            c = s[self.i]
            if c == "`":
                self.i += 1
                _Parser("".join(body), self.allow, True, self.out, self.depth + 1,
                        self.dirs)._parse_list()
                return s[start:self.i]
            if c == "\\" and s[self.i + 1:self.i + 2] in escapable and self.i + 1 < n:
                body.append(s[self.i + 1])
                self.i += 2
            else:
                body.append(c)
                self.i += 1
        raise _refuse("unterminated backtick")

    def _arithmetic(self) -> None:
        """Skip ``$(( ... ))``, checking substitutions inside; ``self.i`` is after ``$((``."""
        s, n = self.s, self.n
        level = 0
        while self.i < n:
            c = s[self.i]
            if c == "(":
                level += 1
            elif c == ")":
                if level == 0:
                    if s.startswith(")", self._cont(self.i + 1)):
                        self.i = self._cont(self.i + 1) + 1
                        return
                    raise _refuse("ambiguous '$((': write '$( (' for a subshell")
                level -= 1
            elif c == "\\":
                self.i += 1
            elif c == "'":
                raise _refuse("single quotes inside $((...)) are not supported")
            elif c == '"':
                self.i += 1
                self._dquote('"')
                continue
            elif c == "$":
                self._dollar(in_dq=True)
                continue
            elif c == "`":
                self._backtick(in_dq=True)
                continue
            self.i += 1
        raise _refuse("unterminated $((")

    def _braced(self, in_dq: bool) -> None:
        """Skip ``${...}`` (ends at the first unquoted ``}``); ``self.i`` is after ``${``."""
        s, n = self.s, self.n
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise _refuse("nesting is too deep to check")
        while self.i < n:
            c = s[self.i]
            if c == "}":
                self.i += 1
                self.depth -= 1
                return
            if c == "\\":
                self.i += 2
            elif c == "'" and not in_dq:   # inside "${...}" a single quote is literal
                j = s.find("'", self.i + 1)
                if j < 0:
                    raise _refuse("unterminated single quote")
                self.i = j + 1
            elif c == '"':
                self.i += 1
                self._dquote('"')
            elif c == "$":
                self._dollar(in_dq)
            elif c == "`":
                self._backtick(in_dq)
            else:
                self.i += 1
        raise _refuse("unterminated ${")

    def _read_heredocs(self) -> None:
        """Consume the bodies of pending here-documents (after a newline)."""
        pending, self.heredocs = self.heredocs, []
        s, n = self.s, self.n
        for delim, quoted, strip in pending:
            start = self.i
            while self.i < n:
                j = s.find("\n", self.i)
                j = n if j < 0 else j
                line = s[self.i:j]
                end, self.i = self.i, min(j + 1, n)
                if (line.lstrip("\t") if strip else line) == delim:
                    break
            else:
                end = n
            if not quoted:   # the body undergoes $-expansion and command substitution
                body = _Parser(s[start:end], self.allow, self.allow_sub, self.out,
                               self.depth + 1, self.dirs)
                body._dquote(None)

    # ----------------------------------------------------------------- parser
    def _parse_list(self, closing: bool = False) -> None:
        """Parse commands up to the end (or the ``)`` closing a substitution)."""
        words: list[_Word] = []   # command word and arguments of the current simple command
        started = False           # the simple command has assignments or redirections
        after_close = False       # just after '}', 'fi', 'done' or a subshell's ')'
        parens = 0
        while True:
            kind, tok = self._next()
            if kind == "word":
                assert isinstance(tok, _Word)
                keyword = None if tok.quoted or tok.dynamic else tok.value
                if after_close:
                    if keyword not in _AFTER_CLOSE:
                        raise _refuse(f"syntax error near {tok.raw!r}")
                    after_close = keyword in _CLOSERS
                    continue
                if not words and not started:
                    if keyword in _UNSUPPORTED:
                        raise _refuse(_UNSUPPORTED[keyword])
                    if keyword in _OPENERS:
                        continue
                    if keyword in _CLOSERS:
                        after_close = True
                        continue
                    if keyword == "for":
                        self._for_header()
                        continue
                if not words and _ASSIGN_RE.match(tok.raw):
                    why = risky_assignment(tok.raw)
                    if why:
                        raise _refuse(why)
                    started = True
                    continue
                words.append(tok)
            elif kind == "io":
                started = True
            elif kind == "op" and tok in _REDIRS:
                kind2, target = self._next()
                if kind2 != "word":
                    raise _refuse(f"missing file name after {tok!r}")
                if tok in ("<<", "<<-"):
                    assert isinstance(target, _Word)
                    self.heredocs.append((target.value, target.quoted, tok == "<<-"))
                started = True
            else:
                self._finish(words)
                if tok == "(":
                    if words or started or after_close:
                        raise _refuse("unexpected '(' (function definitions are not supported)")
                    parens += 1
                elif tok == ")":
                    if parens:
                        parens -= 1
                        words, started, after_close = [], False, True
                        continue
                    if closing:
                        return
                    raise _refuse("unbalanced ')'")
                elif kind == "eof":
                    if closing:
                        raise _refuse("unterminated $(")
                    if parens:
                        raise _refuse("unbalanced '('")
                    return
                elif tok not in _SEPARATORS and kind != "nl":
                    raise _refuse(f"operator {tok!r} is not supported by the @cmd: checker")
                words, started, after_close = [], False, False

    def _for_header(self) -> None:
        """Consume ``NAME [in WORD...] ; do`` after ``for``."""
        kind, tok = self._next()
        if kind != "word" or not _NAME_RE.fullmatch(tok.raw):  # type: ignore[union-attr]
            raise _refuse("'for' must be followed by a variable name")
        seen_in = False
        while True:
            kind, tok = self._next()
            if kind == "nl" or (kind == "op" and tok == ";"):
                if seen_in:
                    break
                continue
            if kind != "word":
                raise _refuse(f"syntax error in 'for' near {tok!r}")
            value = None if tok.quoted else tok.value  # type: ignore[union-attr]
            if seen_in:
                continue
            if value == "in":
                seen_in = True
            elif value == "do":
                return
            else:
                raise _refuse(f"syntax error in 'for' near {tok.raw!r}")  # type: ignore
        while True:
            kind, tok = self._next()
            if kind == "nl":
                continue
            if kind == "word" and not tok.quoted and tok.value == "do":  # type: ignore
                return
            raise _refuse("'for ... in ...;' must be followed by 'do'")

    def _finish(self, words: list[_Word]) -> None:
        """Check a complete simple command (and what it runs, for wrappers)."""
        while words:
            base = self._check_exe(words[0])
            args = words[1:]
            if base in _SHELLS:
                self._check_shell_args(base, args)
                return
            if base == "eval":
                self._check_string(args, "eval")
                return
            why = refusal(base, [a.value if not a.dynamic else a.raw for a in args])
            if why:
                raise _refuse(why)
            if base == "find":
                self._check_find(args)
                return
            opts = _WRAPPERS.get(base)
            if opts is None:
                return
            idx = _command_index(base, opts, args)
            if idx is None:
                return
            if idx >= len(args):
                if opts.default:
                    self._check_exe(_Word(opts.default, opts.default, False, False, False))
                return
            words = args[idx:]

    def _check_exe(self, word: _Word) -> str:
        """Check one command word against the allowlist; return its basename."""
        if word.dynamic:
            raise _refuse(f"executable {word.raw!r} is not a literal word (it uses an expansion "
                          "or substitution); write the program name literally")
        if word.glob:
            raise _refuse(f"executable {word.raw!r} contains a pattern (*, ?, [...]); "
                          "write the program name literally")
        name = word.value
        base = name.rsplit("/", 1)[-1]
        if not name or not base:
            raise _refuse(f"empty executable name {word.raw!r}")
        if name not in self.allow and base not in self.allow:
            raise _refuse(f"{name!r} is not on the allowlist{_RISKY.get(base, '')}; {_HOW}")
        if "/" in name:
            self._check_dir(name)
        self.out.append(name)
        return base

    def _check_dir(self, name: str) -> None:
        """A path-qualified executable must lie in a configured directory.

        The allowlist names programs, but ``./ls`` or ``b/cat`` may be any file
        copied there (``cp /bin/rm ./ls``): only the directories of
        ``obdask.cmd.executable-dirs`` are trusted to hold what their names say.
        """
        if ".." in name.split("/"):
            raise _refuse(f"executable {name!r} goes through '..'; {_HOW_DIRS}")
        folder = os.path.dirname(os.path.normpath(name)) or "."
        if folder not in self.dirs:
            raise _refuse(f"executable {name!r} is not in a directory of "
                          f"obdask.cmd.executable-dirs (a file of any name can be copied "
                          f"into {folder!r}); write the bare name to run it from PATH, or "
                          f"{_HOW_DIRS}")

    def _check_string(self, args: list[_Word], what: str) -> None:
        if any(a.dynamic for a in args):
            raise _refuse(f"{what} of a non-literal string cannot be checked")
        text = " ".join(a.value for a in args)
        _Parser(text, self.allow, self.allow_sub, self.out, self.depth + 1,
                self.dirs)._parse_list()

    def _check_shell_args(self, base: str, args: list[_Word]) -> None:
        """``sh -c STRING``: check STRING too; ``sh FILE`` runs a script (not checked)."""
        run_string = False
        i = 0
        while i < len(args):
            a = args[i]
            if a.dynamic:
                raise _refuse(f"cannot check the arguments of {base}: {a.raw!r} is not literal")
            v = a.value
            if v == "--" or v in ("-", "+"):
                i += 1
                break
            if len(v) < 2 or v[0] not in "-+" or v.startswith("--"):
                if v.startswith("--"):
                    i += 1
                    continue
                break
            run_string = run_string or "c" in v
            i += 2 if v[-1] in "oO" else 1
        if run_string:
            self._check_string(args[i:i + 1], f"{base} -c")

    def _check_find(self, args: list[_Word]) -> None:
        i = 0
        while i < len(args):
            if args[i].value in _FIND_EXEC and not args[i].dynamic:
                j = i + 1
                while j < len(args) and args[j].value not in (";", "+"):
                    j += 1
                if j == i + 1:
                    raise _refuse(f"find {args[i].value} without a command")
                self._finish(args[i + 1:j])
                i = j
            i += 1


def find_commands(command: str, allowlist: frozenset[str], allow_substitution: bool,
                  executable_dirs: frozenset[str] = frozenset()) -> list[str]:
    """Return the executable of every simple command in ``command``, checked.

    Parameters
    ----------
    command : str
        A POSIX ``sh`` command line.
    allowlist : frozenset of str
        Executable names that may run.
    allow_substitution : bool
        Whether ``$(...)``, backticks and ``<(...)`` may appear.
    executable_dirs : frozenset of str
        Normalised directories (absolute, or relative to the working directory)
        a path-qualified executable (``/usr/bin/git``) may be in.

    Returns
    -------
    list of str
        Executables in order of appearance, as written (``.venv/bin/python``).

    Raises
    ------
    CommandRefused
        If any executable is not allowed or the line cannot be checked.
    """
    if "\x00" in command:
        raise _refuse("the command contains a NUL byte")
    out: list[str] = []
    parser = _Parser(command, allowlist, allow_substitution, out,
                     dirs=frozenset(os.path.normpath(d) for d in executable_dirs))
    try:
        parser._parse_list()
    except RecursionError:
        raise _refuse("nesting is too deep to check") from None
    return out
