"""Train one model from the composed Hydra config and track it in MLflow.

    python -m pipeline.train                                  # mlp on digits, offline
    python -m pipeline.train optimizer=sgd optimizer.lr=0.05 trainer.epochs=5
    python -m pipeline.train --cfg job                        # print the composed config

Config groups live in `conf/` (dataset, architecture, optimizer, precision, trainer,
callbacks, mlflow). `train(cfg)` returns the final metrics; the Hydra wrapper at the
bottom only reports errors and hands the optimized metric to sweepers.
"""

from __future__ import annotations

import importlib
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipeline import cli
from pipeline.config import RESERVED_ARCHITECTURE_KEYS, validate
from pipeline.errors import ConfigError, PipelineError, one_line

if TYPE_CHECKING:
    import keras

    from architectures import InputSpec

log = logging.getLogger("pipeline.train")


def train(cfg: DictConfig) -> dict[str, float]:
    """Train, evaluate on the test split, log everything to MLflow and register the model.

    With `cfg.resume` (a run id or `last`), continue that run from its latest
    checkpoint instead, with the config it recorded; with `cfg.reproduce` (a run id),
    train that run's recorded config again as a new run.

    Args:
        cfg: the composed `conf/train.yaml`.

    Returns:
        `train_*` and `val_*` of the last epoch; `final_val_*` and `test_*` of the
        model as exported (e.g. the best epoch's weights under early stopping).
    """
    validate(cfg)  # before any TensorFlow work: a typo costs a second, not a training run
    import keras
    import mlflow

    from callbacks.checkpoint import Checkpointing
    from callbacks.grad_norm import GradNormGuard
    from callbacks.mlflow_logger import MLflowEpochLogger, metric_key
    from pipeline import data, debug, distribute, precision, provenance, report, tracking
    from pipeline.guarded import GuardedModel, TrainProgress

    # A resume or a reproduction trains with the config an earlier run recorded.
    resume = tracking.resumable_run(cfg, _overrides()) if cfg.resume else None
    reproduces, architecture = None, None  # architecture: the group choice the earlier run recorded
    if resume is not None:
        cfg, architecture = resume.config, resume.architecture
    elif cfg.reproduce:
        reproduces = cfg.reproduce
        cfg, architecture = tracking.reproduced_config(cfg, _overrides())
    if resume is not None or reproduces is not None:
        validate(cfg)  # the recorded config, against today's code
    # Before TensorFlow creates any tensor: logical CPUs and multi-worker collectives
    # can only be set up first. Only the chief records the run: other workers train
    # alongside it with MLflow pointed at a throwaway store.
    strategy = distribute.strategy_for(cfg.get("distribution"))
    cfg, resume = distribute.record_on_chief_only(cfg, resume, strategy)
    if cfg.determinism:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()  # for the whole process: TensorFlow has no off switch
    callbacks = instantiate_callbacks(cfg)
    guard = next((c for c in callbacks if isinstance(c, GradNormGuard)), None)
    checkpointing = next((c for c in callbacks if isinstance(c, Checkpointing)), None)
    if guard is not None and guard.action == "rollback" and checkpointing is None:
        raise ConfigError("callbacks.grad_norm.action=rollback needs checkpoints to roll back to: "
                          "keep callbacks.checkpoint. Received: callbacks.checkpoint=null")

    # A sweep runs several jobs in one process: start every run from a clean slate.
    keras.backend.clear_session(free_memory=True)
    with precision.applied(cfg.precision.policy) as policy, strategy.scope():  # build and compile in scope
        log.info("precision: %s (configured: %s)", policy, cfg.precision.policy)
        keras.utils.set_random_seed(cfg.seed)

        splits = data.load(cfg.dataset, seed=cfg.seed)
        splits = debug.apply(cfg, splits)  # debug=smoke|overfit|limit: fewer batches, or one repeated
        splits = distribute.shard_by_data(splits, strategy)  # each global batch split between workers
        log.info("data: %s %s, input %s", cfg.dataset.name, splits.sizes, splits.input_spec)

        model = build_model(cfg, splits.input_spec, architecture)
        distribute.synchronize_batch_norm(model, strategy)  # >1 replica: global batch statistics
        # Trains `model` with the gradient-norm and finite checks in its train step.
        guarded = GuardedModel(model, guard.step_guard if guard else None, epoch=splits.epoch,
                               steps_per_epoch=splits.steps_per_epoch)
        guarded.compile(
            optimizer=build_optimizer(cfg, splits.steps_per_epoch, guard.lr_scale if guard else None),
            **compile_args(cfg.architecture),
            steps_per_execution=distribute.steps_per_execution(cfg.trainer.steps_per_execution, strategy),
            jit_compile=cfg.trainer.jit_compile,
        )
        guarded.build_metrics(data.zeros_batch(splits.test))  # so checkpoints can hold the metrics' state
        state = guarded.build_train_state()
        initial_epoch = 0
        if resume is not None and checkpointing is not None:
            # Before the run reopens: unreadable checkpoints leave it as it was.
            checkpointing.open(Path(resume.checkpoint_dir), guarded, callbacks,
                               distribute.scratch_checkpoint_dir(Path(resume.checkpoint_dir), strategy))
            position = checkpointing.restore_latest()
            if position is not None:
                epoch, batch = position
                if batch >= splits.steps_per_epoch:  # saved at an epoch's end
                    initial_epoch = epoch + 1
                else:
                    initial_epoch = epoch
                    state.re_enter_epoch()

        experiment_id = tracking.connect(cfg.mlflow)  # an unreachable store fails now, not after training
        names = tracking.RunNames.from_config(cfg, {"architecture": architecture} if architecture else _choices(),
                                              policy)
        with tracking.start_run(experiment_id, names.run, names.tags | provenance.provenance_tags(_overrides()),
                                log_file=_job_log_file(), run_id=resume.run_id if resume else None,
                                log_system_metrics=provenance.enable_system_metrics()) as run:
            mlflow.set_tags(debug.tags(cfg))  # a debug run says so: it never passes for a real one
            if reproduces is not None:
                mlflow.set_tag("reproduces", reproduces)
            if resume is None:
                tracking.log_config(cfg, _overrides())
                mlflow.log_param("precision.resolved_policy", policy)
                tracking.log_dataset(cfg.dataset.name, str(splits.info.version), splits.sizes)
                provenance.log_dataset_input(cfg.dataset.name, str(splits.info.version), splits.sizes,
                                             data_dir=splits.info.data_dir)
                tracking.log_model_summary(model)
            else:
                mlflow.set_tag("resumed_with_epochs", str(cfg.trainer.epochs))

            if checkpointing is not None and resume is None:
                directory = _checkpoint_dir(checkpointing, run.info.run_id)
                checkpointing.open(directory, guarded, callbacks,
                                   distribute.scratch_checkpoint_dir(directory, strategy))
                mlflow.set_tag("checkpoint_dir", str(directory))
            if guard is not None:
                guard.batch_at = splits.train_batch  # the diagnosis re-runs the offending batch
                guard.restore_last_checkpoint = checkpointing.restore_for_rollback if checkpointing else None

            # The guard acts on a bad step before anything else sees the epoch; the
            # checkpoint comes last, once the epoch is logged and early stopping updated.
            epoch_logger = MLflowEpochLogger(run.info.run_id, offline_file=_output_dir() / "offline-metrics.jsonl")
            fit_callbacks = [TrainProgress(), *callbacks, epoch_logger]
            if checkpointing is not None:
                fit_callbacks.remove(checkpointing)
                fit_callbacks.append(checkpointing)
            try:
                history = guarded.fit(
                    splits.train,  # every epoch, from one iterator: `steps_per_epoch` says where each ends
                    steps_per_epoch=splits.steps_per_epoch,
                    validation_data=splits.val,
                    epochs=cfg.trainer.epochs,
                    initial_epoch=initial_epoch,
                    shuffle=False,  # the tf.data pipeline shuffles, with the run's seed and the epoch
                    callbacks=fit_callbacks,
                    verbose=cfg.trainer.verbose,
                )
            except Exception as error:  # a lost multi-worker peer becomes one line saying how to resume
                explained = distribute.explained(error, strategy)
                if explained is error:
                    raise
                raise explained from error
            finally:
                epoch_logger.wait()  # the last epochs reach the store, or the offline file
                if checkpointing is not None:
                    checkpointing.close()
            epochs_done = initial_epoch + len(history.epoch)
            # Score the model as it will be exported: callbacks such as early stopping
            # may have restored an earlier epoch's weights, so the last epoch's logs
            # do not describe it.
            final = {f"test_{k}": float(v)
                     for k, v in guarded.evaluate(splits.test, return_dict=True, verbose=0).items()}
            if splits.val is not None:
                final |= {f"final_val_{k}": float(v)
                          for k, v in guarded.evaluate(splits.val, return_dict=True, verbose=0).items()}
            log.info("final: %s", {k: round(v, 4) for k, v in sorted(final.items())})
            metrics = {metric_key(k): float(v[-1]) for k, v in history.history.items()} | final
            try:
                if epoch_logger.first_failure is not None:
                    raise ConnectionError(f"unreachable since {epoch_logger.first_failure}")
                mlflow.log_metrics(final, step=epochs_done)
                # Plots never fail a run: each failure is a warning naming the plot.
                curves = history.history if resume is None else _logged_history(run.info.run_id, history.history)
                report.log_training_plots(curves, model, guarded.optimizer,
                                          splits.steps_per_epoch * cfg.trainer.epochs, splits.test,
                                          splits.input_spec, run.info.run_id, guard.threshold if guard else None)
                report.log_keras_model(model)  # for pipeline.inspect: layers survive in .keras, not in a SavedModel
                if cfg.mlflow.log_model:
                    model_info = tracking.log_saved_model(model, splits.input_spec, names.model)
                    tracking.register_champion(cfg.mlflow, names.model, model_info, metrics)
            except Exception as error:  # the store went away: keep what training produced
                saved = _output_dir() / "model.keras"
                model.save(saved)
                raise PipelineError(
                    f"training finished but MLflow could not record it ({one_line(error)}). "
                    f"Kept: the model in {saved}, per-epoch metrics in {epoch_logger.offline_file}"
                    + (f", checkpoints in {checkpointing.directory}" if checkpointing else "")
                ) from error
    return metrics


