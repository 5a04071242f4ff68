"""What a training run records in MLflow after its `fit` (its opening and first records
are `pipeline.pending_run`'s): the final scores, plots, the `.keras` file, the
SavedModel and its registration, with a fallback that keeps the trained model on disk
when the store goes away.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import mlflow
import tensorflow as tf
from mlflow.tracking import MlflowClient

from callbacks.mlflow_logger import metric_key
from pipeline import tracking
from pipeline.errors import PipelineError, one_line
from pipeline.plan import RunPlan
from pipeline.tracking import registry, report, sweep_artifacts

if TYPE_CHECKING:
    from pipeline.fit_callbacks import FitCallbacks

log = logging.getLogger(__name__)


def result(plan: RunPlan, run_id: str, guarded, history, initial_epoch: int, splits,
           callbacks: FitCallbacks) -> dict[str, float]:
    """Score the model as it will be exported, log that, the plots, the `.keras` file and
    the SavedModel, and register it; a search's trial records only what
    `sweep_artifacts.decide` says it needs. If the store fails here, keep the model on
    disk and say where everything is.

    Returns:
        `train_*` and `val_*` of the last epoch; `final_val_*` and `test_*` of the model
        as exported (e.g. the best epoch's weights under early stopping).
    """
    cfg, model = plan.cfg, guarded.model
    # Callbacks such as early stopping may have restored an earlier epoch's weights, so
    # the last epoch's logs do not describe the exported model: score it again.
    final = {}
    if splits.val is not None:
        final |= {f"final_val_{k}": float(v)
                  for k, v in guarded.evaluate(splits.val, return_dict=True, verbose=0).items()}
    heads = [head for head, _ in splits.input_spec.heads]
    final |= registry.head_means(final, heads)  # multi-output: the mean of the heads' accuracies
    # A resumed run's epochs are in the store: Keras' history covers only this process's (maybe none).
    curves = history.history if plan.resume is None else logged_history(run_id)
    pruning = callbacks.pruning
    # A search's trial that is not its best records its metrics only (`sweep_artifacts`).
    decision = sweep_artifacts.decide(plan, pruning.pruned_at_epoch if pruning else None,
                                      optimized_value(cfg.optimized_metric, curves, final))
    if decision.full or str(cfg.optimized_metric).startswith("test_"):
        final |= {f"test_{k}": float(v)
                  for k, v in guarded.evaluate(splits.test, return_dict=True, verbose=0).items()}
        final |= registry.head_means(final, heads)
    log.info("final: %s", {k: round(v, 4) for k, v in sorted(final.items())})
    metrics = {metric_key(k): float(v[-1]) for k, v in curves.items() if v} | final
    epoch_logger, checkpointing, guard = callbacks.epoch_logger, callbacks.checkpointing, callbacks.guard
    try:
        if epoch_logger.first_failure is not None:
            raise ConnectionError(f"unreachable since {epoch_logger.first_failure}")
        log_once(run_id, final, step=initial_epoch + len(history.epoch))
        for callback in callbacks.configured:  # e.g. early stopping: where it stopped, which epoch it restored
            if hasattr(callback, "run_tags"):
                mlflow.set_tags(callback.run_tags())
        if plan.optuna_trial is not None:
            mlflow.set_tag(sweep_artifacts.TAG, decision.reason)
        if not any(a.path == "config.yaml" for a in MlflowClient().list_artifacts(run_id)):
            log.warning("config.yaml of run %s is gone (were its artifacts deleted while it ran?): logged again, "
                        "so that resume= and reproduce= still work; artifacts logged before it are lost", run_id)
            tracking.log_config_file(cfg)
        if decision.full:
            # Plots never fail a run: each failure is a warning naming the plot.
            report.log_training_plots(curves, model, guarded.optimizer, splits.steps_per_epoch * cfg.trainer.epochs,
                                      splits.test, splits.input_spec, run_id, guard.threshold if guard else None,
                                      class_names=splits.class_names, label_names=splits.label_names)
            report.log_keras_model(model)  # for pipeline.inspect: layers survive in .keras, not in a SavedModel
        if cfg.mlflow.log_model and decision.model:
            client = MlflowClient()
            # A resumed run may have logged its model before it was killed: never twice.
            model_id = registry.logged_model_of(client, client.get_run(run_id)) if plan.resume else None
            if model_id is None:
                model_id = registry.log_saved_model(
                    model, splits.input_spec, input_example=registry.example_inputs(splits.test, splits.input_spec),
                    metadata=registry.model_metadata(splits.class_names, splits.label_names)).model_id
            if plan.sweep is None or plan.sweep.register == "all":  # else the sweep registers its best job
                registry.register(client, cfg.mlflow, tracking.registered_model_name(cfg, plan.architecture),
                                  model_id, run_id, metrics)
        elif not decision.model:
            log.info("%s: no model logged (%s)", plan.sweep.run_name if plan.sweep else "run", decision.reason)
    except Exception as error:  # the store went away, or the disk filled: keep what training produced
        raise PipelineError(f"training finished but MLflow could not record it ({one_line(error)}). "
                            + kept(model, plan.output_dir / "model.keras", epoch_logger, checkpointing)) from error
    return metrics


def optimized_value(metric: str, curves: Mapping[str, Sequence[float]], final: Mapping[str, float]) -> float | None:
    """The value of `optimized_metric` the run will return, from the final scores or
    the last epoch's logs (`train_loss`, `val_accuracy`, ...); None if neither has it."""
    if metric in final:
        return final[metric]
    last = {metric_key(k): float(v[-1]) for k, v in curves.items() if v}
    return last.get(metric)


def kept(model: keras.Model, path: Path, epoch_logger, checkpointing) -> str:
    """Save `model` to `path` (under a temporary name, then renamed: a full disk leaves
    no truncated file) and say where the run's work is, for an error message."""
    partial = path.with_name(f".{path.stem}.partial.keras")  # Keras saves only to *.keras
    checkpoints = f", checkpoints in {checkpointing.directory}" if checkpointing else ""
    try:
        model.save(partial)
        os.replace(partial, path)
    except Exception as error:
        partial.unlink(missing_ok=True)
        latest = tf.train.latest_checkpoint(checkpointing.directory) if checkpointing else None
        return (f"The model could not be saved to {path} either ({one_line(error, 200)}); "
                + (f"the last complete checkpoint is {latest}" if latest else "no checkpoint was kept")
                + f"; per-epoch metrics not in the store are in {epoch_logger.offline_file}")
    return f"Kept: the model in {path}, per-epoch metrics in {epoch_logger.offline_file}{checkpoints}"


def logged_history(run_id: str) -> dict[str, list[float]]:
    """The run's per-epoch metrics as the store holds them, in Keras' names (`loss`,
    `val_accuracy`, `learning_rate`, ...): one value per epoch, in epoch order."""
    client = MlflowClient()
    keys = [key for key in client.get_run(run_id).data.metrics
            if key == "lr" or (key.startswith(("train_", "val_")))]
    return {keras_name(key): [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
            for key in keys}


def keras_name(key: str) -> str:
    """The inverse of `metric_key`: `train_loss` -> `loss`, `lr` -> `learning_rate`; `val_*` stays."""
    return "learning_rate" if key == "lr" else key.removeprefix("train_")


def log_once(run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log `metrics` at `step`, except those the run already holds at that step (logged
    before a kill, by the process a resume continues)."""
    client = MlflowClient()
    logged = {key for key in client.get_run(run_id).data.metrics
              if key in metrics and any(m.step == step for m in client.get_metric_history(run_id, key))}
    if len(logged) < len(metrics):
        mlflow.log_metrics({k: v for k, v in metrics.items() if k not in logged}, step=step)
