"""Detect what a worker machine offers, as Dask worker resources.

obdask declares these resources on every worker it starts (the worker preload
:mod:`obdask.preload.worker`, or the embedded ``LocalCluster``):

=========  ==============================================================
``GPU``    number of NVIDIA GPUs seen by NVML (0 without a driver)
``VRAM``   total memory of those GPUs, in bytes
``CPU``    logical cores of the host (``psutil.cpu_count()``)
``MEM``    physical memory of the host, in bytes
``lane-N`` one per lane the worker takes (see :func:`lane_resources`)
=========  ==============================================================

Values given by the operator (``dask worker --resources``) always win over
detected ones.  Dask applies resources per worker *process*: with
``--nworkers 2`` each process advertises the whole host.

GPU facts come from ``pynvml`` (shipped by ``nvidia-ml-py``) directly, because
:mod:`distributed.diagnostics.nvml` reports one device only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import dask
import psutil

import obdask.config  # registers the obdask defaults
from obdask.exceptions import ConfigError

logger = logging.getLogger(__name__)

LANE_PREFIX = "lane-"
#: Capacity of each ``lane-N`` resource: large enough never to limit concurrency.
LANE_CAPACITY = 1e6
#: Resources whose values are sizes (``"16GB"`` is accepted for them).
BYTE_RESOURCES = frozenset({"VRAM", "MEM"})
#: Worker metric (sent in Dask's heartbeats) naming the worker's own Ollama endpoint.
ENDPOINT_METRIC = "obdask-local-endpoint"


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it.

    Attributes
    ----------
    index : int
        NVML index (PCI bus order; not necessarily the CUDA index).
    name : str
        Product name, e.g. ``"NVIDIA H100 80GB HBM3"``.
    uuid : str
        ``"GPU-..."`` identifier, ``""`` when NVML cannot tell.
    memory_total, memory_used : int
        Device memory in bytes.
    utilization : int or None
        GPU utilisation in percent, None where unsupported (e.g. MIG).
    """

    index: int
    name: str
    uuid: str
    memory_total: int
    memory_used: int
    utilization: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain (msgpack-friendly) dict."""
        return asdict(self)


def _text(value: Any) -> str:
    """Decode NVML strings: old ``pynvml`` releases returned bytes."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _load_nvml(nvml: Any | None) -> Any | None:
    """Return an initialised NVML module (or fake), or None when unavailable."""
    if nvml is None:
        try:
            import pynvml  # nvidia-ml-py
        except ImportError:
            logger.debug("pynvml is not installed: no GPUs detected")
            return None
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:  # LibraryNotFound, DriverNotLoaded, Unknown, ...
        logger.debug("NVML unavailable (%s): no GPUs detected", exc)
        return None
    except OSError as exc:  # a broken libnvidia-ml
        logger.debug("NVML could not be loaded (%s): no GPUs detected", exc)
        return None
    return nvml


