"""The callbacks of one `fit`, wired in one place: which are configured, what each needs
from the run, and the order Keras calls them in.

    callbacks = FitCallbacks.from_plan(plan)             # before TensorFlow builds anything
    initial_epoch = callbacks.restore(plan, guarded, splits.steps_per_epoch)   # resume only
    with pending_run.opening(...) as run:                 # the MLflow run, opened as the first steps train
        with callbacks.running(strategy, run):
            guarded.fit(..., callbacks=callbacks.attach(plan, run, guarded, splits))

The run's opener comes first: at the latest before anything of an epoch is logged,
the run is open. The guard (`callbacks.grad_norm`) acts on a bad step before anything
else sees the epoch; the epoch logger follows the configured callbacks; an Optuna
trial's pruning reports the logged epoch next (and may stop `fit`); the checkpoint
comes last, once the epoch is logged and early stopping updated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
import keras
from omegaconf import DictConfig

from callbacks.checkpoint import Checkpointing
from callbacks.grad_norm import GradNormGuard
from callbacks.mlflow_logger import MLflowEpochLogger
from callbacks.profile import ProfileSteps
from pipeline.errors import ConfigError
from pipeline.pending_run import PendingRun, RunOpener
from pipeline.plan import RunPlan
from pipeline.training import distribute
from pipeline.training.guarded import EpochProgbar, GuardedModel, TrainProgress

if TYPE_CHECKING:
    from callbacks.optuna_pruning import OptunaPruning


def instantiate_callbacks(cfg: DictConfig) -> list[keras.callbacks.Callback]:
    """The configured callbacks (`cfg.callbacks`), in config order; a bad value is a config error."""
    callbacks = []
    for name, callback in cfg.callbacks.items():
        if callback is None:
            continue
        try:
            callbacks.append(hydra.utils.instantiate(callback))
        except Exception as error:  # Hydra wraps the callback's own ValueError
            cause = error.__cause__ or error
            message = str(cause) if str(cause).startswith(f"callbacks.{name}") else f"callbacks.{name}: {cause}"
            raise ConfigError(message) from None
    return callbacks


@dataclass
class FitCallbacks:
    """The configured callbacks, with the two that the run wires by hand picked out.

    Args:
        configured: every configured callback, in config order.
        guard: the gradient-norm and finite-value guard, if configured.
        checkpointing: the checkpoint callback, if configured.
        pruning: reports each epoch to the run's Optuna trial and stops a pruned one
            (`hparams_search=optuna`, when `optimized_metric` has a per-epoch `val_*` value).
    """

    configured: list[keras.callbacks.Callback]
    guard: GradNormGuard | None = None
    checkpointing: Checkpointing | None = None
    pruning: OptunaPruning | None = None
    epoch_logger: MLflowEpochLogger | None = field(default=None, init=False)

    @classmethod
    def from_plan(cls, plan: RunPlan) -> FitCallbacks:
        configured = instantiate_callbacks(plan.cfg)
        guard = next((c for c in configured if isinstance(c, GradNormGuard)), None)
        checkpointing = next((c for c in configured if isinstance(c, Checkpointing)), None)
        if guard is not None and guard.action == "rollback" and checkpointing is None:
            raise ConfigError("callbacks.grad_norm.action=rollback needs checkpoints to roll back to: "
                              "keep callbacks.checkpoint. Received: callbacks.checkpoint=null")
        pruning = None
        if plan.optuna_trial is not None:  # a trial of hparams_search=optuna (these modules import MLflow)
            from callbacks.optuna_pruning import OptunaPruning
            from pipeline.tracking.optuna_trial import monitored_metric

            monitor = monitored_metric(str(plan.cfg.optimized_metric))
            pruning = OptunaPruning(plan.optuna_trial, monitor) if monitor else None
        return cls(configured, guard, checkpointing, pruning)

    @contextlib.contextmanager
    def holding_checkpoints(self) -> Iterator[None]:
        """Around the whole training, record and close of the run included: the checkpoint
        directory, once opened (`restore` or `attach`), stays this process's until the
        run is closed, so that no `resume=` of it can start before."""
        try:
            yield
        finally:
            if self.checkpointing is not None:
                self.checkpointing.release()

    def restore(self, plan: RunPlan, guarded: GuardedModel, steps_per_epoch: int) -> int:
        """On a resume, open the run's checkpoints and restore the newest; return the
        epoch `fit` starts at (0 for a new run). Called before the run reopens, so
        unreadable checkpoints leave it as it was."""
        if plan.resume is None or self.checkpointing is None:
            return 0
        self._open_checkpoints(plan, plan.resume.checkpoint_dir, guarded)
        position = self.checkpointing.restore_latest()
        if position is None:
            return 0
        epoch, batch = position
        if batch >= steps_per_epoch:  # saved at an epoch's end
            self.checkpointing.resume_at_next_epoch()
            return epoch + 1
        guarded.train_state.re_enter_epoch()
        return epoch

    def attach(self, plan: RunPlan, run: PendingRun, guarded: GuardedModel, splits) -> list[keras.callbacks.Callback]:
        """Wire the callbacks to `run`, which may still be opening; return them in the order
        `fit` calls them."""
        if self.checkpointing is not None and plan.resume is None:
            self._open_checkpoints(plan, plan.checkpoint_dir(run.open), guarded)
        for profile in (c for c in self.configured if isinstance(c, ProfileSteps) and c.directory is None):
            profile.directory = plan.output_dir / "profile" / run.open()  # debug=profile: the trace before it is logged
        if self.guard is not None:
            self.guard.batch_at = splits.train_batch  # the diagnosis re-runs the offending batch
            self.guard.restore_last_checkpoint = self.checkpointing.restore_for_rollback if self.checkpointing else None
            self.guard.open_run = run.open  # a bad step in the first steps is logged to the run, too
        self.epoch_logger = MLflowEpochLogger(offline_file=plan.output_dir / "offline-metrics.jsonl")
        run.when_open(self.epoch_logger.use_run)
        if self.guard is not None:  # its norms go with each epoch's metrics: one call to the store, one fallback
            self.guard.log_values = self.epoch_logger.log_later
        if self.checkpointing is not None:  # no checkpoint on disk ahead of the epochs it covers
            self.checkpointing.before_write = self.epoch_logger.flush
            self.checkpointing.open_run = run.open  # trained steps are saved once their run is in the store
        ordered = [RunOpener(run), TrainProgress(), *(c for c in self.configured if c is not self.checkpointing),
                   self.epoch_logger]
        if self.pruning is not None:
            run.when_open(self.pruning.use_run)
            ordered.append(self.pruning)
        ordered += [self.checkpointing] if self.checkpointing is not None else []
        return ordered + ([EpochProgbar()] if plan.cfg.trainer.verbose else [])  # where Keras puts its own: last

    @contextlib.contextmanager
    def running(self, strategy, run: PendingRun) -> Iterator[None]:
        """Around `fit`: a lost multi-worker peer becomes one line saying how to resume;
        whatever happens, the last epochs reach the store (or the offline file) and the
        checkpoint writer finishes."""
        try:
            yield
        except Exception as error:
            explained = distribute.explained(error, strategy, run.open)
            if explained is error:
                raise
            raise explained from error
        finally:
            if self.epoch_logger is not None:
                self.epoch_logger.wait()
            if self.checkpointing is not None:
                self.checkpointing.close()

    def _open_checkpoints(self, plan: RunPlan, directory: Path, guarded: GuardedModel) -> None:
        self.checkpointing.open(directory, guarded, self.configured, plan.scratch_checkpoint_dir(directory),
                                resuming=plan.resume is not None)
