"""The metrics extension's job records: a bounded table kept as the workers packed it.

A worker sends the job records of its last flush as one *packed chunk*
(:func:`pack_jobs`: the msgpack bytes of each field's column plus a small summary
per plan, lane and status).  The scheduler stores the bytes as they came and folds
only the summary into its running totals, so taking in a job costs it nothing
per record: no decoding of one dict per job by the comm (``msgpack`` object
hooks), no dict per job kept alive (and walked by the garbage collector) for
as long as it is in the table.  Records are decoded when someone reads them
(``obdask_metrics_jobs``, a snapshot), which is rare next to how often jobs end.

Records that arrive one at a time (:meth:`JobTable.append`: an older worker,
a snapshot being loaded, tests) go into plain chunks of dicts.

The table holds at most ``maxlen`` records, oldest dropped first: a packed chunk
that is partly past the bound is skipped into (``_skip``), a plain one cut.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import msgpack

logger = logging.getLogger(__name__)

#: Records a plain chunk holds before a new one starts.
PLAIN_CHUNK = 256
#: ``(plan, lane)`` rows of the per-plan summary kept (the most recently active).
MAX_PLAN_ROWS = 1000


def pack_jobs(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One packed chunk of job ``records`` (on the worker, once per flush).

    Returns ``{"n", "columns", "summary", "first", "last"}``: ``columns`` maps each
    field any record has to the msgpack bytes of its values in record order
    (missing ones None), so a read of two fields decodes two columns;
    ``summary`` is ``[[plan, lane, status, jobs, seconds], ...]``; ``first`` and
    ``last`` bound the records' ``finished`` times (for ``since`` reads).
    """
    fields = list(dict.fromkeys(k for record in records for k in record))
    columns = {f: msgpack.packb([r.get(f) for r in records], use_bin_type=True, default=str)
               for f in fields}
    summary: dict[tuple[Any, Any, Any], list[float]] = {}
    finished = [r["finished"] for r in records if isinstance(r.get("finished"), (int, float))]
    for r in records:
        row = summary.setdefault((r.get("plan"), r.get("lane"), r.get("status")), [0, 0.0])
        row[0] += 1
        row[1] += float(r.get("duration_s") or 0)
    return {"n": len(records), "columns": columns,
            "summary": [[*key, n, seconds] for key, (n, seconds) in summary.items()],
            "first": min(finished, default=None), "last": max(finished, default=None)}


