"""The session driver's Dask task, :func:`drive`, and how a driver run ends.

:meth:`obdask.session.api.Session.start` and ``resume`` submit :func:`drive`
(fire-and-forget).  It secedes (``worker_client``) and runs one
:class:`~obdask.session.driver.Driver`.  A driver run ends in one of four ways:

* the session ended (done, failed, cancelled): the result ``{"id", "state", ...}``;
* superseded by a newer driver: :class:`~obdask.exceptions.LeaseLost` out of the task
  (subscribers hear ``driver-superseded``);
* cut off by its cluster's shutdown (its worker or client closing, the scheduler gone):
  no error, one INFO line, the session recorded ``interrupted``, to be resumed;
* stopped by an error: logged, published (``driver-error``), recorded ``interrupted``
  with the error, and raised out of the task.
"""

from __future__ import annotations

import logging
from typing import Any

from obdask.exceptions import LeaseLost
from obdask.session.driver import CutOff, Driver, Settings

logger = logging.getLogger(__name__)

__all__ = ["cut_off", "drive"]


def cut_off(client: Any, worker: Any) -> bool:
    """Whether the driver's client or worker is closing or has lost the scheduler: a
    cluster shut down (or a scheduler gone) under the driver, not a fault of the session."""
    from distributed.core import Status

    return (getattr(client, "scheduler", None) is None
            or getattr(client, "status", "running") != "running"
            or getattr(worker, "status", Status.running) not in (Status.running,
                                                                  Status.paused))


def drive(session_id: str, settings: Settings) -> dict[str, Any]:
    """The driver task (see the module docstring).  Returns ``{"id", "state",
    "flow_code", "epoch"}``; raises LeaseLost when superseded.  A driver cut off by its
    cluster's shutdown returns quietly with the state ``interrupted`` (resumable)."""
    from distributed import get_worker, worker_client

    worker = get_worker()
    key = worker.get_current_task()
    with worker_client() as client:
        driver = Driver(session_id, settings, client, worker.address,
                        key if isinstance(key, str) else None)
        try:
            return driver.run()
        except LeaseLost as exc:
            logger.warning("session %s: driver of epoch %d superseded: %s", session_id,
                           driver.epoch, exc)
            try:  # make sure subscribers hear of it (the extension publishes it once)
                client.sync(client.scheduler.obdask_session_publish, session=session_id,
                            events=[], epoch=driver.epoch)
            except Exception:  # noqa: BLE001
                pass
            raise
        except Exception as exc:
            if isinstance(exc, CutOff) or cut_off(client, worker):
                return _cut_off(driver, exc)
            _stopped(driver, client, exc)
            raise


def _cut_off(driver: Driver, exc: Exception) -> dict[str, Any]:
    """The cluster went away under the driver (what it was waiting for failed because of
    that): no error, the session recorded as interrupted, to be resumed."""
    logger.info("session %s: driver of epoch %d cut off by the cluster's shutdown "
                "(%s: %s); the session is interrupted, resume it to continue",
                driver.sid, driver.epoch, type(exc).__name__, exc)
    if driver.epoch and not driver.ended:
        try:
            driver.store.update(driver.sid, driver.epoch, status="interrupted")
        except Exception as err:  # noqa: BLE001 - superseded meanwhile, or no store
            logger.info("session %s: not recorded as interrupted: %s", driver.sid, err)
    return {"id": driver.sid, "state": "interrupted", "flow_code": driver.flow_code,
            "epoch": driver.epoch}


def _stopped(driver: Driver, client: Any, exc: Exception) -> None:
    """The driver stops on an error: say why, where everyone looks (log, event, record)."""
    message = f"{type(exc).__name__}: {exc}"
    logger.error("session %s: driver of epoch %d stopped: %s", driver.sid, driver.epoch,
                 message)
    if not driver.epoch:
        return
    try:
        client.sync(client.scheduler.obdask_session_publish, session=driver.sid,
                    events=[{"kind": "driver-error", "error": message[:1000],
                             "epoch": driver.epoch}], epoch=driver.epoch)
    except Exception:  # noqa: BLE001 - the original error matters more
        pass
    if not driver.ended:  # the record says so even when the event could not go out
        try:
            driver.store.update(driver.sid, driver.epoch, status="interrupted",
                                error=message[:1000])
        except Exception:  # noqa: BLE001
            pass
