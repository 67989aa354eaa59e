"""Device check for a machine with NVIDIA GPUs: real NVML, real workers, real placement.

Run:  python benchmarks/gpu_check.py [--json out.json]

Prepared for sessions that get a GPU machine (one short script, ~1 minute):

1. ``gpu_inventory()`` through the real ``pynvml`` (nvidia-ml-py): every device, name,
   memory, utilisation; compared with ``nvidia-smi --query-gpu`` when it is on PATH.
2. ``host_resources()``: GPU count and total VRAM as a worker would declare them.
3. A real ``dask scheduler --preload obdask.preload.scheduler`` and ``dask worker
   --preload obdask.preload.worker`` on loopback: the resources the scheduler sees.
4. A plan with a ``resources=GPU:1,VRAM:<half of one GPU>`` step and a ``model=vision``
   step runs on that worker; a ``VRAM`` request above the total fails at submit.

Exit status: 0 all checks passed, 1 a check failed, 2 no NVIDIA GPU is visible (then
only step 1 ran, and its result is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dask


def nvidia_smi() -> list[dict] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True)
    rows = []
    for line in out.stdout.strip().splitlines():
        index, name, total = (part.strip() for part in line.split(","))
        rows.append({"index": int(index), "name": name, "memory_total": int(total) * 2**20})
    return rows


def start(args: list[str], folder: Path) -> subprocess.Popen:
    log = open(folder / f"{args[0]}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=folder)


def cluster_checks(report: dict, folder: Path, extra: list[str] = ()) -> None:
    from distributed import Client

    import obdask
    from obdask.exceptions import PlacementError

    sched_file = folder / "scheduler.json"
    procs = [start(["scheduler", "--preload", "obdask.preload.scheduler", "--port", "0",
                    "--host", "127.0.0.1",
                    "--scheduler-file", str(sched_file), "--no-dashboard"], folder)]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists():
            assert time.monotonic() < deadline, "scheduler did not start"
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        procs.append(start(["worker", address, "--host", "127.0.0.1", "--nthreads", "2",
                            *extra, "--preload",
                            "obdask.preload.worker", "--local-directory", str(folder)],
                           folder))
        with Client(address, timeout=30) as client:
            client.wait_for_workers(1, timeout=60)
            [(addr, info)] = client.scheduler_info()["workers"].items()
            declared = info["resources"]
            report["declared"] = declared
            total = report["host"]["VRAM"]
            per_gpu = total / max(report["host"]["GPU"], 1)
            assert declared.get("GPU") == report["host"]["GPU"], declared
            assert declared.get("VRAM") == total, declared
            plan_path = folder / "gpu.md"
            plan_path.write_text(
                f"- [ ] id=gpu lane=1 resources=GPU:1,VRAM:{int(per_gpu // 2)} "
                "payload=@cmd:echo on-gpu\n"
                "- [ ] id=vision lane=1 model=vision deps=gpu payload=@cmd:echo vision\n")
            vision_vram = min(per_gpu // 2, 8e9)
            with dask.config.set({"obdask.placement.models.vision.vram": vision_vram}):
                result = obdask.run(obdask.Plan.from_file(plan_path), client)
            report["placed"] = {r["id"]: r["worker"] for r in result.records}
            assert result.ok and set(report["placed"].values()) == {addr}, result.records
            too_big = folder / "too_big.md"
            too_big.write_text(f"- [ ] id=huge lane=1 resources=VRAM:{int(total * 2)} "
                               "payload=@cmd:true\n")
            try:
                obdask.run(obdask.Plan.from_file(too_big), client)
            except PlacementError as exc:
                report["too_big_error"] = str(exc)
            else:
                raise AssertionError("a VRAM request above the total must fail at submit")
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, 15)
            except ProcessLookupError:
                pass
        for proc in procs:
            proc.wait(timeout=30)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--simulate", action="store_true",
                        help="no GPU here: pretend one 24 GB GPU (worker --resources) to "
                             "check this script itself before spending device time")
    args = parser.parse_args(argv)
    from obdask.resources import gpu_inventory, host_resources

    report: dict = {"inventory": [g.to_dict() for g in gpu_inventory()],
                    "nvidia_smi": nvidia_smi(), "host": host_resources()}
    status = 0
    if args.simulate:
        report["host"].update(GPU=1.0, VRAM=24e9)
        with tempfile.TemporaryDirectory() as folder:
            cluster_checks(report, Path(folder), ["--resources", "GPU=1,VRAM=24e9"])
    elif not report["inventory"]:
        print("no NVIDIA GPU visible (NVML reports none): only the inventory ran")
        status = 2
    else:
        smi = report["nvidia_smi"]
        if smi is not None and len(smi) != len(report["inventory"]):
            print(f"FAIL: NVML sees {len(report['inventory'])} GPUs, nvidia-smi {len(smi)}")
            status = 1
        with tempfile.TemporaryDirectory() as folder:
            try:
                cluster_checks(report, Path(folder))
            except AssertionError as exc:
                print(f"FAIL: {exc}")
                status = 1
    print(json.dumps(report, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    print("OK" if status == 0 else f"exit {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
