"""Dask preload modules for clusters started by hand.

* ``dask scheduler --preload obdask.preload.scheduler`` installs obdask's
  scheduler extensions (:data:`obdask.preload.scheduler.EXTENSIONS`).
* ``dask worker ADDR --preload obdask.preload.worker --lanes 2,3
  --ollama-endpoint http://127.0.0.1:11434`` declares the detected resources
  (GPU, VRAM, CPU, MEM, lanes) before the worker registers.

See ``docs/cluster.md``.
"""
