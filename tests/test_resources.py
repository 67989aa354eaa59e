"""Resource detection with fake NVML drivers (0, 1, 4 GPUs) and the real pynvml."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import dask
import psutil
import pytest

from obdask.exceptions import ConfigError
from obdask.resources import (
    LANE_CAPACITY,
    GpuInfo,
    detect_resources,
    gpu_inventory,
    lane_resources,
    parse_lanes,
    visible_gpus,
)

GB = 1024**3


class FakeNVMLError(Exception):
    pass


class FakeNotSupported(FakeNVMLError):
    pass


class FakeNVML:
    """A fake of the NVML driver with the pynvml API (not a fake of Dask)."""

    NVMLError = FakeNVMLError

    def __init__(self, gpus=(), init_error=None, bytes_names=False, no_util=()):
        self.gpus = list(gpus)  # (name, total, used)
        self.init_error = init_error
        self.bytes_names = bytes_names
        self.no_util = set(no_util)
        self.initialised = 0
        self.shutdowns = 0

    def nvmlInit(self):
        if self.init_error is not None:
            raise self.init_error
        self.initialised += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        if not 0 <= i < len(self.gpus):
            raise FakeNVMLError("invalid argument")
        return i

    def nvmlDeviceGetName(self, h):
        name = self.gpus[h][0]
        return name.encode() if self.bytes_names else name

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-0000000{h}-aaaa"

    def nvmlDeviceGetMemoryInfo(self, h):
        _, total, used = self.gpus[h]
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, h):
        if h in self.no_util:
            raise FakeNotSupported("Not Supported")
        return SimpleNamespace(gpu=10 * (h + 1), memory=5)


@pytest.fixture(autouse=True)
def _no_cuda_env(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_inventory_zero_gpus():
    nvml = FakeNVML()
    assert gpu_inventory(nvml) == []
    assert nvml.shutdowns == 1


def test_inventory_one_gpu_bytes_name():
    nvml = FakeNVML([("NVIDIA A10", 24 * GB, 1 * GB)], bytes_names=True)
    (gpu,) = gpu_inventory(nvml)
    assert gpu == GpuInfo(0, "NVIDIA A10", "GPU-00000000-aaaa", 24 * GB, 1 * GB, 10)
    assert gpu.to_dict()["memory_total"] == 24 * GB


def test_inventory_four_gpus_utilization_unsupported():
    nvml = FakeNVML([(f"H100 #{i}", 80 * GB, i * GB) for i in range(4)], no_util={2})
    gpus = gpu_inventory(nvml)
    assert [g.index for g in gpus] == [0, 1, 2, 3]
    assert [g.utilization for g in gpus] == [10, 20, None, 40]
    assert gpus[3].memory_used == 3 * GB


class FakeNVMLv2(FakeNVML):
    """A driver with ``nvmlDeviceGetMemoryInfo_v2``: reserved memory reported apart.

    As seen on a real H200 (driver 580, ``benchmarks/gpu_check.py`` on the device
    machine): the v1 call counts the driver's reservation (615 MiB) as used on an idle
    GPU, where ``nvidia-smi`` says 0 MiB.
    """

    nvmlMemory_v2 = 0x2000028

    def __init__(self, gpus=(), reserved=0, **kwargs):
        super().__init__(gpus, **kwargs)
        self.reserved = reserved

    def nvmlDeviceGetMemoryInfo(self, h, version=None):
        _, total, used = self.gpus[h]
        if version is None:  # v1: the reservation is part of "used"
            return SimpleNamespace(total=total, used=used + self.reserved,
                                   free=total - used - self.reserved)
        assert version == self.nvmlMemory_v2
        return SimpleNamespace(version=version, total=total, reserved=self.reserved,
                               used=used, free=total - used - self.reserved)


def test_inventory_used_vram_leaves_out_the_drivers_reservation():
    nvml = FakeNVMLv2([("NVIDIA H200", 140 * GB, 0), ("NVIDIA H200", 140 * GB, 3 * GB)],
                      reserved=615 * 2**20)
    gpus = gpu_inventory(nvml)
    assert [g.memory_used for g in gpus] == [0, 3 * GB]  # as nvidia-smi shows them
    assert [g.memory_total for g in gpus] == [140 * GB, 140 * GB]


@pytest.mark.parametrize("error", [FakeNVMLError("NVML Shared Library Not Found"), OSError("x")])
def test_inventory_no_driver_is_empty_and_logged(error, caplog):
    with caplog.at_level(logging.DEBUG, logger="obdask.resources"):
        assert gpu_inventory(FakeNVML([("x", 1, 0)], init_error=error)) == []
    assert "no GPUs" in caplog.text


def test_inventory_real_pynvml_without_driver_does_not_raise():
    pytest.importorskip("pynvml")
    gpus = gpu_inventory()
    assert isinstance(gpus, list)


def test_detect_zero_one_four():
    base = {"CPU": float(psutil.cpu_count()), "MEM": float(psutil.virtual_memory().total)}
    res0 = detect_resources(FakeNVML())
    assert res0["GPU"] == 0 and res0["VRAM"] == 0
    assert res0["CPU"] == base["CPU"] and res0["MEM"] == base["MEM"]
    res1 = detect_resources(FakeNVML([("a", 24 * GB, 0)]))
    assert res1["GPU"] == 1 and res1["VRAM"] == 24 * GB
    res4 = detect_resources(FakeNVML([("h", 80 * GB, 0)] * 4))
    assert res4["GPU"] == 4 and res4["VRAM"] == 320 * GB
    assert all(isinstance(v, float) for v in res4.values())


def test_detect_real_machine():
    res = detect_resources()
    assert res["CPU"] >= 1 and res["MEM"] > 0
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        assert res["GPU"] == 0 and res["VRAM"] == 0
    else:  # pragma: no cover - only on GPU machines
        count = pynvml.nvmlDeviceGetCount()
        vram = sum(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total
                   for i in range(count))
        pynvml.nvmlShutdown()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:  # every device counts, with its whole memory
            assert res["GPU"] == count and res["VRAM"] == float(vram)
        else:
            assert 0 <= res["GPU"] <= count and res["VRAM"] <= float(vram)


def test_explicit_wins_and_sizes_parse():
    res = detect_resources(
        FakeNVML([("a", 24 * GB, 0)]), explicit={"GPU": 0, "VRAM": "16GB", "TPU": "2"}
    )
    assert res["GPU"] == 0 and res["VRAM"] == 16e9 and res["TPU"] == 2.0
    with pytest.raises(ConfigError, match="VRAM"):
        detect_resources(FakeNVML(), explicit={"VRAM": "lots"})


def test_lanes_default_all_and_explicit():
    res = detect_resources(FakeNVML())
    lanes = {k for k in res if k.startswith("lane-")}
    assert lanes == {f"lane-{i}" for i in range(1, 17)}
    assert res["lane-1"] == LANE_CAPACITY
    res = detect_resources(FakeNVML(), lanes="2,3")
    assert {k for k in res if k.startswith("lane-")} == {"lane-2", "lane-3"}
    with dask.config.set({"obdask.placement.lanes": "4", "obdask.placement.max-lanes": 3}):
        assert {k for k in detect_resources(FakeNVML()) if k.startswith("lane-")} == {"lane-4"}
    with dask.config.set({"obdask.placement.max-lanes": 3}):
        assert set(lane_resources()) == {"lane-1", "lane-2", "lane-3"}


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        ("", None),
        ("2,3", (2, 3)),
        ("3 2 3", (2, 3)),
        ("1-3,5", (1, 2, 3, 5)),
        (4, (4,)),
        ((2, "3"), (2, 3)),
    ],
)
def test_parse_lanes(value, expected):
    assert parse_lanes(value) == expected


@pytest.mark.parametrize("value", ["x", "0", "3-1", "2,-1"])
def test_parse_lanes_errors(value):
    with pytest.raises(ConfigError, match="lanes"):
        parse_lanes(value)


def test_max_lanes_invalid():
    with dask.config.set({"obdask.placement.max-lanes": 0}), pytest.raises(ConfigError):
        lane_resources()


def test_cuda_visible_devices():
    gpus = gpu_inventory(FakeNVML([("h", 80 * GB, 0)] * 4))
    assert visible_gpus(gpus, {}) == gpus
    assert [g.index for g in visible_gpus(gpus, {"CUDA_VISIBLE_DEVICES": "2,0"})] == [2, 0]
    assert [g.index for g in visible_gpus(gpus, {"CUDA_VISIBLE_DEVICES": "GPU-00000003"})] == [3]
    assert visible_gpus(gpus, {"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus(gpus, {"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert [g.index for g in visible_gpus(gpus, {"CUDA_VISIBLE_DEVICES": "1,9,2"})] == [1]


def test_detect_honours_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    res = detect_resources(FakeNVML([("h", 80 * GB, 0), ("l", 48 * GB, 0)]))
    assert res["GPU"] == 1 and res["VRAM"] == 48 * GB
