"""A search you can watch, and one that stops when it stops improving.

    [8/24] trial 7 COMPLETE final_val_accuracy 0.9722 (best 0.9792, trial 3) optimizer.lr=0.00123 ... 6.1 s
    [9/24] trial 8 PRUNED at epoch 3 val_accuracy 0.8611 (best 0.9792, trial 3) optimizer.lr=0.000112 ... 2.4 s

`trial_line` is what the sweeper (`hydra_plugins/pipeline_optuna_sweeper`) prints as
each trial is told, from what the study's storage holds, so a line names the best of
every worker on the study. The `[finished/n_trials]` prefix counts the study's finished
trials (what `n_trials` counts); `trial N` is Optuna's number, as in the child run's
`optuna.trial_number` tag and in optuna-dashboard.

`Patience` (`hydra.sweeper.patience=N`, `min_delta`) ends a study once N finished trials
in a row, in the order they finished, have not improved the best by more than
`min_delta`: pruned and failed trials count as not improving. Optuna's own terminator
is deprecated, and W&B's and Katib's early stopping stop single runs, not a search.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipeline.errors import ConfigError


def _counted(trials: Sequence) -> list:
    """The study's trials that count toward n_trials, in the order they finished."""
    from pipeline.tracking.optuna_study import counts_toward_n_trials

    finished = [t for t in trials if counts_toward_n_trials(t)]
    return sorted(finished, key=lambda t: (t.datetime_complete or datetime.max, t.number))


def best_of(trials: Sequence, direction: str) -> Any | None:
    """The best COMPLETE trial among `trials`, the earliest of equals; None if none is complete."""
    from optuna.trial import TrialState

    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not complete:
        return None
    sign = 1 if direction == "maximize" else -1
    return max(complete, key=lambda t: (sign * t.value, -t.number))


def trial_line(trial, trials: Sequence, n_trials: int, metric: str, direction: str) -> str:
    """The line of one told trial (a `FrozenTrial`), `trials` being the study's trials by then."""
    from optuna.trial import TrialState

    counted = _counted(trials)
    position = next((i + 1 for i, t in enumerate(counted) if t.number == trial.number), len(counted))
    words = [f"[{position}/{n_trials}] trial {trial.number} {trial.state.name}"]
    if trial.state == TrialState.COMPLETE:
        words.append(f"{metric} {trial.value:.4f}")
    elif trial.state == TrialState.PRUNED:
        epoch = trial.user_attrs.get("pruned_at_epoch", trial.last_step)
        reported = trial.intermediate_values.get(epoch)
        monitor = metric.removeprefix("final_")
        words.append(f"at epoch {epoch}" + (f" {monitor} {reported:.4f}" if reported is not None else ""))
    elif trial.state == TrialState.FAIL:
        words.append(f"({str(trial.user_attrs.get('failure_reason', 'its process died'))[:120]})")
    best = best_of(trials, direction)
    if best is not None:
        words.append(f"(best {best.value:.4f}, trial {best.number})")
    words += [f"{key}={_short(value)}" for key, value in trial.params.items()]
    if trial.datetime_start and trial.datetime_complete:
        words.append(f"{(trial.datetime_complete - trial.datetime_start).total_seconds():.1f} s")
    return " ".join(words)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Patience:
    """Stop a study after `trials` finished trials in a row without an improvement of
    the best by more than `min_delta` (None: never).

    Args:
        trials: `hydra.sweeper.patience`.
        min_delta: `hydra.sweeper.min_delta`: a smaller gain is no improvement.
        direction: `maximize` or `minimize`.
    """

    trials: int | None
    min_delta: float
    direction: str

    @classmethod
    def of(cls, settings: Mapping[str, Any], direction: str) -> Patience:
        """From `hydra.sweeper`; a bad value is a `ConfigError`."""
        patience, min_delta = settings.get("patience"), settings.get("min_delta") or 0.0
        if patience is not None and (not isinstance(patience, int) or patience < 1):
            raise ConfigError(f"hydra.sweeper.patience must be null or an integer >= 1. Received: {patience!r}")
        if not isinstance(min_delta, (int, float)) or not math.isfinite(min_delta) or min_delta < 0:
            raise ConfigError(f"hydra.sweeper.min_delta must be >= 0. Received: {min_delta!r}")
        return cls(patience, float(min_delta), direction)

    def stop_reason(self, trials: Sequence, metric: str) -> str | None:
        """Why the study holding `trials` should stop, or None while it should go on."""
        from optuna.trial import TrialState

        if self.trials is None:
            return None
        best, since = None, 0
        for trial in _counted(trials):
            improved = trial.state == TrialState.COMPLETE and (
                best is None or (trial.value - best.value if self.direction == "maximize" else best.value - trial.value)
                > self.min_delta)
            best, since = (trial, 0) if improved else (best, since + 1)
        if since < self.trials:
            return None
        what = f"{metric} {best.value:.4f} (trial {best.number})" if best is not None else f"any {metric}"
        margin = f" by more than {self.min_delta:g}" if self.min_delta else ""
        return (f"patience: {since} finished trials in a row did not improve {what}{margin} "
                f"(hydra.sweeper.patience={self.trials})")
