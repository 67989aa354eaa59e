"""Fencing of the session store: registered epochs, takeover seals, void writes.

Every write carries an epoch (the lease's fencing token).  Epochs are registered as
write-once files ``epochs/<epoch>``; a driver that takes a session over seals "epoch E
continues after process N" (``seals/<E>-after-<N>.json``).  A snapshot past N written by
a lower epoch is void from then on.  :class:`FencedFiles` answers the questions the
writers and readers ask: the highest epoch, the seals, whether a snapshot at an index
stands, and whether a writer was superseded (:class:`~obdask.exceptions.LeaseLost`).
"""

from __future__ import annotations

import logging
import posixpath

from obdask.exceptions import LeaseLost
from obdask.session.files import RecordFiles
from obdask.session.record import SEAL_RE, SNAPSHOT_RE, ProcessSnapshot

logger = logging.getLogger(__name__)

__all__ = ["FencedFiles"]


class FencedFiles(RecordFiles):
    """:class:`RecordFiles` plus the epoch and seal bookkeeping every write checks."""

    def _epochs(self, session_id: str) -> list[int]:
        return sorted(int(n) for n in self._ls(self._path(session_id, "epochs")) if n.isdigit())

    def highest_epoch(self, session_id: str) -> int:
        """The highest epoch registered for the session (0 when none)."""
        epochs = self._epochs(session_id)
        return epochs[-1] if epochs else 0

    def _seals(self, session_id: str) -> dict[int, int]:
        """epoch -> the last process index that epoch found when it took over.

        The index is in the file name, so one listing reads every seal.
        """
        seals: dict[int, int] = {}
        for name in self._ls(self._path(session_id, "seals")):
            m = SEAL_RE.match(name)
            if m:
                epoch, after = int(m.group(1)), int(m.group(2))
                seals[epoch] = min(after, seals.get(epoch, after))
        return seals

    def _lost(self, session_id: str, epoch: int, highest: int, doing: str,
              kept: bool | None = None) -> LeaseLost:
        if kept is None:
            fate = "kept only if the newer driver read it"
        else:
            fate = "kept (the newer driver had read it)" if kept else "refused"
        return LeaseLost(
            f"session {session_id}: epoch {epoch} was superseded by epoch {highest} "
            f"(another driver holds the session); {doing}: {fate}",
            session=session_id, epoch=epoch, highest=highest, kept=kept)

    def _verify(self, session_id: str, epoch: int, doing: str, index: int | None = None) -> None:
        """After a write: raise LeaseLost if a newer epoch registered meanwhile."""
        highest = self.highest_epoch(session_id)
        if highest <= epoch:
            return
        kept: bool | None = None
        if index is not None:
            seals = self._seals(session_id)
            newer = [e for e in self._epochs(session_id) if e > epoch]
            if any(seals[e] < index for e in newer if e in seals):
                kept = False  # void: a newer driver took over before this position
            elif all(e in seals for e in newer):
                kept = True  # every newer driver read it before taking over
        raise self._lost(session_id, epoch, highest, doing, kept=kept)

    def _all_at(self, session_id: str, index: int, names: list[str] | None = None
                ) -> list[tuple[str, ProcessSnapshot | None]]:
        """Every snapshot file at ``index``: (name, snapshot or None when damaged)."""
        folder = self._path(session_id, "processes")
        out: list[tuple[str, ProcessSnapshot | None]] = []
        for name in self._ls(folder) if names is None else names:
            m = SNAPSHOT_RE.match(name)
            if m and int(m.group(1)) == index:
                data = self._read_json(posixpath.join(folder, name))
                try:
                    out.append((name, ProcessSnapshot.from_dict(data)))
                except (TypeError, KeyError, ValueError, AttributeError):
                    out.append((name, None))
        return out

    def _find_snapshot(self, session_id: str, index: int, names: list[str] | None = None
                       ) -> tuple[bool, ProcessSnapshot | None]:
        """(present, snapshot) at ``index``: (False, None) absent or void; (True, None)
        damaged; (True, snapshot) valid."""
        found = self._all_at(session_id, index, names)
        if not found:
            return False, None
        seals = self._seals(session_id)
        valid = [snap for _, snap in found if snap is not None and not any(
            e > snap.epoch and after < snap.index for e, after in seals.items())]
        if valid:
            return True, max(valid, key=lambda snap: snap.epoch)
        if any(snap is None for _, snap in found):
            return True, None
        return False, None

