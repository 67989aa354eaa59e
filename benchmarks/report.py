"""The suite's outputs: a markdown table of every section, and PNG curves (matplotlib).

matplotlib is optional (``pip install obdask[bench]``): without it the PNGs are skipped
with a note and everything else is written.
"""

from __future__ import annotations

import os
from typing import Any


def _ms(s: dict[str, Any], n: int) -> str:
    return (f"{1000 * s['median'] / n:.2f} ({1000 * s['min'] / n:.2f}-"
            f"{1000 * s['max'] / n:.2f})")


def _per_job(section: dict[str, Any]) -> list[str]:
    cols = ["raw", "obdask", "obdask-unopt", "obdask-sandbox", "floor"]
    present = [c for c in cols if any(c in r for r in section["rows"])]
    out = ["| case | jobs | " + " | ".join(f"{c} ms/job" for c in present)
           + " | obdask/raw | obdask/floor |", "|---" * (len(present) + 4) + "|"]
    for r in section["rows"]:
        cells = [_ms(r[c], r["jobs"]) if c in r else "" for c in present]
        ratios = section["ratios"]
        a = ratios.get(f"obdask/raw {r['case']}")
        b = ratios.get(f"obdask/floor {r['case']}")
        out.append(f"| {r['case']} | {r['jobs']} | " + " | ".join(cells)
                   + f" | {'' if a is None else f'{a:.2f}'} | {'' if b is None else f'{b:.2f}'} |")
    return out


def _generic(section: dict[str, Any]) -> list[str]:
    rows = section["rows"]
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))] if rows else []
    out = ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"] if keys else []
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    # Statistics (median, min-max) of the rows' nested measurements.
    for r in rows:
        for k, v in r.items():
            if isinstance(v, dict) and "median" in v:
                label = ", ".join(f"{x}={_fmt(r[x])}" for x in keys[:1])
                out.append(f"* {label} {k}: median {_fmt(v['median'])} "
                           f"(min {_fmt(v['min'])}, max {_fmt(v['max'])}, n={v['n']})")
            elif isinstance(v, dict) and all(isinstance(x, dict) and "median" in x
                                            for x in v.values()):
                for name, s in v.items():
                    out.append(f"* {k} {name}: median {_fmt(s['median'])} "
                               f"(min {_fmt(s['min'])}, max {_fmt(s['max'])}, n={s['n']})")
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(results: dict[str, Any], guard_rows: list[dict[str, Any]]) -> str:
    """The results as markdown: one table per section, then the ratios and the guard."""
    meta = results["meta"]
    lines = [f"# obdask benchmark suite ({meta['mode']})", "",
             f"`{meta['command']}` on {meta['host']}: {meta['cpus']} CPUs, load average "
             f"{meta['load_before']} before, {meta['load_after']} after; Python "
             f"{meta['python']}, distributed {meta['distributed']}; {meta['seconds']:.0f} s.",
             "Times are medians of the repeats (min-max in brackets); ratios are of medians "
             "measured side by side.", ""]
    for name, section in results["sections"].items():
        lines += [f"## {name}", ""]
        if "error" in section:
            lines += [f"failed: {section['error']}", ""]
            continue
        lines += (_per_job(section) if name == "per-job" else _generic(section)) + [""]
    lines += ["## Ratios", "", "| ratio | value | target | guard | |", "|---|---|---|---|---|"]
    guarded = {r["name"]: r for r in guard_rows}
    for section in results["sections"].values():
        for key, value in section.get("ratios", {}).items():
            g = guarded.get(key)
            if g is None:
                lines.append(f"| {key} | {value:.2f} | | | |")
            else:
                verdict = "target met" if g["meets_target"] else ("ok" if g["ok"] else "FAIL")
                lines.append(f"| {key} | {value:.2f} | {g['op']} {g['target']:g} | "
                             f"{g['op']} {g['limit']:g} | {verdict} |")
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"* {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def plots(results: dict[str, Any], out: str) -> tuple[list[str], str | None]:
    """PNG curves of the scaling sections; returns (files written, note or None)."""
    sections = results["sections"]
    wanted = [s for s in ("workers", "fleet", "compile", "client")
              if s in sections and "error" not in sections[s]]
    if not wanted:
        return [], None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install obdask[bench]): no PNG plots"
    written = []
    for name in wanted:
        rows = sections[name]["rows"]
        fig, ax = plt.subplots(figsize=(6, 4))
        if name == "workers":
            x = [r["workers"] for r in rows]
            ax.plot(x, [1000 * r["wall_s_per_job"]["median"] for r in rows], "o-",
                    label="wall ms/job")
            ax.plot(x, [1000 * r["scheduler_cpu_s_per_job"]["median"] for r in rows], "s-",
                    label="client+scheduler CPU ms/job")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("workers (1 thread each)")
        elif name == "fleet":
            x = [r["K"] for r in rows]
            ax.plot(x, [r["calls_per_s"] for r in rows], "o-", label="calls/s")
            ax.plot(x, [r["limit"] for r in rows], "--", label="limit K*P/L")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("endpoints K")
        elif name == "compile":
            x = [r["steps"] for r in rows]
            ax.plot(x, [r["us_per_step"] for r in rows], "o-", label="us/step")
            ax.plot(x, [r["bytes_per_step"] / 1024 for r in rows], "s-", label="KiB/step peak")
            ax.set_xscale("log")
            ax.set_xlabel("plan steps")
        else:
            x = [r["jobs"] for r in rows]
            ax.plot(x, [r["ms_per_job"] for r in rows], "o-", label="client CPU ms/job")
            ax.plot(x, [r["bytes_per_job"] / 1024 for r in rows], "s-", label="RSS KiB/job")
            ax.set_xscale("log")
            ax.set_xlabel("plan jobs")
        ax.set_ylim(bottom=0 if name != "fleet" else None)
        ax.set_title(f"obdask: {name}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        path = os.path.join(out, f"{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written, None
