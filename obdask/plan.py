"""Parse and validate plans: the markdown job DSL of the single-machine tool.

A plan is a markdown file: a ``# Plan:`` title, an optional ``policy:`` line,
optional ``plan_id=`` and ``workspace=`` lines, and one step per checklist
line (``- [ ]`` to run, ``- [x]`` already done)::

    - [ ] id=build lane=2 deps=fetch payload=@cmd:make -j4 retries=2

This module imports no ``distributed`` (only ``dask.utils`` and ``dask.config``
for units and settings), so ``obdask validate`` and ``obdask explain`` work
without a cluster.  Every problem is reported as a
:class:`~obdask.exceptions.PlanError` naming file, line and cause; lines inside
fenced code blocks are examples, never steps.
"""

from __future__ import annotations

import difflib
import graphlib
import heapq
import logging
import math
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from obdask.exceptions import PlanError
from obdask.units import parse_bytes, parse_duration

logger = logging.getLogger(__name__)

PREFIXES = ("@cmd:", "@file:", "@doc:", "@url:", "@git:", "@gh:")
METADATA_PREFIXES = ("@doc:", "@url:", "@git:", "@gh:")
FIELDS = (
    "id", "lane", "deps", "dedupe", "payload",
    "resources", "retries", "timeout", "model", "locality", "network",
)
REQUIRED = ("id", "lane", "payload")
LLM_TASK = "LLM_TASK"
#: Bounds of the numeric step fields (a larger value is a PlanError, not an overflow later).
MAX_LANE = 9999
MAX_RETRIES = 100
MAX_TIMEOUT = 30 * 86400.0  # seconds: 30 days
MAX_RESOURCE = 1e18         # any resource amount (1e18 bytes is an exabyte)
#: Longest step id, plan id or dedupe key, in UTF-8 bytes: they name files and folders
#: (``jobs/<id>.json``), and a file name holds 255 bytes.
MAX_ID_BYTES = 128

_STEP_RE = re.compile(r"^\s*[-*]\s+\[( |x|X)\]\s+(.*?)\s*$")
# A line that carries step fields but is not a step line (e.g. "- [] id=a ..."): a typo
# that would otherwise drop the step without a word.
_NEAR_STEP_RE = re.compile(r"(^|[\s\]])id=\S+.*\spayload=\S")
_LOCALITY_RE = re.compile(r"^git:\S+$")  # git:<url>@<rev> (or git:<path> of a checkout)
_DIGITS_RE = re.compile(r"[0-9]+")  # ASCII only: int() also reads "1_0", "+1" and "١٢"
# A fence opens with 3+ backticks or tildes (a backtick fence's info string holds no
# backtick) and closes with 3+ of the same character, at least as many, and nothing else.
_FENCE_RE = re.compile(r"^\s*(`{3,}(?=[^`]*$)|~{3,})")
_TRAILING_RE = re.compile(r"\s+(deps|dedupe)=(\S*)$")
_ID_RE = re.compile(r"^(?!\.+$)[\w.\-]+$")  # not "." or "..": ids become path parts
_SHA1_RE = re.compile(r"^[0-9a-fA-F]{40}$")
_SLUG_RE = re.compile(r"[^a-zA-Z0-9_.\-]")
_PLAN_ID_RE = re.compile(r"^\s*plan_id\s*=\s*(\S+)\s*$")
_WORKSPACE_RE = re.compile(r"^\s*workspace\s*=\s*(\S+)\s*$")
_POLICY_RE = re.compile(r"^\s*policy\s*:(.*)$", re.IGNORECASE)
_TITLE_RE = re.compile(r"^\s*#\s*plan\s*:\s*(.*?)\s*$", re.IGNORECASE)
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


