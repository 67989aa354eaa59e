"""Worker preload: declare obdask's resources before the worker registers.

Usage (the options follow ``--preload``; ``dask worker`` passes every option
it does not know to the preload)::

    dask worker tcp://sched:8786 --preload obdask.preload.worker \\
        --lanes 2,3 --ollama-endpoint http://127.0.0.1:11434 --resources "GPU=1"

The form ``--preload-argv "--lanes 2,3 ..."`` is accepted too.

``dask_setup`` runs in ``Worker.start_unsafe`` right before
``_register_with_scheduler`` (distributed 2026.8), so the scheduler sees the
resources from the start: detected ``GPU``/``VRAM``/``CPU``/``MEM`` and the
lane resources, overridden by the operator's ``--resources``.
"""

from __future__ import annotations

import logging
import shlex
from typing import Any

import click
import dask

import obdask.config as config
from obdask.llm.pool import normalize_url
from obdask.resources import LANE_PREFIX, detect_resources, lane_resources, parse_lanes
from obdask.server.worker import advertise_endpoint, state_of

logger = logging.getLogger(__name__)


async def configure_worker(
    worker: Any,
    lanes: str | None = None,
    ollama_endpoint: str | None = None,
    detect: bool | None = None,
    nvml: Any | None = None,
) -> dict[str, float]:
    """Declare resources on ``worker`` and store its obdask settings.

    Parameters
    ----------
    worker : distributed.Worker
    lanes : str, optional
        ``"2,3"``; default ``obdask.placement.lanes``; unset: every lane.
    ollama_endpoint : str, optional
        Local Ollama URL; default ``obdask.llm.local-endpoint``.
    detect : bool, optional
        Detect GPU/VRAM/CPU/MEM; default ``obdask.placement.detect``.
    nvml : module-like, optional
        NVML implementation for tests.

    Returns
    -------
    dict
        The worker's resources after the merge (explicit ``--resources`` win).
        Also stored in the worker's :class:`~obdask.server.worker.WorkerState`:
        ``lanes`` (tuple or None) and ``local_endpoint`` (str or None).
    """
    lanes_t = parse_lanes(config.get("placement.lanes", lanes))
    endpoint = ollama_endpoint or dask.config.get("obdask.llm.local-endpoint", None)
    registered = worker.batched_stream.comm is not None
    explicit = dict(worker.state.total_resources)
    if registered:  # lanes declared earlier are being re-declared, not operator values
        explicit = {k: v for k, v in explicit.items() if not k.startswith(LANE_PREFIX)}
    if config.get("placement.detect", detect):
        merged = detect_resources(nvml=nvml, explicit=explicit, lanes=lanes_t)
    else:
        merged = {**lane_resources(lanes_t), **explicit}
    state = state_of(worker)
    state.lanes = lanes_t
    state.local_endpoint = endpoint or None
    advertise_endpoint(worker, normalize_url(endpoint) if endpoint else None)
    if registered:  # a late call: tell the scheduler; keys can only be zeroed, not removed
        stale = {k: 0.0 for k in worker.state.total_resources if k not in merged}
        await worker.set_resources(**stale, **merged)
    else:  # no task has run yet: rewrite the totals in place
        for table in (worker.state.total_resources, worker.state.available_resources):
            table.clear()
            table.update(merged)
    logger.info("obdask worker resources: %s (lanes %s)", merged, lanes_t or "all")
    return merged


@click.command(context_settings={"ignore_unknown_options": False})
@click.option("--lanes", default=None, help="Lanes this worker takes, e.g. '2,3' or '1-4'.")
@click.option("--ollama-endpoint", default=None, help="This host's Ollama URL, for /api/ps.")
@click.option(
    "--detect/--no-detect", default=None, help="Declare detected GPU/VRAM/CPU/MEM resources."
)
@click.option("--preload-argv", "argv", default=None, hidden=True, help="Options in one string.")
async def dask_setup(
    worker: Any,
    lanes: str | None,
    ollama_endpoint: str | None,
    detect: bool | None,
    argv: str | None,
) -> None:
    """Run by distributed's preload machinery with the worker and the parsed options."""
    if argv:
        ctx = dask_setup.make_context("dask_setup", shlex.split(argv))
        params = {k: v for k, v in ctx.params.items() if v is not None and k != "argv"}
        lanes = params.get("lanes", lanes)
        ollama_endpoint = params.get("ollama_endpoint", ollama_endpoint)
        detect = params.get("detect", detect)
    await configure_worker(worker, lanes, ollama_endpoint, detect)