def _read_device(nvml: Any, index: int) -> GpuInfo:
    """Read one device; optional facts degrade to empty values on NVMLError."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    total, used = _memory(nvml, handle)
    try:
        name = _text(nvml.nvmlDeviceGetName(handle))
    except nvml.NVMLError:
        name = ""
    try:
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))
    except nvml.NVMLError:
        uuid = ""
    try:
        utilization: int | None = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except nvml.NVMLError:  # NotSupported on MIG and some boards
        utilization = None
    return GpuInfo(index, name, uuid, total, used, utilization)


def _memory(nvml: Any, handle: Any) -> tuple[int, int]:
    """Total and used VRAM of a device, used as ``nvidia-smi`` shows it.

    The v2 call reports the driver's reservation apart; the v1 call counts it as
    used (615 MiB on an idle H200 with driver 580, where nvidia-smi shows 0 MiB).
    Drivers or bindings without v2 get the v1 figure.
    """
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            mem = nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
            return int(mem.total), int(mem.used)
        except (nvml.NVMLError, TypeError, AttributeError) as exc:  # old driver: v1
            logger.debug("NVML memory info v2 unavailable (%s): v1 used", exc)
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    return int(mem.total), int(mem.used)


def gpu_inventory(nvml: Any | None = None) -> list[GpuInfo]:
    """List every GPU NVML can see (all physical devices).

    Parameters
    ----------
    nvml : module-like, optional
        Object with the ``pynvml`` API (``nvmlInit``, ``nvmlDeviceGetCount``,
        ``nvmlDeviceGetHandleByIndex``, ``nvmlDeviceGetName``,
        ``nvmlDeviceGetUUID``, ``nvmlDeviceGetMemoryInfo``,
        ``nvmlDeviceGetUtilizationRates``, ``nvmlShutdown``, ``NVMLError``).
        Defaults to the real ``pynvml``; tests pass a fake driver.

    Returns
    -------
    list of GpuInfo
        Empty, without raising, when ``pynvml`` or the driver is missing.
        ``CUDA_VISIBLE_DEVICES`` is not applied here (see :func:`visible_gpus`).
    """
    lib = _load_nvml(nvml)
    if lib is None:
        return []
    gpus: list[GpuInfo] = []
    try:
        for index in range(int(lib.nvmlDeviceGetCount())):
            try:
                gpus.append(_read_device(lib, index))
            except lib.NVMLError as exc:
                logger.debug("NVML could not read GPU %d (%s): skipped", index, exc)
    except lib.NVMLError as exc:
        logger.debug("NVML device count failed (%s): no GPUs detected", exc)
    finally:
        try:
            lib.nvmlShutdown()
        except lib.NVMLError:  # pragma: no cover - shutdown never matters
            pass
    return gpus


def visible_gpus(gpus: list[GpuInfo], env: Mapping[str, str] | None = None) -> list[GpuInfo]:
    """Keep the GPUs that ``CUDA_VISIBLE_DEVICES`` lets this process use.

    Entries are matched by NVML index or by (a prefix of) the ``GPU-`` UUID.
    NVML and CUDA indices can differ on mixed machines; use UUIDs there.
    Unset: all GPUs.  ``""`` or ``-1``: none.
    """
    env = os.environ if env is None else env
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return list(gpus)
    chosen: list[GpuInfo] = []
    for entry in (e.strip() for e in raw.split(",")):
        if not entry or entry == "-1":
            break  # CUDA ignores everything after an invalid entry
        if entry.isdigit():
            match = [g for g in gpus if g.index == int(entry)]
        else:
            match = [g for g in gpus if g.uuid and g.uuid.startswith(entry)]
        if not match:
            logger.debug("CUDA_VISIBLE_DEVICES entry %r matches no NVML device", entry)
            break
        if match[0] not in chosen:
            chosen.append(match[0])
    return chosen


def get_max_lanes(value: int | None = None) -> int:
    """Return ``obdask.placement.max-lanes`` (or ``value``) as a positive int."""
    return obdask.config.get_int("placement.max-lanes", value, minimum=1)


def parse_lanes(value: str | int | Iterable[int | str] | None) -> tuple[int, ...] | None:
    """Parse a lane list such as ``"2,3"``, ``"1-4"``, ``"2 3"``, ``3`` or ``[2, 3]``.

    Returns
    -------
    tuple of int or None
        Sorted unique lanes; None when ``value`` is None or empty (the worker
        takes every lane).

    Raises
    ------
    ConfigError
        An entry is not a positive integer or an ``A-B`` range.
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        items: list[str] = [str(value)]
    elif isinstance(value, str):
        items = value.replace(",", " ").split()
    elif isinstance(value, bool):
        raise ConfigError(f"lanes: {value!r} is not a lane number or range "
                          "(use e.g. '2,3' or '1-4')")
    else:
        items = [str(v).strip() for v in value]
    lanes: set[int] = set()
    for item in items:
        low, sep, high = item.partition("-")
        try:
            start = int(low)
            stop = int(high) if sep else start
        except ValueError:
            raise ConfigError(
                f"lanes: {item!r} in {value!r} is not a lane number or range"
                " (use e.g. '2,3' or '1-4')"
            ) from None
        if start < 1 or stop < start:
            raise ConfigError(f"lanes: {item!r} in {value!r} must be positive and ascending")
        lanes.update(range(start, stop + 1))
    return tuple(sorted(lanes)) or None