def instantiate_callbacks(cfg: DictConfig) -> list[keras.callbacks.Callback]:
    """The configured callbacks, in config order; a bad value is a config error."""
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


def _logged_history(run_id: str, keras_history: dict[str, list[float]]) -> dict[str, list[float]]:
    """A resumed run's whole per-epoch history (Keras' covers only this process's epochs)."""
    from mlflow.tracking import MlflowClient

    from callbacks.mlflow_logger import metric_key

    client = MlflowClient()
    return {name: [m.value for m in sorted(client.get_metric_history(run_id, metric_key(name)), key=lambda m: m.step)]
            for name in keras_history}


def _output_dir() -> Path:
    """The job's output directory under Hydra (outputs/DATE/TIME/), else the current one."""
    log_file = _job_log_file()
    return log_file.parent.absolute() if log_file is not None else Path.cwd()


def _checkpoint_dir(checkpointing, run_id: str) -> Path:
    """`callbacks.checkpoint.directory`, else `checkpoints/` in the job's output
    directory, else (no Hydra run) `./checkpoints/<run id>`."""
    if checkpointing.directory:
        return Path(checkpointing.directory).absolute()
    log_file = _job_log_file()
    if log_file is not None:
        return log_file.parent.absolute() / "checkpoints"
    return Path.cwd() / "checkpoints" / run_id