@dataclass(frozen=True)
class Payload:
    """A parsed pointer payload.

    Attributes
    ----------
    prefix
        One of :data:`PREFIXES` without the ``@`` and ``:`` (``"cmd"``, ``"file"``...).
    body
        Everything after the prefix (for ``@file:`` without the ``#`` fragment).
    apply, test
        ``@file:...#apply`` / ``#test`` flags.
    sha1
        Pinned content hash from ``#sha1=<hex>``, lower case.
    """

    prefix: str
    body: str
    raw: str
    apply: bool = False
    test: bool = False
    sha1: str | None = None

    @property
    def is_metadata(self) -> bool:
        """True for payloads that complete at compile time (``@doc:``, ``@url:``...)."""
        return f"@{self.prefix}:" in METADATA_PREFIXES

    @property
    def is_model_task(self) -> bool:
        """True for a bare ``@file:`` (a spec for a language model)."""
        return self.prefix == "file" and not (self.apply or self.test)


@dataclass
class Step:
    """One checklist line of a plan."""

    id: str
    lane: int
    payload: Payload
    line: int
    deps: tuple[str, ...] = ()
    dedupe: str | None = None
    done: bool = False
    resources: dict[str, float] = field(default_factory=dict)
    retries: int | None = None
    timeout: float | None = None
    model: str | None = None
    locality: str | None = None
    llm_task: bool = False  # an @doc:LLM_TASK step in a plan with llm_doc_tasks=true
    network: bool = False   # network=true: this @cmd: step's sandbox shares the host network

    @property
    def is_model_task(self) -> bool:
        """True when the step is a task for a language model."""
        return self.payload.is_model_task or self.llm_task

    @property
    def is_metadata(self) -> bool:
        """True when the step completes at compile time (metadata payload)."""
        return self.payload.is_metadata and not self.llm_task

    @property
    def dedupe_key(self) -> str | None:
        """The content key that marks this step done: ``dedupe=`` or ``#sha1=``.

        A pinned ``#apply`` diff is no dedupe key: the step changes its workspace, and
        a workspace reset since the diff was last applied needs it applied again (the
        apply itself skips a diff that is already there).
        """
        if self.dedupe:
            return self.dedupe
        return None if self.payload.apply else self.payload.sha1


