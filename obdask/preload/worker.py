"""Worker preload: declare obdask's resources before the worker registers.

Usage (the options follow ``--preload``; ``dask worker`` passes every option
it does not know to the preload)::

    dask worker tcp://sched:8786 --preload obdask.preload.worker \\
        --lanes 2,3 --ollama-endpoint http://127.0.0.1:11434 --resources "GPU=1"

The form ``--preload-argv "--lanes 2,3 ..."`` is accepted too.

With ``--scheduler-file`` and no address, ``dask worker`` takes the first
option it does not know for its SCHEDULER argument, so ``--lanes=2`` never
reaches the preload (and ``--lanes 2`` passes it a stray ``2``).  The preload
then reads its options from the ``dask worker`` command line itself
(:func:`options_from_command_line`), so both forms work; a stray argument it
cannot explain is a usage error, never silently dropped.

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
from obdask.server.worker import advertise_endpoint, pause_dask_profiler, state_of

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


_OPTIONS = {"--lanes": "lanes", "--ollama-endpoint": "ollama_endpoint"}
_FLAGS = {"--detect": True, "--no-detect": False}


def options_from_command_line(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """This preload's options as written on a ``dask worker`` command line.

    Returns the options found (``lanes``, ``ollama_endpoint``, ``detect``) and
    the values that followed a space-separated option (``--lanes 2``: ``["2"]``),
    which ``dask worker`` may have passed on as stray arguments.  Any other
    command line (not ``dask worker``): nothing.
    """
    import os

    if not (len(argv) > 1 and argv[1] == "worker") and \
            os.path.basename(argv[0] if argv else "") != "dask-worker":
        return {}, []
    found: dict[str, Any] = {}
    values: list[str] = []
    tokens = iter(argv[1:])
    for token in tokens:
        name, eq, value = token.partition("=")
        if name in _OPTIONS:
            if not eq:
                value = next(tokens, "")
                values.append(value)
            found[_OPTIONS[name]] = value
        elif token in _FLAGS:
            found["detect"] = _FLAGS[token]
    return found, values


@click.command(context_settings={"ignore_unknown_options": False})
@click.option("--lanes", default=None, help="Lanes this worker takes, e.g. '2,3' or '1-4'.")
@click.option("--ollama-endpoint", default=None, help="This host's Ollama URL, for /api/ps.")
@click.option(
    "--detect/--no-detect", default=None, help="Declare detected GPU/VRAM/CPU/MEM resources."
)
@click.option("--preload-argv", "argv", default=None, hidden=True, help="Options in one string.")
@click.argument("stray", nargs=-1, type=click.UNPROCESSED)
async def dask_setup(
    worker: Any,
    lanes: str | None,
    ollama_endpoint: str | None,
    detect: bool | None,
    argv: str | None,
    stray: tuple[str, ...] = (),
) -> None:
    """Run by distributed's preload machinery with the worker and the parsed options."""
    import sys

    from obdask.interpreter import guard_current_frames

    guard_current_frames()  # before the first task: the plugin installs it again, later
    pause_dask_profiler(worker)  # before it samples anything (the plugin does it too)
    if argv:
        ctx = dask_setup.make_context("dask_setup", shlex.split(argv))
        params = {k: v for k, v in ctx.params.items() if v is not None and k != "argv"}
        lanes = params.get("lanes", lanes)
        ollama_endpoint = params.get("ollama_endpoint", ollama_endpoint)
        detect = params.get("detect", detect)
        stray = (*stray, *params.get("stray", ()))
    # Values as click parsed them (str for the two options, bool for the flag).
    given: dict[str, Any] = {"lanes": lanes, "ollama_endpoint": ollama_endpoint,
                             "detect": detect}
    found, values = options_from_command_line(list(sys.argv))
    unexplained = list(stray)
    for value in values:
        if value in unexplained:
            unexplained.remove(value)
    if unexplained:
        raise click.UsageError(
            f"obdask.preload.worker: unexpected argument(s) {' '.join(unexplained)!r}; its "
            "options are --lanes, --ollama-endpoint, --detect/--no-detect (write them as "
            "--lanes=2,3, after --preload obdask.preload.worker)")
    lost = {k: v for k, v in found.items() if given[k] is None}
    if lost:
        # dask worker --scheduler-file F ... took the first of them for its SCHEDULER argument
        logger.info("obdask worker options read from the dask worker command line: %s", lost)
        given.update(lost)
    await configure_worker(worker, given["lanes"], given["ollama_endpoint"], given["detect"])
