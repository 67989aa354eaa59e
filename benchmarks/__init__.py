"""obdask's benchmarks: one suite (``python -m benchmarks``) and the older single scripts.

* ``__main__``: the suite's command line (sections, ``--quick``, ``--guard``, ``--out``);
* ``suite``: the sections measured on one machine (per-job, compile, client, llm,
  sessions, metrics); ``scaling``: workers 1-16 and a fleet of model endpoints;
* ``guard``: the bounds on the ratios (CI); ``report``: markdown and PNG curves;
* ``common``: plans, statistics, clusters, the spawn floor, memory;
* ``bench_*.py``, ``cpu_per_job.py``, ``cpu_breakdown.py``, ``gpu_check.py``: single-purpose
  scripts, still run as ``python benchmarks/<script>.py`` (the suite reuses their pieces).

See docs/performance.md for the figures and the exact commands.
"""
