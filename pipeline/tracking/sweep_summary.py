"""The summary of a sweep, logged on its parent run: one row per child run, the best
child, a Markdown table for the run's description, and the optimized metric plotted
against each swept parameter.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.tracking.sweep_artifacts import METRICS_ONLY, TAG

if TYPE_CHECKING:  # matplotlib costs ~0.8 s to import; every run loads the sweep callback, only sweeps plot
    from matplotlib.figure import Figure

# Metrics of a child that the summary shows besides the optimized one: the exported model's scores.
SUMMARY_METRIC_PREFIXES = ("final_val_", "test_")


class Summary:
    """The rows of a sweep summary: one per child run, plus the failed rows and the best one."""

    def __init__(self, rows: list[dict[str, Any]], params: list[str], metric: str, direction: str) -> None:
        self.rows = rows
        self.params = params
        self.metric = metric
        self.failed = [row for row in rows if row["status"] != "FINISHED"]
        # A pruned Optuna trial finished early on purpose: its model is no candidate for best.
        scored = [row for row in rows if row["status"] == "FINISHED" and math.isfinite(row.get(metric, math.nan))
                  and row.get("trial_state") != "PRUNED"]
        pick = max if direction == "maximize" else min
        best = pick(scored, key=lambda row: row[metric]) if scored else None
        # Of equally good trials, the one that logged its model (`sweep_artifacts`): a trial
        # that only tied the study's best when it finished recorded its metrics only.
        self.best = next((row for row in scored if row[metric] == best[metric]
                          and not row.get("trial_artifacts", "").startswith(METRICS_ONLY)), best) if best else None

    @classmethod
    def of(cls, children: Sequence, metric: str, direction: str) -> Summary:
        rows, params = [], []
        for run in children:
            if run.data.tags.get("sweep.superseded"):  # run again by a resumed sweep (tracking.sweep_resume)
                continue
            swept = json.loads(run.data.tags.get("sweep.params", "{}"))
            params += [key for key in swept if key not in params]
            metrics = {k: v for k, v in run.data.metrics.items()
                       if k == metric or k.startswith(SUMMARY_METRIC_PREFIXES)}
            rows.append({
                "job": int(run.data.tags.get("sweep.job", "0") or 0),
                "run_name": run.info.run_name,
                "run_id": run.info.run_id,
                "status": run.info.status,
                "failure_reason": run.data.tags.get("failure_reason", ""),
                "registered_model": run.data.tags.get("registered_model", ""),
                **({"trial_state": run.data.tags["trial_state"]} if "trial_state" in run.data.tags else {}),
                **({"trial_artifacts": run.data.tags[TAG]} if TAG in run.data.tags else {}),
                **{f"param {key}": value for key, value in swept.items()},
                **{k: float(v) for k, v in sorted(metrics.items())},
            })
        return cls(rows, params, metric, direction)

    def table(self) -> dict[str, list]:
        """Column -> values, one value per child (MLflow's `log_table` format)."""
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        return {column: [row.get(column, None) for row in self.rows] for column in columns}

    def headline(self) -> str:
        best = (f"; best: {self.best['run_name']} ({self.metric} {self.best[self.metric]:.4g}, "
                f"run {self.best['run_id']})" if self.best else "; no job finished with a finite " + self.metric)
        return f"{len(self.rows)} jobs, {len(self.rows) - len(self.failed)} finished, {len(self.failed)} failed" + best

    def markdown(self) -> str:
        """The run description of the parent: the headline and one table row per child."""
        metrics = [self.metric] + sorted({k for row in self.rows for k in row
                                         if k.startswith(SUMMARY_METRIC_PREFIXES) and k != self.metric})
        lines = [f"**Sweep**: {self.headline()}.", "",
                 "| job | run | status | " + " | ".join(metrics) + " | failure |",
                 "|---" * (4 + len(metrics)) + "|"]
        for row in self.rows:
            values = [f"{row[m]:.4g}" if m in row else "" for m in metrics]
            reason = row["failure_reason"].replace("|", "/")[:200]
            lines.append(f"| {row['job']} | {row['run_name']} | {row['status']} | " + " | ".join(values)
                         + f" | {reason} |")
        return "\n".join(lines)


def metric_vs_params(rows: Sequence[Mapping[str, Any]], metric: str, params: Sequence[str]) -> Figure:
    """The optimized metric of every finished child against each swept parameter.

    Numeric parameters get a numeric axis (logarithmic when positive and spanning 100x or
    more, as learning rates do); others one tick per value. Failed children are left out
    and counted in the title.

    Args:
        rows: `Summary.rows`: `status`, `param <name>` (the override's value) and metrics.
        metric: the y axis, e.g. `final_val_accuracy`.
        params: the swept parameters, one axes each.

    Returns:
        A figure with one axes per parameter, built without pyplot (safe in any process).
    """
    if not params:
        raise ValueError("params must name at least one swept parameter. Received: []")
    scored = [row for row in rows if row["status"] == "FINISHED" and math.isfinite(row.get(metric, math.nan))]
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5 * len(params), 3.4), layout="constrained")
    axes = figure.subplots(1, len(params), squeeze=False).ravel()
    for ax, param in zip(axes, params):
        points = [(row.get(f"param {param}"), row[metric]) for row in scored if f"param {param}" in row]
        numbers = _as_numbers([x for x, _ in points])
        if numbers is not None:
            ax.scatter(numbers, [y for _, y in points], zorder=3)
            if numbers and min(numbers) > 0 and max(numbers) / min(numbers) >= 100:
                ax.set_xscale("log")
        else:
            categories = list(dict.fromkeys(str(x) for x, _ in points))
            ax.scatter([categories.index(str(x)) for x, _ in points], [y for _, y in points], zorder=3)
            ax.set_xticks(range(len(categories)), categories, rotation=30 if len(categories) > 3 else 0)
            ax.set_xlim(-0.5, len(categories) - 0.5)
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    failed = len(rows) - len(scored)
    figure.suptitle(f"{metric} per sweep job" + (f" ({failed} failed, not shown)" if failed else ""))
    return figure


def _as_numbers(values: Sequence[Any]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None