def unpack_jobs(packed: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of a chunk from :func:`pack_jobs`, as dicts (missing fields None)."""
    return _Chunk(int(packed["n"]), dict(packed["columns"])).decode()


class _Chunk:
    """Records in arrival order: packed columns (``cols``) or plain dicts (``rows``)."""

    __slots__ = ("attempts", "cols", "first", "last", "n", "plans", "rows", "worker")

    def __init__(self, n: int, cols: dict[str, bytes] | None = None, worker: str | None = None,
                 plans: frozenset[Any] | None = None, first: float | None = None,
                 last: float | None = None, attempts: dict[str, int] | None = None) -> None:
        self.n = n
        self.cols = cols
        self.rows: list[dict[str, Any]] | None = None if cols is not None else []
        self.worker = worker
        self.plans = plans  # None: not known (plain chunks)
        self.first, self.last = first, last
        self.attempts = attempts

    def decode(self, skip: int = 0) -> list[dict[str, Any]]:
        """The chunk's records from the ``skip``-th on, as fresh dicts."""
        return self.select(skip)

    def select(self, skip: int = 0, columns: list[str] | None = None, plan: str | None = None,
               since: float | None = None) -> list[dict[str, Any]]:
        """Records from the ``skip``-th on, of ``plan``, finished at or after ``since``."""
        if self.rows is not None and columns is None:  # plain records: as they came
            return [dict(r) for r in self._plain(skip, plan, since)]
        got = self.columns(skip, columns, plan, since)
        names = list(got)
        return [dict(zip(names, values, strict=True)) for values in zip(*got.values(), strict=True)]

    def _plain(self, skip: int, plan: str | None, since: float | None
               ) -> list[dict[str, Any]]:
        """The plain records from the ``skip``-th on, of ``plan``, since ``since``."""
        assert self.rows is not None
        return [r for r in self.rows[skip:]
                if (plan is None or r.get("plan") == plan)
                and (since is None or (r.get("finished") or 0) >= since)]

    def columns(self, skip: int = 0, columns: list[str] | None = None,
                plan: str | None = None, since: float | None = None) -> dict[str, list[Any]]:
        """Like :meth:`select`, as ``{field: values}``: only the fields asked are decoded.

        With ``columns`` only those fields are decoded (a runner sizing batches reads
        two of fifteen), which is most of the cost of a read.
        """
        if self.rows is not None:
            plain = self._plain(skip, plan, since)
            names = columns if columns is not None else list(
                dict.fromkeys(k for r in plain for k in r))
            return {c: [r.get(c) for r in plain] for c in names}
        assert self.cols is not None
        cache: dict[str, list[Any]] = {}

        def column(name: str) -> list[Any]:
            if name not in cache:
                raw = self.cols.get(name)  # type: ignore[union-attr]
                cache[name] = (msgpack.unpackb(raw, raw=False, use_list=True)[skip:]
                               if raw is not None else [None] * (self.n - skip))
            return cache[name]

        keep: list[int] | None = None
        if plan is not None and self.plans != frozenset([plan]):
            keep = [i for i, p in enumerate(column("plan")) if p == plan]
        if since is not None and not (self.first is not None and self.first >= since):
            done = column("finished")
            keep = [i for i in (keep if keep is not None else range(len(done)))
                    if (done[i] or 0) >= since]
        names = list(self.cols) if columns is None else list(columns)
        for extra in ("worker", "attempts"):  # what the scheduler adds (below)
            if columns is None and extra not in names:
                names.append(extra)
        out: dict[str, list[Any]] = {}
        for name in names:
            values = column(name)
            if name == "worker" and self.worker is not None:
                values = [self.worker if v is None else v for v in values]
            elif name == "attempts":
                attempts = self.attempts or {}
                jobs = column("job")
                values = [attempts.get(str(job), 1) if v is None else v
                          for v, job in zip(values, jobs, strict=True)]
            out[name] = values if keep is None else [values[i] for i in keep]
        return out


class JobTable:
    """Bounded job records (``maxlen``) with running totals (see the module docstring).

    ``totals``: jobs per status since start; ``by_plan_lane``: ``(plan, lane) ->
    [done, failed, other, seconds]`` since start, the :data:`MAX_PLAN_ROWS` most
    recently active.  Iterating gives the records oldest first, decoded.
    """

    def __init__(self, maxlen: int) -> None:
        self.maxlen = max(1, int(maxlen))
        self._chunks: deque[_Chunk] = deque()
        self._count = 0  # records in the chunks, including the skipped ones
        self._skip = 0  # records at the start of the oldest (packed) chunk past the bound
        self.totals: dict[str, int] = {}
        self.by_plan_lane: OrderedDict[tuple[str, int], list[float]] = OrderedDict()

    def __len__(self) -> int:
        return self._count - self._skip

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i, chunk in enumerate(list(self._chunks)):
            yield from chunk.decode(self._skip if i == 0 else 0)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("job record index out of range")
        index += self._skip
        for chunk in self._chunks:
            if index < chunk.n:
                return chunk.decode(index)[0]
            index -= chunk.n
        raise IndexError("job record index out of range")  # pragma: no cover

    @property
    def packed(self) -> int:
        """Records held packed as workers sent them (the rest are plain dicts)."""
        held = sum(chunk.n for chunk in self._chunks if chunk.rows is None)
        first = self._chunks[0] if self._chunks else None
        return held - (self._skip if first is not None and first.rows is None else 0)

    def resize(self, maxlen: int) -> None:
        """Keep at most ``maxlen`` records from now on (the newest)."""
        self.maxlen = max(1, int(maxlen))
        self._trim()

    # -- intake -----------------------------------------------------------------
    def append(self, record: dict[str, Any]) -> None:
        """Take one record (a plain dict, kept as it is)."""
        last = self._chunks[-1] if self._chunks else None
        if last is None or last.rows is None or last.n >= PLAIN_CHUNK:
            last = _Chunk(0)
            self._chunks.append(last)
        assert last.rows is not None
        last.rows.append(record)
        last.n += 1
        self._count += 1
        self._summarise(record.get("plan"), record.get("lane"), record.get("status"), 1,
                        float(record.get("duration_s") or 0))
        self._trim()

    def extend_packed(self, packed: dict[str, Any], worker: str | None = None,
                      attempts: dict[str, int] | None = None) -> None:
        """Take a chunk from :func:`pack_jobs`; only its summary is read now.

        ``attempts``: the jobs the scheduler saw run more than once, applied to
        records without an attempt count when they are read.
        """
        n = int(packed["n"])
        if n <= 0:
            return
        summary = packed.get("summary") or ()
        chunk = _Chunk(n, dict(packed["columns"]), worker,
                       frozenset(str(row[0]) for row in summary),
                       packed.get("first"), packed.get("last"), attempts)
        self._chunks.append(chunk)
        self._count += n
        for plan, lane, status, jobs, seconds in summary:
            self._summarise(plan, lane, status, int(jobs), float(seconds or 0))
        self._trim()

    def _summarise(self, plan: Any, lane: Any, status: Any, jobs: int, seconds: float) -> None:
        status = str(status)
        self.totals[status] = self.totals.get(status, 0) + jobs
        key = (str(plan), int(lane) if lane is not None else 0)
        row = self.by_plan_lane.get(key)
        if row is None:
            row = self.by_plan_lane[key] = [0, 0, 0, 0.0]
        else:
            self.by_plan_lane.move_to_end(key)
        row[0 if status == "done" else 1 if status == "failed" else 2] += jobs
        row[3] += seconds
        while len(self.by_plan_lane) > MAX_PLAN_ROWS:
            self.by_plan_lane.popitem(last=False)

    def _trim(self) -> None:
        while self._count - self._skip > self.maxlen:
            excess = self._count - self._skip - self.maxlen
            oldest = self._chunks[0]
            if oldest.n - self._skip <= excess:  # the whole oldest chunk goes
                self._chunks.popleft()
                self._count -= oldest.n
                self._skip = 0
            elif oldest.rows is not None:  # plain: cut it (no dict kept past the bound)
                del oldest.rows[:excess]
                oldest.n -= excess
                self._count -= excess
            else:
                self._skip += excess

    # -- reads --------------------------------------------------------------------
    def _newest_first(self, plan: str | None, since: float | None
                      ) -> Iterator[tuple[_Chunk, int]]:
        """``(chunk, records to skip)`` newest first, but chunks that cannot match:
        of other plans, or all finished before ``since``."""
        chunks = list(self._chunks)
        for i in range(len(chunks) - 1, -1, -1):
            chunk = chunks[i]
            if plan is not None and chunk.plans is not None and plan not in chunk.plans:
                continue
            if since is not None and chunk.last is not None and chunk.last < since:
                continue
            yield chunk, (self._skip if i == 0 else 0)

    def read(self, since: float | None = None, limit: int | None = None,
             plan: str | None = None, columns: Iterable[str] | None = None
             ) -> list[dict[str, Any]]:
        """Records oldest first: ``finished >= since``, of ``plan``, the newest ``limit``.

        Chunks are decoded newest first and only as far as ``limit`` needs;
        chunks of other plans or older than ``since`` are not decoded.
        """
        if limit is not None and int(limit) <= 0:
            return []
        cols = list(columns) if columns is not None else None
        out: list[dict[str, Any]] = []
        for chunk, skip in self._newest_first(plan, since):
            out.extend(reversed(chunk.select(skip, cols, plan, since)))
            if limit is not None and len(out) >= int(limit):
                del out[int(limit):]
                break
        out.reverse()
        return out

    def read_columns(self, columns: Iterable[str], since: float | None = None,
                     limit: int | None = None, plan: str | None = None
                     ) -> dict[str, list[Any]]:
        """:meth:`read` as ``{field: values}`` (oldest first): no dict per record.

        What a runner sizing its batches asks for (``step``, ``duration_s``): two
        columns decoded per chunk, and a reply that serializes as two lists.
        """
        cols = list(columns)
        parts: list[dict[str, list[Any]]] = []
        count = 0
        wanted = None if limit is None else max(0, int(limit))
        for chunk, skip in self._newest_first(plan, since):
            if wanted is not None and count >= wanted:
                break
            part = chunk.columns(skip, cols, plan, since)
            parts.append(part)
            count += len(part[cols[0]]) if cols else 0
        out: dict[str, list[Any]] = {c: [] for c in cols}
        for part in reversed(parts):
            for c in cols:
                out[c].extend(part[c])
        if wanted is not None and count > wanted:
            out = {c: values[count - wanted:] for c, values in out.items()}
        return out
