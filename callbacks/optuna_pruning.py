"""Optuna pruning for one trial of `hparams_search=optuna`: report the validation metric
after every epoch, and stop training when the study's pruner says the trial is hopeless.

The trial may run in another process than the search (joblib, submitit, Ray): it finds
its study and trial through the shared storage, from an `OptunaTrial` that the sweeper
(`hydra_plugins/pipeline_optuna_sweeper`) hands to the job through `$PIPELINE_OPTUNA_TRIAL`.
The job then returns its metric as usual; the sweeper reads `pruned_at_epoch` from the
trial's user attributes and tells Optuna the trial was PRUNED.
"""

from __future__ import annotations

import logging
import math

import keras

from pipeline.tracking.optuna_trial import OptunaTrial, make_pruner, storage_for

log = logging.getLogger(__name__)


class OptunaPruning(keras.callbacks.Callback):
    """Reports `monitor` to the trial after every epoch; stops `fit` when the trial is pruned.

    Args:
        trial: the trial this job runs (`OptunaTrial`).
        monitor: the per-epoch log to report, e.g. `val_accuracy`.
        run_id: the job's MLflow run, tagged `pruned_at_epoch` when pruned.
    """

    def __init__(self, trial: OptunaTrial, monitor: str, run_id: str | None = None) -> None:
        super().__init__()
        self.trial = trial
        self.monitor = monitor
        self.run_id = run_id
        self.pruned_at_epoch: int | None = None
        self._trial = None

    def use_run(self, run_id: str) -> None:
        """Tag run `run_id` when the trial is pruned (the pipeline's run, once it is open)."""
        self.run_id = run_id

    def on_train_begin(self, logs=None) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=self.trial.study_name, storage=storage_for(self.trial.storage),
                                  pruner=make_pruner(self.trial.pruner, self.trial.startup_trials,
                                                     self.trial.warmup_epochs))
        self._trial = optuna.trial.Trial(study, self.trial.trial_id)

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        value = (logs or {}).get(self.monitor)
        if self._trial is None or value is None or not math.isfinite(float(value)):
            return  # a non-finite epoch is the guard's business, not the pruner's
        self._trial.report(float(value), epoch)
        if not self._trial.should_prune():
            return
        self.pruned_at_epoch = epoch
        self._trial.set_user_attr("pruned_at_epoch", epoch)
        log.info("optuna: trial %d pruned at epoch %d (%s=%.4f)", self.trial.number, epoch, self.monitor, value)
        if self.run_id is not None:
            from mlflow.tracking import MlflowClient

            MlflowClient().set_tag(self.run_id, "pruned_at_epoch", str(epoch))
        self.model.stop_training = True
