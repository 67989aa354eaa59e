"""Budget definitions and the :class:`Ledger` that keeps budgets and reservations.

Pure bookkeeping: no locking, no waiting and no Dask scheduler here.  The
scheduler extension (:mod:`obdask.llm.budget.extension`) and the process-local
backend (:mod:`obdask.llm.budget.reservation`) wrap a :class:`Ledger` with both.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dask

from obdask import config
from obdask.exceptions import ConfigError

logger = logging.getLogger(__name__)

SCOPES = ("model", "endpoint", "plan", "cluster")
MODES = ("wait", "fail")
COLUMNS = [
    "name",
    "scope",
    "match",
    "tokens",
    "window",
    "on_exhausted",
    "used",
    "reserved",
    "available",
    "calls",
    "reservations",
]


def _canonical_model(name: str) -> str:
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


@dataclass
class Budget:
    """One token budget and its usage (kept by a :class:`Ledger`)."""

    name: str
    tokens: int
    scope: str = "cluster"
    match: str | None = None
    window: float | None = None
    on_exhausted: str | None = None
    reserved: int = 0
    used_total: int = 0
    calls: int = 0
    events: deque = field(default_factory=deque)
    _window_sum: int = 0

    def matches(self, model: str | None, endpoint: str | None, plan: str | None) -> bool:
        """True if a call with these attributes counts against this budget."""
        if self.scope == "cluster" or self.match in (None, "", "*"):
            return True
        value = {"model": model, "endpoint": endpoint, "plan": plan}[self.scope]
        if value is None:
            return False
        if self.scope == "model":
            return fnmatch.fnmatchcase(_canonical_model(value), _canonical_model(self.match))
        if self.scope == "endpoint":
            return fnmatch.fnmatchcase(value.rstrip("/"), self.match.rstrip("/"))
        return fnmatch.fnmatchcase(value, self.match)

    def used(self, now: float) -> int:
        """Tokens spent in the current window (all time if there is no window)."""
        if self.window is None:
            return self.used_total
        while self.events and self.events[0][0] <= now - self.window:
            self._window_sum -= self.events.popleft()[1]
        return self._window_sum

    def available(self, now: float) -> int:
        """Tokens that a new reservation may still take."""
        return self.tokens - self.used(now) - self.reserved

    def charge(self, tokens: int, now: float) -> None:
        """Record ``tokens`` spent by one call."""
        self.used_total += tokens
        self.calls += 1
        if self.window is not None:
            self.events.append((now, tokens))
            self._window_sum += tokens

    def next_expiry(self, now: float) -> float | None:
        """When the oldest spending leaves the window (None without a window)."""
        if self.window is None or not self.events:
            return None
        return self.events[0][0] + self.window

    def describe(self) -> str:
        """``'daily' (scope model, match 'm1', 1000 tokens per 86400s)``."""
        what = f"scope {self.scope}" + (f", match {self.match!r}" if self.match else "")
        per = f" per {self.window:g}s" if self.window else ""
        return f"{self.name!r} ({what}, {self.tokens} tokens{per})"

    def row(self, now: float, reservations: int = 0) -> dict[str, Any]:
        """One row of :func:`budgets`."""
        return {
            "name": self.name,
            "scope": self.scope,
            "match": self.match,
            "tokens": self.tokens,
            "window": self.window,
            "on_exhausted": self.on_exhausted,
            "used": self.used(now),
            "reserved": self.reserved,
            "available": self.available(now),
            "calls": self.calls,
            "reservations": reservations,
        }


def configured_budgets(value: Any = None) -> list[dict[str, Any]]:
    """``obdask.llm.budgets`` (or ``value``) as a list of budget dicts, each validated.

    Raises
    ------
    ConfigError
        Not a list of mappings, or an entry :func:`parse_budget` refuses.
    """
    raw = config.get("llm.budgets", value) or []
    if isinstance(raw, Mapping) or not isinstance(raw, (list, tuple)) or not all(
            isinstance(b, Mapping) for b in raw):
        raise ConfigError(f"obdask.llm.budgets: {raw!r} is not a list of budgets, e.g. "
                          "[{name: daily, tokens: 2000000, window: 1d}]")
    specs = [dict(b) for b in raw]
    for spec in specs:
        parse_budget(spec)
    return specs


def parse_budget(spec: Mapping[str, Any]) -> Budget:
    """Validate one budget definition from config or :func:`set_budget`.

    Raises
    ------
    ConfigError
        A field is missing or invalid; the message names the budget and the fix.
    """
    spec = {str(k).replace("-", "_"): v for k, v in dict(spec).items()}
    name = spec.get("name")
    if not name or not isinstance(name, str):
        raise ConfigError(f"obdask.llm.budgets: entry {spec!r} needs a 'name' (a string)")
    scope = spec.get("scope") or "cluster"
    if scope not in SCOPES:
        raise ConfigError(f"budget {name!r}: scope {scope!r} is not one of {', '.join(SCOPES)}")
    tokens = spec.get("tokens")
    if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or tokens < 0:
        raise ConfigError(f"budget {name!r}: tokens {tokens!r} must be a number >= 0")
    window = spec.get("window")
    if window is not None:
        try:
            window = float(dask.utils.parse_timedelta(window, default="s"))
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise ConfigError(
                f"budget {name!r}: window {window!r} is not a duration (use e.g. '1d')"
            ) from exc
        if window <= 0:
            raise ConfigError(f"budget {name!r}: window must be positive or null")
    mode = spec.get("on_exhausted")
    if mode is not None and mode not in MODES:
        raise ConfigError(f"budget {name!r}: on-exhausted {mode!r} must be 'wait' or 'fail'")
    match = spec.get("match")
    return Budget(
        name=name,
        tokens=int(tokens),
        scope=scope,
        match=None if match is None else str(match),
        window=window,
        on_exhausted=mode,
    )


@dataclass
class Reservation:
    """Tokens held for one in-flight call, and who holds them."""

    id: str
    amount: int
    budgets: list[str]
    model: str | None = None
    endpoint: str | None = None
    plan: str | None = None
    job: str | None = None
    key: Any = None
    worker: str | None = None
    client: str | None = None
    ts: float = 0.0


class Ledger:
    """Budgets and reservations; no locking or waiting (callers provide both).

    Parameters
    ----------
    budgets : iterable of mapping
        Initial definitions (see :func:`parse_budget`).
    default_mode : str, optional
        ``"wait"`` or ``"fail"`` for budgets without ``on_exhausted``;
        default ``obdask.llm.on-exhausted``.
    """

    def __init__(
        self, budgets: Iterable[Mapping[str, Any]] = (), default_mode: str | None = None
    ) -> None:
        self.budgets: dict[str, Budget] = {}
        self.reservations: dict[str, Reservation] = {}
        self.default_mode = default_mode or config.get("llm.on-exhausted") or "wait"
        if self.default_mode not in MODES:
            raise ConfigError(
                f"obdask.llm.on-exhausted is {self.default_mode!r}; use 'wait' or 'fail'"
            )
        for spec in budgets or ():
            self.set_budget(spec)

    def set_budget(self, spec: Mapping[str, Any]) -> Budget:
        """Add or redefine a budget; a redefinition keeps usage and reservations."""
        new = parse_budget(spec)
        old = self.budgets.get(new.name)
        if old is not None:
            new.reserved, new.used_total, new.calls = old.reserved, old.used_total, old.calls
            new.events, new._window_sum = old.events, old._window_sum
            if new.window is None:
                new.events, new._window_sum = deque(), 0
        self.budgets[new.name] = new
        return new

    def remove_budget(self, name: str) -> bool:
        """Delete a budget; True if it existed."""
        for res in self.reservations.values():
            if name in res.budgets:
                res.budgets.remove(name)
        return self.budgets.pop(name, None) is not None

    def matching(self, model: str | None, endpoint: str | None, plan: str | None) -> list[Budget]:
        """Budgets a call with these attributes counts against."""
        return [b for b in self.budgets.values() if b.matches(model, endpoint, plan)]

    def try_reserve(self, rid: str, amount: int, now: float, **attrs: Any) -> dict[str, Any]:
        """Reserve ``amount`` tokens in every matching budget, or say why not.

        Returns
        -------
        dict
            ``status``: ``"ok"`` (with ``budgets``, the matched names),
            ``"blocked"`` (no room now, the budget waits; with ``wake_at``)
            or ``"exhausted"`` (no room and the budget fails fast, or the
            call is larger than the whole budget); plus ``budget`` and a
            ``message`` when not ok.
        """
        if rid in self.reservations:
            return {"status": "ok", "budgets": list(self.reservations[rid].budgets)}
        matched = self.matching(attrs.get("model"), attrs.get("endpoint"), attrs.get("plan"))
        for b in matched:
            if amount > b.tokens:
                msg = (
                    f"token budget {b.describe()} can never fit a call reserving {amount} "
                    f"tokens{_for_job(attrs)}; raise its tokens or lower options.num_predict"
                )
                return {"status": "exhausted", "budget": b.name, "message": msg}
        blocked = [b for b in matched if b.available(now) < amount]
        if blocked:
            b = blocked[0]
            mode = b.on_exhausted or self.default_mode
            msg = (
                f"token budget {b.describe()} has {max(0, b.available(now))} tokens left "
                f"({b.used(now)} used, {b.reserved} reserved); the call needs {amount}"
                f"{_for_job(attrs)}; raise the budget, wait for its window, or set "
                "on-exhausted: wait"
            )
            status = "blocked" if mode == "wait" else "exhausted"
            return {
                "status": status,
                "budget": b.name,
                "message": msg,
                "wake_at": b.next_expiry(now),
            }
        names = [b.name for b in matched]
        if names:
            for b in matched:
                b.reserved += amount
            known = {
                k: attrs.get(k)
                for k in ("model", "endpoint", "plan", "job", "key", "worker", "client")
            }
            self.reservations[rid] = Reservation(rid, amount, names, ts=now, **known)
        return {"status": "ok", "budgets": names}

    def settle(self, rid: str, tokens: int, now: float, **attrs: Any) -> None:
        """Replace reservation ``rid`` by the ``tokens`` the call really used.

        If the reservation was already released (its task was cancelled while
        the call ran on), the tokens are charged to the matching budgets anyway.
        """
        res = self.reservations.pop(rid, None)
        if res is None:
            for b in self.matching(attrs.get("model"), attrs.get("endpoint"), attrs.get("plan")):
                b.charge(int(tokens), now)
            return
        for name in res.budgets:
            held = self.budgets.get(name)
            if held is not None:
                held.reserved -= res.amount
                held.charge(int(tokens), now)

    def release(self, rid: str) -> bool:
        """Drop reservation ``rid`` without spending; True if it existed."""
        res = self.reservations.pop(rid, None)
        if res is None:
            return False
        for name in res.budgets:
            if name in self.budgets:
                self.budgets[name].reserved -= res.amount
        return True

    def release_where(self, **owner: Any) -> list[str]:
        """Release every reservation whose fields equal ``owner`` (e.g. ``worker=addr``)."""
        ids = [
            rid
            for rid, res in self.reservations.items()
            if all(getattr(res, k) == v for k, v in owner.items())
        ]
        for rid in ids:
            self.release(rid)
        return ids

    def wake_at(self, now: float) -> float | None:
        """Earliest time some windowed budget frees tokens."""
        times = [t for b in self.budgets.values() if (t := b.next_expiry(now)) is not None]
        return min(times, default=None)

    def state(self, now: float) -> dict[str, Any]:
        """``{"budgets": [row, ...], "reservations": [dict, ...]}`` (msgpack friendly)."""
        counts: dict[str, int] = defaultdict(int)
        for res in self.reservations.values():
            for name in res.budgets:
                counts[name] += 1
        return {
            "budgets": [b.row(now, counts[b.name]) for b in self.budgets.values()],
            "reservations": [
                {k: (v if k != "key" else _key_str(v)) for k, v in vars(r).items()}
                for r in self.reservations.values()
            ],
        }


def _for_job(attrs: Mapping[str, Any]) -> str:
    parts = [f"model {attrs['model']!r}" if attrs.get("model") else ""]
    if attrs.get("job"):
        parts.append(f"job {attrs['job']!r}")
    if attrs.get("plan"):
        parts.append(f"plan {attrs['plan']!r}")
    text = ", ".join(p for p in parts if p)
    return f" ({text})" if text else ""


def _key_str(key: Any) -> Any:
    if isinstance(key, (list, tuple)):
        return str(tuple(key))
    return key



def out_of_time(result: dict[str, Any], timeout: float | None, left: float | None) -> bool:
    """True when a blocked reservation must stop waiting (then ``result`` says why)."""
    if left is None or left > 0:
        return False
    if timeout:
        result["status"] = "exhausted"
        result["message"] += f" (waited {timeout:g}s, obdask.llm.budget-timeout)"
    return True


def wait_time(result: dict[str, Any], left: float | None, now: float) -> float | None:
    """Seconds to wait before trying again: until a window frees room, or ``left``."""
    wait = left
    if result.get("wake_at") is not None:
        until = max(0.01, result["wake_at"] - now + 0.01)
        wait = until if wait is None else min(wait, until)
    return wait