def lane_resources(
    lanes: Iterable[int] | None = None, max_lanes: int | None = None
) -> dict[str, float]:
    """Lane resources a worker advertises.

    A worker with explicit ``lanes`` offers ``lane-N`` for each of them; a
    worker without lanes offers ``lane-1 .. lane-{max-lanes}``, so it can take
    a job of any lane.  Each has capacity :data:`LANE_CAPACITY`, so lanes only
    restrict *where* a job runs, never how many run at once.
    """
    chosen = range(1, get_max_lanes(max_lanes) + 1) if lanes is None else lanes
    return {f"{LANE_PREFIX}{int(n)}": LANE_CAPACITY for n in chosen}


def _to_float(name: str, value: Any) -> float:
    """Convert an explicit resource value; sizes are accepted for VRAM and MEM."""
    if isinstance(value, str) and name in BYTE_RESOURCES:
        try:
            return float(dask.utils.parse_bytes(value))
        except (TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"resource {name}={value!r} is not a size") from exc
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"resource {name}={value!r} is not a number") from exc


def host_resources(nvml: Any | None = None) -> dict[str, float]:
    """Detected ``GPU``, ``VRAM``, ``CPU`` and ``MEM`` of this host.

    GPUs hidden by ``CUDA_VISIBLE_DEVICES`` are not counted.
    """
    gpus = visible_gpus(gpu_inventory(nvml))
    return {
        "GPU": float(len(gpus)),
        "VRAM": float(sum(g.memory_total for g in gpus)),
        "CPU": float(psutil.cpu_count(logical=True) or os.cpu_count() or 1),
        "MEM": float(psutil.virtual_memory().total),
    }


def detect_resources(
    nvml: Any | None = None,
    explicit: Mapping[str, Any] | None = None,
    lanes: str | Iterable[int] | None = None,
) -> dict[str, float]:
    """Resources a worker on this host should declare.

    Parameters
    ----------
    nvml : module-like, optional
        NVML implementation, see :func:`gpu_inventory`.
    explicit : mapping, optional
        Operator values (``--resources``); they override detected ones.
        ``VRAM``/``MEM`` may be sizes such as ``"16GB"``.
    lanes : str or iterable of int, optional
        Lanes this worker takes (``"2,3"``); default ``obdask.placement.lanes``,
        and when that is unset too, every lane.

    Returns
    -------
    dict
        ``{"GPU", "VRAM", "CPU", "MEM", "lane-N"...}`` as floats, merged with
        ``explicit``.
    """
    if lanes is None:
        lanes = dask.config.get("obdask.placement.lanes", None)
    resources = host_resources(nvml)
    resources.update(lane_resources(parse_lanes(lanes)))
    for name, value in (explicit or {}).items():
        resources[str(name)] = _to_float(str(name), value)
    logger.debug("detected worker resources: %s", resources)
    return resources


def worker_lanes(resources: Mapping[str, float]) -> set[int]:
    """Lanes a worker offers, from its resource dict."""
    lanes = set()
    for name, amount in resources.items():
        if name.startswith(LANE_PREFIX) and amount > 0:
            suffix = name[len(LANE_PREFIX) :]
            if suffix.isdigit():
                lanes.add(int(suffix))
    return lanes


def model_key(name: str) -> str:
    """Locality key of a loaded Ollama model (``model:<name>:<tag>``, tag default ``latest``)."""
    from obdask.llm.pool import canonical_model

    return f"model:{canonical_model(name.strip())}"
