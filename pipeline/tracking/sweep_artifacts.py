"""What a job of a search records besides its metrics: its model, plots and test scores
only where someone will read them.

A trial of `hparams_search=optuna` that does not beat the study's best when it finishes
is never the sweep's best, so nobody registers, evaluates or inspects its model: it
logs its config, curves and the optimized metric, and is done (py-spy over a 24-trial
digits search: the plots were 41% of the search's time, the SavedModel 9%; docs/search.md).
The trial that becomes the study's best records everything; so does every trial under
`hydra.callbacks.sweep.register=all` or `+trial_artifacts=all`. A pruned or failed
trial never exports a model (under `register=all` or `+trial_artifacts=all` a pruned one
still gets its plots and test scores). A grid sweep's jobs and single runs record
everything, as before.

    decision = sweep_artifacts.decide(plan, pruned_at_epoch=None, value=0.97)
    decision.full, decision.model, decision.reason

The child run is tagged `trial_artifacts` with the decision (`all`, or `metrics only: ...`
saying why), so the UI says why a trial has no model, and the sweep's summary prefers,
among equally good trials, the one with a model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError, one_line

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from pipeline.plan import RunPlan

# `+trial_artifacts=`: `best` (the default): only the trial that becomes the study's best
# records plots, test scores and model; `all`: every trial does (a pruned one: no model).
log = logging.getLogger(__name__)

TRIAL_ARTIFACTS = ("best", "all")
TAG = "trial_artifacts"
METRICS_ONLY = "metrics only"


@dataclass(frozen=True)
class Decision:
    """What a run records after `fit`.

    Args:
        full: plots, the `.keras` file and the evaluation on test.
        model: the SavedModel (and, as configured, its registration).
        reason: the `trial_artifacts` tag: `all`, or `metrics only: <why>`.
    """

    full: bool
    model: bool
    reason: str


EVERYTHING = Decision(full=True, model=True, reason="all")


def requested(cfg: DictConfig) -> str:
    """`+trial_artifacts=` of a run's config (`best` when absent).

    Raises:
        ConfigError: a value other than best or all.
    """
    value = str(cfg.get("trial_artifacts") or "best")
    if value not in TRIAL_ARTIFACTS:
        raise ConfigError(f"trial_artifacts must be one of {', '.join(TRIAL_ARTIFACTS)}. Received: {value!r}")
    return value


def decide(plan: RunPlan, pruned_at_epoch: int | None, value: float | None) -> Decision:
    """What the run of `plan` records, once its optimized metric is `value` (None: not
    computed) and its trial was pruned at `pruned_at_epoch` (None: not pruned)."""
    trial = plan.optuna_trial
    if trial is None or plan.sweep is None:  # a single run, a resumed or reproduced trial, a grid sweep's job
        return EVERYTHING
    every_trial = plan.sweep.register == "all" or requested(plan.cfg) == "all"
    if pruned_at_epoch is not None:
        return Decision(full=every_trial, model=False,
                        reason=("all but the model" if every_trial else METRICS_ONLY)
                        + f": pruned at epoch {pruned_at_epoch}")
    if value is None or not math.isfinite(value):
        return Decision(full=False, model=False, reason=f"{METRICS_ONLY}: {plan.cfg.optimized_metric} is {value}")
    if every_trial:
        return EVERYTHING
    from pipeline.tracking.optuna_trial import best_so_far

    try:
        best = best_so_far(trial)
    except Exception as error:  # the study's storage did not answer: better a model too many than none
        log.warning("optuna: the study's best so far is unknown (%s): trial %d records everything", one_line(error),
                    trial.number)
        return EVERYTHING
    if best is None:
        return Decision(full=True, model=True, reason="all: the study's first complete trial")
    best_value, best_number, direction = best
    if (value > best_value) if direction == "maximize" else (value < best_value):
        return Decision(full=True, model=True, reason=f"all: the study's best ({value:.4g} beats "
                                                      f"{best_value:.4g} of trial {best_number})")
    return Decision(full=False, model=False,
                    reason=f"{METRICS_ONLY}: {plan.cfg.optimized_metric} {value:.4g} does not beat the study's best "
                           f"{best_value:.4g} (trial {best_number}); +trial_artifacts=all records every trial")
