"""The outcome of one run: :class:`RunResult` (records, summary, a pandas frame, outputs).

What :func:`obdask.run` returns and ``obdask run --json`` prints; built by
:mod:`obdask.runner` when a run finishes, or by :mod:`obdask.outcomes` when its
scheduler is lost.  Outputs are loaded from the run's artifact store on demand.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from obdask import config
from obdask.artifacts import ArtifactStore
from obdask.exceptions import ObdaskError

if TYPE_CHECKING:
    import pandas as pd


COLUMNS = ["id", "key", "status", "worker", "attempts", "exit_code", "duration_s",
           "error", "warm"]


@dataclass
class RunResult:
    """Outcome of one run: ``ok``, per-job ``records`` and a pandas ``frame``."""

    plan_id: str
    run_id: str
    records: list[dict[str, Any]]
    location: str
    duration_s: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: ArtifactStore | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """True when no job failed, was skipped or was cut off (scheduler lost)."""
        return all(r["status"] not in ("failed", "skipped", "interrupted")
                   for r in self.records)

    @property
    def frame(self) -> pd.DataFrame:
        """One row per job (columns: id, key, status, worker, attempts, ...).

        Integer fields (``exit_code``, ``attempts``, byte counts, tokens) are
        pandas' nullable ``Int64``: a job without one has ``<NA>``, not a float NaN.
        Outputs are sha1 keys here; :meth:`to_frame` or :meth:`output` load them.
        """
        return self.to_frame()

    def to_frame(self, outputs: Iterable[str] = ()) -> pd.DataFrame:
        """:attr:`frame`, with the named outputs loaded as text in place of their keys.

        Parameters
        ----------
        outputs
            Any of ``"stdout"``, ``"stderr"``, ``"reply"``, ``"diff"``; a job
            without that output (or with an empty one) gets ``None``.
        """
        import pandas as pd

        from obdask.outputs import INTEGER_COLUMNS, check_stream, output_text

        frame = pd.DataFrame.from_records(self.records)
        for column in COLUMNS:
            if column not in frame:
                frame[column] = None
        for column in INTEGER_COLUMNS:
            if column in frame:
                frame[column] = pd.array(
                    [None if v is None or v != v else int(v) for v in frame[column]],
                    dtype="Int64")
        for which in outputs:
            check_stream(which)
            store = self._artifacts()
            frame[which] = [output_text(r, which, store) if r.get(which) else None
                            for r in self.records]
        return frame.set_index("id", drop=False)

    def output(self, job: str, which: str = "stdout") -> str | None:
        """The text a job wrote to ``which`` (stdout, stderr, reply, diff); None if empty.

        Raises
        ------
        ObdaskError
            No such job in this run, or the job has no such output (a ``@cmd``
            job has no ``reply``).
        """
        from obdask.outputs import check_stream, find_record, output_text

        check_stream(which)
        record = find_record(self.records, job, f"run {self.run_id} of plan {self.plan_id!r}")
        return output_text(record, which, self._artifacts())

    def _artifacts(self) -> ArtifactStore:
        if self.artifacts is None:  # a result built by hand: the store the summary names
            url = self.summary.get("artifacts")
            if not url:
                raise ObdaskError(f"run {self.run_id}: no artifact store is known; build the "
                                  "RunResult with artifacts= or a summary with 'artifacts'")
            self.artifacts = ArtifactStore(url, config.storage_options(url))
        return self.artifacts

    def to_json(self) -> dict[str, Any]:
        """The ``obdask run --json`` object."""
        keep = ("id", "key", "status", "worker", "exit_code", "duration_s", "error")
        return {"ok": self.ok, "plan": self.plan_id, "run_id": self.run_id,
                "records": self.location,
                "workers_lost": self.summary.get("workers_lost", []),
                "interrupted": self.summary.get("interrupted"),
                "jobs": [{k: r.get(k) for k in keep} for r in self.records]}