@dataclass
class Plan:
    """A parsed, validated plan.

    Build one with :meth:`from_file` or :meth:`from_text`.
    """

    plan_id: str
    steps: list[Step]
    path: str | None = None
    title: str | None = None
    policy: dict[str, bool] = field(default_factory=dict)
    workspace: str | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], max_bytes: int | None = None) -> Plan:
        """Read and validate a plan file (local path).

        Parameters
        ----------
        path
            The plan file; it must be a regular file (a FIFO, device or
            directory is refused at once, without reading).
        max_bytes
            Largest plan accepted; default ``obdask.plan.max-bytes``.

        Raises
        ------
        PlanError
            The file is missing, unreadable, not a regular file, too large,
            not UTF-8, or an invalid plan.
        """
        return cls.from_text(read_plan_text(path, max_bytes), path=os.fspath(path))

    @classmethod
    def from_text(cls, text: str, path: str | None = None, plan_id: str | None = None) -> Plan:
        """Parse and validate plan text; ``path`` names the file in errors."""
        return parse(text, path=path, plan_id=plan_id)

    @property
    def folder(self) -> str:
        """The folder relative paths in the plan resolve against."""
        return os.path.dirname(os.path.abspath(self.path)) if self.path else os.getcwd()

    @property
    def steps_by_id(self) -> dict[str, Step]:
        return {s.id: s for s in self.steps}

    def key(self, step_id: str) -> str:
        """Global job id ``{plan_id}::{step_id}``."""
        return f"{self.plan_id}::{step_id}"


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def read_plan_text(path: str | os.PathLike[str], max_bytes: int | None = None) -> str:
    """The text of a plan file: a regular file of at most ``max_bytes``, UTF-8.

    The file is opened without blocking (``O_NONBLOCK``: a FIFO with no
    writer does not hang) and checked with ``fstat`` on the open descriptor,
    so what is checked is what is read.  A UTF-8 BOM is kept (:func:`parse`
    drops it).

    Raises
    ------
    PlanError
        Naming the file and what is wrong with it.
    """
    from obdask import config  # dask.config; kept out of import time

    path = os.fspath(path)
    limit = config.get_bytes("plan.max-bytes", max_bytes)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        raise PlanError(f"{path}: plan file not found") from exc
    except OSError as exc:
        try:  # a socket cannot be opened at all (ENXIO): say what it is
            _check_regular(path, os.stat(path).st_mode)
        except OSError:
            pass
        raise PlanError(f"{path}: cannot read plan file: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        _check_regular(path, info.st_mode)
        if info.st_size > limit:
            raise PlanError(f"{path}: plan file is {info.st_size} bytes, more than "
                            f"obdask.plan.max-bytes ({limit}); split the plan or raise "
                            "the limit")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            data = f.read(limit + 1)  # the file may have grown since fstat
    except OSError as exc:
        raise PlanError(f"{path}: cannot read plan file: {exc.strerror or exc}") from exc
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > limit:
        raise PlanError(f"{path}: plan file is more than obdask.plan.max-bytes ({limit}) "
                        "bytes; split the plan or raise the limit")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError(f"{path}: plan file is not UTF-8 text (byte {exc.start}: "
                        f"{exc.reason})") from exc


def _check_regular(path: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "a special file")
        raise PlanError(f"{path}: not a regular file ({kind}); a plan must be a markdown file")


def _check_id(what: str, value: str, errors: _Errors, line: int | None,
              fix: str = "") -> bool:
    """Add an error if ``value`` is not a valid id (characters, length); True if valid."""
    what += "" if what.endswith("=") else " "
    if not _ID_RE.match(value):
        errors.add(line, f"{what}{value!r} may only hold letters, digits, '_', '.', "
                         "'-' (not dots only)")
        return False
    size = len(value.encode("utf-8"))
    if size > MAX_ID_BYTES:
        shown = f"{value[:20]}...{value[-8:]}"
        length = (f"{len(value)} characters long" if size == len(value)
                  else f"{size} bytes long in UTF-8")
        errors.add(line, f"{what}{shown!r} is {length}; at most {MAX_ID_BYTES} "
                         f"(ids name files of the run records){fix}")
        return False
    return True


def slugify(name: str) -> str:
    """Plan id from a file name: characters outside ``[a-zA-Z0-9_.-]`` become ``_``."""
    slug = _SLUG_RE.sub("_", name)
    return slug if slug.strip(".") else "plan"  # "", "." and ".." are no plan ids


class _Errors:
    """Collects every problem so ``obdask validate`` can list them all."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.items: list[str] = []
        self.lines: list[int] = []  # line of each item (0: the whole file)

    def add(self, line: int | None, message: str) -> None:
        loc = f"{self.where}:{line}" if line else self.where
        self.items.append(f"{loc}: {message}")
        self.lines.append(line or 0)

    def raise_if_any(self) -> None:
        if self.items:
            more = f" (and {len(self.items) - 1} more problems)" if len(self.items) > 1 else ""
            err = PlanError(self.items[0] + more)
            err.errors = list(self.items)  # type: ignore[attr-defined]
            raise err


def parse(text: str, path: str | None = None, plan_id: str | None = None) -> Plan:
    """Parse plan ``text`` into a validated :class:`Plan`.

    Raises
    ------
    PlanError
        With every problem found, each naming file, line and cause.
    """
    where = path or "<plan>"
    if not isinstance(text, str):
        raise PlanError(f"{where}: plan text must be a string, not {type(text).__name__}")
    plan, errors = parse_all(text, path, plan_id)
    errors.raise_if_any()
    return plan


def parse_all(text: str, path: str | None = None,
              plan_id: str | None = None) -> tuple[Plan, _Errors]:
    """Parse ``text`` and return the plan of its valid steps and every problem found.

    For :mod:`obdask.validate`, which adds the refusals of ``run`` to the
    plan's own errors; :func:`parse` raises instead.
    """
    errors = _Errors(path or "<plan>")
    if text.startswith("\ufeff"):  # a UTF-8 byte order mark is not part of the first line
        text = text[1:]
    title = policy_line = None
    found_id = workspace = None
    policy: dict[str, bool] = {}
    steps: list[Step] = []
    fence: tuple[str, int] | None = None  # (marker, line it opened on) of an open fence
    hidden: list[int] = []  # step lines inside fences
    for lineno, line in enumerate(text.splitlines(), start=1):
        if fence is not None:
            # Inside a fenced code block everything is an example, never a step.
            if line.strip().startswith(fence[0]) and not line.strip().strip(fence[0][0]):
                fence = None
            elif _STEP_RE.match(line):
                hidden.append(lineno)
            continue
        if m := _FENCE_RE.match(line):
            fence = (m.group(1), lineno)
            continue
        m = _STEP_RE.match(line)
        if m:
            step = _parse_step(m.group(2), m.group(1) != " ", lineno, errors)
            if step is not None:
                steps.append(step)
        elif _NEAR_STEP_RE.search(line):
            errors.add(lineno, "this line has step fields but is not a step line; write "
                               "'- [ ] id=... lane=... payload=...' ('- [x]' when done)")
        elif (m := _PLAN_ID_RE.match(line)) and found_id is None:
            found_id = m.group(1)
        elif (m := _WORKSPACE_RE.match(line)) and workspace is None:
            workspace = m.group(1)
        elif (m := _POLICY_RE.match(line)) and policy_line is None:
            policy_line = lineno
            policy = _parse_policy(m.group(1), lineno, errors)
        elif title is None and (m := _TITLE_RE.match(line)):
            title = m.group(1)
    if fence is not None and hidden:
        errors.add(fence[1], f"code fence {fence[0]} opened here is never closed, so the "
                             f"{len(hidden)} step line(s) after it (first on line {hidden[0]}) "
                             f"are examples, not steps; close it with a {fence[0]} line")
    if plan_id is None:
        stem = os.path.splitext(os.path.basename(path))[0] if path else "plan"
        plan_id = found_id or slugify(stem)
    _check_id("plan_id", plan_id, errors, None,
              "" if found_id else "; add a shorter plan_id= line")
    if policy.get("accrue_all_ideas"):
        _check_orphans(text, errors)
    if policy.get("llm_doc_tasks"):
        # Opt-in: "@doc:LLM_TASK review go.mod" becomes a model task, not a note.
        for step in steps:
            if step.payload.prefix == "doc" and step.payload.body.startswith(LLM_TASK):
                step.llm_task = True
    _validate(steps, errors)
    if not steps and not errors.items:
        errors.add(None, "no steps found; a step is a line such as "
                         "'- [ ] id=build lane=1 payload=@cmd:make'")
    return Plan(plan_id=plan_id, steps=steps, path=path, title=title, policy=policy,
                workspace=workspace), errors


def _parse_policy(body: str, lineno: int, errors: _Errors) -> dict[str, bool]:
    policy: dict[str, bool] = {}
    for item in filter(None, (p.strip() for p in body.replace(";", ",").split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip().lower()
        if not sep or value not in _TRUE | _FALSE:
            errors.add(lineno, f"policy item {item!r} must look like name=true or name=false")
            continue
        policy[key] = value in _TRUE
    return policy


def _check_orphans(text: str, errors: _Errors) -> None:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if "TODO_ORPHAN:" in line:
            errors.add(lineno, "policy accrue_all_ideas=true forbids TODO_ORPHAN: markers; "
                               "turn the idea into a step or remove the marker")


def _split_fields(body: str, lineno: int, errors: _Errors) -> dict[str, str] | None:
    """Split a step body into fields; ``payload=`` runs to the end of the line."""
    fields: dict[str, str] = {}
    head, sep, payload = body.partition("payload=")
    if sep and head and not head[-1].isspace():
        # "xpayload=" is not the payload field; treat the whole as a head token
        head, payload, sep = body, "", ""
    if sep:
        # Trailing deps=/dedupe= still count as fields (single-machine compatibility).
        while m := _TRAILING_RE.search(payload):
            if m.group(1) in fields:
                break
            fields[m.group(1)] = m.group(2)
            payload = payload[: m.start()]
        fields["payload"] = payload.strip()
    for token in head.split():
        key, eq, value = token.partition("=")
        if not eq:
            errors.add(lineno, f"expected key=value, got {token!r}")
            return None
        if key not in FIELDS:
            hint = difflib.get_close_matches(key, FIELDS, n=1)
            tip = f" (did you mean {hint[0]!r}?)" if hint else f" (known: {', '.join(FIELDS)})"
            errors.add(lineno, f"unknown field {key!r}{tip}")
            return None
        if key in fields:
            errors.add(lineno, f"field {key!r} given twice")
            return None
        fields[key] = value
    return fields


def _parse_step(body: str, done: bool, lineno: int, errors: _Errors) -> Step | None:
    fields = _split_fields(body, lineno, errors)
    if fields is None:
        return None
    missing = [f for f in REQUIRED if not fields.get(f)]
    if missing:
        sid = f" {fields['id']!r}" if fields.get("id") else ""
        errors.add(lineno, f"step{sid} is missing required field(s): {', '.join(missing)}")
        return None
    sid = fields["id"]
    n_before = len(errors.items)
    _check_id("step id", sid, errors, lineno)
    if fields.get("dedupe"):
        # The key names a file in the artifact store: no '/' and no '..'.
        _check_id(f"step {sid[:40]!r}: dedupe=", fields["dedupe"], errors, lineno)
    lane = _parse_int(fields["lane"], "lane", sid, lineno, errors, MAX_LANE)
    payload = parse_payload(fields["payload"], sid, lineno, errors)
    deps = _parse_list("deps", fields.get("deps", ""), sid, lineno, errors)
    locality = fields.get("locality") or None
    if locality is not None and not _LOCALITY_RE.match(locality):
        errors.add(lineno, f"step {sid!r}: locality={locality!r} is not a locality; use "
                           "locality=git:<url>@<rev> (a repository and revision to run in)")
    step = Step(id=sid, lane=lane or 0, payload=payload, line=lineno, deps=deps,
                dedupe=fields.get("dedupe") or None, done=done,
                model=fields.get("model") or None, locality=locality)
    if "retries" in fields:
        step.retries = _parse_int(fields["retries"], "retries", sid, lineno, errors,
                                  MAX_RETRIES)
    if "timeout" in fields:
        step.timeout = _parse_value(parse_duration, fields["timeout"], "timeout", sid, lineno,
                                    errors, "a duration such as 90s or 5m", MAX_TIMEOUT,
                                    "30 days")
    if "network" in fields:
        value = fields["network"].lower()
        if value not in _TRUE | _FALSE:
            errors.add(lineno, f"step {sid!r}: network={fields['network']!r} is not true or "
                               "false")
        elif value in _TRUE and payload.prefix != "cmd":
            errors.add(lineno, f"step {sid!r}: network=true applies to @cmd: steps only "
                               f"(this one is @{payload.prefix}:)")
        step.network = value in _TRUE
    if "resources" in fields and _parse_list("resources", fields["resources"], sid, lineno,
                                             errors, unique=False):
        step.resources = _parse_resources(fields["resources"], sid, lineno, errors)
    return step if len(errors.items) == n_before else None


def _parse_list(name: str, value: str, sid: str, lineno: int, errors: _Errors,
                unique: bool = True) -> tuple[str, ...]:
    """Comma-separated items; an empty item (``deps=,a,,``) or a repeat is an error."""
    if not value:
        return ()
    items = tuple(value.split(","))
    if "" in items:
        errors.add(lineno, f"step {sid!r}: {name}={value!r} has an empty item; separate "
                           "items with single commas and no spaces (deps=a,b)")
        return ()
    seen: set[str] = set()
    for item in items if unique else ():
        if item in seen:
            errors.add(lineno, f"step {sid!r}: {name}={value!r} names {item!r} twice")
            return ()
        seen.add(item)
    return items


def _parse_int(value: str, name: str, sid: str, lineno: int, errors: _Errors,
               maximum: int) -> int | None:
    """A whole number in ASCII digits, ``0 <= n <= maximum``; else an error and None."""
    if value.startswith("-") and _DIGITS_RE.fullmatch(value[1:]):
        errors.add(lineno, f"step {sid!r}: {name}={value!r} must not be negative")
        return None
    if not _DIGITS_RE.fullmatch(value):
        errors.add(lineno, f"step {sid!r}: {name}={value!r} is not an integer (digits 0-9 "
                           "only)")
        return None
    # compare lengths first: int() of a very long digit string is slow or refused
    if len(value.lstrip("0")) > len(str(maximum)) or int(value) > maximum:
        errors.add(lineno, f"step {sid!r}: {name}={value!r} is more than {maximum}")
        return None
    return int(value)


def _parse_value(parser: Callable[[str], float], value: str, name: str, sid: str,
                 lineno: int, errors: _Errors, expected: str, maximum: float,
                 shown_max: str) -> float | None:
    """``parser(value)`` bounded to ``0 <= x <= maximum``; else an error and None."""
    try:
        number = parser(value)
    except ValueError:
        errors.add(lineno, f"step {sid!r}: {name}={value!r} is not {expected}")
        return None
    if math.isnan(number) or number < 0:
        errors.add(lineno, f"step {sid!r}: {name}={value!r} is not {expected}")
        return None
    if number > maximum:  # inf too (1e400)
        errors.add(lineno, f"step {sid!r}: {name}={value!r} is more than {shown_max}")
        return None
    return number


def _parse_resources(value: str, sid: str, lineno: int, errors: _Errors) -> dict[str, float]:
    """``GPU:1,VRAM:16GB`` -> ``{"GPU": 1.0, "VRAM": 16e9}``."""
    resources: dict[str, float] = {}
    for item in filter(None, value.split(",")):
        name, sep, amount = item.partition(":")
        if not sep or not name:
            errors.add(lineno, f"step {sid!r}: resources item {item!r} must be NAME:AMOUNT "
                               "(e.g. resources=GPU:1,VRAM:16GB)")
            continue
        parsed = _parse_value(parse_bytes, amount, f"resources {name}", sid, lineno, errors,
                              "an amount >= 0 or a size (e.g. GPU:1,VRAM:16GB)",
                              MAX_RESOURCE, f"{MAX_RESOURCE:g}")
        if parsed is not None:
            resources[name] = float(parsed)
    return resources


def parse_payload(raw: str, sid: str = "?", lineno: int | None = None,
                  errors: _Errors | None = None) -> Payload:
    """Parse a pointer payload such as ``@file:specs/x.diff#sha1=<hex>#apply``."""
    own = errors is None
    errors = errors or _Errors("<payload>")
    prefix = next((p for p in PREFIXES if raw.startswith(p)), None)
    if prefix is None:
        got = raw.split(":", 1)[0] + ":" if ":" in raw else raw[:20]
        errors.add(lineno, f"step {sid!r}: invalid payload prefix {got!r} "
                           f"(use one of {', '.join(PREFIXES)})")
        if own:
            errors.raise_if_any()
        return Payload(prefix="invalid", body=raw, raw=raw)
    name, body = prefix[1:-1], raw[len(prefix):].strip()
    if not body and name in ("cmd", "file"):
        errors.add(lineno, f"step {sid!r}: {prefix} payload is empty")
    payload = Payload(prefix=name, body=body, raw=raw)
    if name == "file" and "#" in body:
        payload = _parse_file_fragment(payload, sid, lineno, errors)
    if own:
        errors.raise_if_any()
    return payload


def _parse_file_fragment(payload: Payload, sid: str, lineno: int | None,
                         errors: _Errors) -> Payload:
    path, *parts = payload.body.split("#")
    apply = test = False
    sha1 = None
    for part in parts:
        if part == "apply":
            apply = True
        elif part == "test":
            test = True
        elif part.startswith("sha1=") and _SHA1_RE.match(part[5:]):
            sha1 = part[5:].lower()
        elif part.startswith("sha1="):
            errors.add(lineno, f"step {sid!r}: #sha1= needs 40 hex digits, got {part[5:]!r}")
        else:
            errors.add(lineno, f"step {sid!r}: unknown @file: fragment #{part} "
                               "(use #apply, #test or #sha1=<hex>)")
    if apply and test:
        errors.add(lineno, f"step {sid!r}: #apply and #test cannot be combined")
    if not path:
        errors.add(lineno, f"step {sid!r}: @file: payload names no file")
    return Payload(prefix="file", body=path, raw=payload.raw, apply=apply, test=test, sha1=sha1)


def _validate(steps: list[Step], errors: _Errors) -> None:
    by_id: dict[str, Step] = {}
    for step in steps:
        if step.id in by_id:
            errors.add(step.line, f"duplicate step id {step.id!r} "
                                  f"(first defined on line {by_id[step.id].line})")
        else:
            by_id[step.id] = step
    for step in steps:
        for dep in step.deps:
            if dep not in by_id:
                hint = difflib.get_close_matches(dep, list(by_id), n=1)
                tip = f" (did you mean {hint[0]!r}?)" if hint else ""
                errors.add(step.line, f"step {step.id!r} depends on unknown step {dep!r}{tip}")
            elif dep == step.id:
                errors.add(step.line, f"step {step.id!r} depends on itself")
        body = step.payload.body
        if step.payload.prefix == "file" and body.startswith("job:") and \
                body[4:] not in step.deps:
            errors.add(step.line, f"step {step.id!r} reads @file:{body} but {body[4:]!r} is "
                                  f"not in its deps (add deps={body[4:]})")
    # Reported together with every other problem (unknown and self deps are left out).
    cycle = find_cycle(by_id)
    if cycle:
        # "a -> b": a depends on b
        errors.add(by_id[cycle[0]].line, "dependency cycle: " + " -> ".join(cycle + [cycle[0]]))


def _graph(by_id: dict[str, Step]) -> dict[str, list[str]]:
    """``{step id: its deps}`` over known ids (unknown and self deps are reported elsewhere)."""
    return {sid: [d for d in step.deps if d in by_id and d != sid]
            for sid, step in by_id.items()}


def _in_order(position: dict[str, int], steps: Iterable[Step]) -> bool:
    """Whether every known dep of every step comes earlier in ``position`` order."""
    return all(position.get(d, i) < i for i, s in enumerate(steps) for d in s.deps
               if d != s.id)


def find_cycle(by_id: dict[str, Step]) -> list[str] | None:
    """Return the ids of one dependency cycle, each depending on the next, or None.

    Uses :class:`graphlib.TopologicalSorter`; the cycle starts at its step
    that comes first in the file.
    """
    position = {sid: i for i, sid in enumerate(by_id)}
    if _in_order(position, by_id.values()):
        return None  # every dep comes earlier in the file: no cycle is possible
    try:
        graphlib.TopologicalSorter(_graph(by_id)).prepare()
    except graphlib.CycleError as exc:
        # graphlib lists predecessors first (a dep before its dependent): reverse it
        cycle = list(reversed(exc.args[1][1:]))
        start = min(range(len(cycle)), key=lambda i: by_id[cycle[i]].line)
        return cycle[start:] + cycle[:start]
    return None


def topological_order(steps: list[Step]) -> list[Step]:
    """Steps ordered so that every step comes after its dependencies.

    Stable: among the steps whose dependencies are all placed, the one that
    comes first in the file goes next, so a plan already in dependency order
    keeps its order (:class:`graphlib.TopologicalSorter` with a heap).

    Raises
    ------
    graphlib.CycleError
        If the steps have a dependency cycle (a validated plan has none).
    """
    position = {s.id: i for i, s in enumerate(steps)}
    if _in_order(position, steps):
        return list(steps)  # already in dependency order (the usual plan): nothing to sort
    by_id = {s.id: s for s in steps}
    sorter = graphlib.TopologicalSorter(_graph(by_id))
    sorter.prepare()
    ready: list[int] = []
    order: list[Step] = []
    while sorter.is_active():
        for sid in sorter.get_ready():
            heapq.heappush(ready, position[sid])
        step = steps[heapq.heappop(ready)]
        order.append(step)
        sorter.done(step.id)
    return order