def build_model(cfg: DictConfig, input_spec: InputSpec, architecture: str | None = None) -> keras.Model:
    """Call the architecture's builder; a model that cannot fit the data is a config error."""
    architecture = architecture or _choices().get("architecture", cfg.architecture._target_)
    module = importlib.import_module(cfg.architecture._target_.rpartition(".")[0])
    if input_spec.multimodal and not getattr(module, "MULTIMODAL", False):
        raise ConfigError(
            f"architecture={architecture} takes images only, but dataset={cfg.dataset.name} has image and "
            f"features inputs and labels {[name for name, _ in input_spec.heads]}: use architecture=multi_io"
        )
    builder_args = {k: v for k, v in cfg.architecture.items() if k not in RESERVED_ARCHITECTURE_KEYS}
    try:
        return hydra.utils.instantiate(builder_args, _partial_=True, _convert_="all")(input_spec)
    except ValueError as error:  # builders explain bad hyperparameters and inputs this way
        raise ConfigError(f"architecture={architecture} with dataset={cfg.dataset.name}: {error}") from None


def build_optimizer(cfg: DictConfig, steps_per_epoch: int, lr_scale=None) -> keras.optimizers.Optimizer:
    """The configured optimizer; a value Keras refuses is a config error, not a traceback."""
    from pipeline import optim

    try:
        return optim.build(cfg.optimizer, steps_per_epoch, cfg.trainer.epochs, lr_scale)
    except ValueError as error:
        raise ConfigError(f"optimizer={_choices().get('optimizer', cfg.optimizer._target_)}: {error}") from None


def compile_args(architecture: DictConfig) -> dict:
    """Loss, loss weights and metrics: the architecture's `compile` block (per output
    head), else sparse categorical cross-entropy and accuracy for one softmax output."""
    if architecture.get("compile") is None:
        return {"loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]}
    return OmegaConf.to_container(architecture.compile, resolve=True)


def _choices() -> dict[str, str]:
    """The option chosen in each config group (e.g. architecture -> mlp), under Hydra."""
    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def _job_log_file() -> Path | None:
    """Hydra's log of this job (`<output_dir>/<job name>.log`), when Hydra runs the job."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if OmegaConf.is_missing(hydra_cfg.runtime, "output_dir"):  # composed, not run, by Hydra
        return None
    return Path(hydra_cfg.runtime.output_dir) / f"{hydra_cfg.job.name}.log"


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="train")
@cli.task
def main(cfg: DictConfig) -> float:
    metrics = train(cfg)
    if cfg.optimized_metric not in metrics:
        log.warning("optimized_metric %r was not computed; available: %s", cfg.optimized_metric, sorted(metrics))
    return metrics.get(cfg.optimized_metric, math.nan)


def cli_main() -> None:
    cli.run(main)


if __name__ == "__main__":
    cli_main()
