"""docs/deploy.md's SLURMCluster example, executed: its job script carries the obdask preloads.

The example is the python block after ``<!-- slurm-example -->`` in docs/deploy.md, run
as written (only the dashboard port becomes a free one); dask-jobqueue starts the
scheduler in this process with the obdask scheduler preload and renders the batch
script without submitting it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re

from distributed import Client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example() -> str:
    with open(os.path.join(ROOT, "docs", "deploy.md")) as f:
        text = f.read()
    match = re.search(r"<!-- slurm-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/deploy.md lost its marked SLURMCluster example"
    return match.group(1)


def test_slurm_example_job_script_has_preload_gpu_and_resources():
    code = _example().replace('"dashboard_address": ":8787"', '"dashboard_address": ":0"')
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/deploy.md", "exec"), namespace)
    cluster = namespace["cluster"]
    try:
        script = out.getvalue()
        assert script == cluster.job_script() + "\n"
        assert "#SBATCH --gres=gpu:1" in script
        assert "#SBATCH -p gpu" in script
        worker = next(line for line in script.splitlines() if "distributed.cli.dask_worker" in line)
        assert cluster.scheduler_address in worker
        # The preload and its option after it, and the resources, on the worker's command.
        assert "--preload obdask.preload.worker --ollama-endpoint http://127.0.0.1:11434" in worker
        assert "--resources GPU=1,VRAM=80000000000" in worker
        assert "DASK_OBDASK__STORE__ARTIFACTS=s3://obdask-lab/artifacts" in script
        # The scheduler dask-jobqueue started here runs the obdask plugin.
        with Client(cluster) as client:
            assert client.run_on_scheduler(_has_obdask_plugin)
    finally:
        cluster.close()


def _has_obdask_plugin(dask_scheduler) -> bool:
    return "obdask" in dask_scheduler.plugins and "obdask" in dask_scheduler.extensions
