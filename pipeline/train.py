"""Train one model from the composed Hydra config and track it in MLflow.

    python -m pipeline.train                                  # mlp on digits, offline
    python -m pipeline.train optimizer=sgd optimizer.lr=0.05 trainer.epochs=5
    python -m pipeline.train --cfg job                        # print the composed config

Config groups live in `conf/` (dataset, architecture, optimizer, precision, trainer,
callbacks, mlflow). The Hydra wrapper at the bottom resolves the run's plan
(`pipeline.plan`), reports errors, and hands the optimized metric to sweepers;
`train(plan)` reads top to bottom: data, model, fit (MLflow's store opens on a thread
meanwhile: `pipeline.pending_run`), record.
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import cli, plan
from pipeline.config import RESERVED_ARCHITECTURE_KEYS
from pipeline.errors import ConfigError
from pipeline.plan import RunPlan

if TYPE_CHECKING:
    import keras

    from architectures import InputSpec
    from pipeline.data import Splits
    from pipeline.training.guarded import GuardedModel

log = logging.getLogger("pipeline.train")


def train(plan: RunPlan) -> dict[str, float]:
    """Train, evaluate on the validation and test splits, log everything to MLflow and
    register the model: a new run, or (`plan.resume`) the rest of an unfinished one.

    Args:
        plan: the run's plan, from `pipeline.plan` (`from_hydra`, `compose` or `resolve`).

    Returns:
        `train_*` and `val_*` of the last epoch; `final_val_*` and `test_*` of the model
        as exported (e.g. the best epoch's weights under early stopping).
    """
    # TensorFlow is imported once the plan is valid: a config mistake costs a second.
    import keras

    from pipeline import pending_run, quiet
    from pipeline.fit_callbacks import FitCallbacks
    from pipeline.training import debug, distribute, precision

    cfg = plan.cfg
    runs = quiet.count_run()  # a later run in this process is not told its new functions are "retracing"
    # Before TensorFlow creates any tensor: logical CPUs and multi-worker collectives
    # can only be set up first.
    strategy = distribute.strategy_for(cfg.get("distribution"))
    if cfg.determinism:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()  # for the whole process: TensorFlow has no off switch
    callbacks = FitCallbacks.from_plan(plan)
    keras.backend.clear_session(free_memory=runs > 1)  # fresh layer names; frees a sweep's earlier jobs
    # The checkpoint directory stays this process's until the run closes; build and compile in scope.
    with callbacks.holding_checkpoints(), precision.applied(cfg.precision.policy) as policy, strategy.scope():
        log.info("precision: %s (precision.policy=%s: %s)", policy.policy, cfg.precision.policy, policy.reason)
        keras.utils.set_random_seed(cfg.seed)
        splits = loaded_splits(plan)
        splits = debug.apply(cfg, splits)  # debug=smoke|overfit|limit: fewer batches, or one repeated
        splits = distribute.shard_by_data(splits, strategy)  # each global batch split between workers
        log.info("data: %s %s, input %s", cfg.dataset.name, splits.sizes, splits.input_spec)

        model = build_model(cfg, splits.input_spec, plan.architecture)
        distribute.synchronize_batch_norm(model, strategy)  # >1 replica: global batch statistics
        guarded = compile_guarded(plan, model, splits, callbacks.guard, strategy)
        initial_epoch = callbacks.restore(plan, guarded, splits.steps_per_epoch)

        with pending_run.opening(plan, policy, guarded, splits, checkpoints=callbacks.checkpointing is not None) as run:
            with callbacks.running(strategy, run):
                history = guarded.fit(
                    splits.train,  # every epoch, from one iterator: `steps_per_epoch` says where each ends
                    steps_per_epoch=splits.steps_per_epoch,
                    validation_data=splits.val,
                    epochs=cfg.trainer.epochs,
                    initial_epoch=initial_epoch,
                    shuffle=False,  # the tf.data pipeline shuffles, with the run's seed and the epoch
                    callbacks=callbacks.attach(plan, run, guarded, splits),
                    verbose=cfg.trainer.verbose,
                )
            from pipeline import record  # imported by now, on the thread that opened MLflow's store

            return record.result(plan, run.open(), guarded, history, initial_epoch, splits, callbacks)


# The splits of the last sweep job in this process: {dataset config and seed: Splits}.
_shared_splits: dict[str, Splits] = {}


def loaded_splits(plan: RunPlan) -> Splits:
    """The plan's data. The jobs of a sweep that run in one process (a search's trials
    under the basic launcher) share it: the next job with the same `dataset` config and
    seed gets the same pipelines, read, decoded and traced once (each epoch's order
    comes from the seed and the epoch number, so sharing changes no batch)."""
    from pipeline import augment, data

    cfg = plan.cfg
    augmentation = cfg.get("augment")
    if plan.sweep is None:
        return data.load(cfg.dataset, seed=cfg.seed, augment=augment.from_config(augmentation))
    key = f"{OmegaConf.to_yaml(cfg.dataset)}seed: {cfg.seed}\naugment: {OmegaConf.to_yaml(augmentation or {})}"
    if key not in _shared_splits:
        _shared_splits.clear()  # one dataset in memory at a time
        _shared_splits[key] = data.load(cfg.dataset, seed=cfg.seed, augment=augment.from_config(augmentation))
    return _shared_splits[key]


def compile_guarded(plan: RunPlan, model: keras.Model, splits, guard, strategy) -> GuardedModel:
    """`model` inside a `GuardedModel` (the gradient-norm and finite checks run in its
    train step), compiled as configured, with its metrics and train state built so that
    checkpoints can hold them before `fit`."""
    from pipeline import data
    from pipeline.training import distribute
    from pipeline.training.guarded import GuardedModel

    cfg = plan.cfg
    guarded = GuardedModel(model, guard.step_guard if guard else None, epoch=splits.epoch,
                           steps_per_epoch=splits.steps_per_epoch)
    guarded.compile(
        optimizer=build_optimizer(cfg, splits.steps_per_epoch, guard.lr_scale if guard else None,
                                  plan.choice("optimizer")),
        **compile_args(cfg.architecture),
        steps_per_execution=distribute.steps_per_execution(cfg.trainer.steps_per_execution, strategy),
        jit_compile=cfg.trainer.jit_compile,
    )
    guarded.build_metrics(data.zeros_batch(splits.test))
    guarded.build_train_state()
    return guarded


def build_model(cfg: DictConfig, input_spec: InputSpec, architecture: str | None = None) -> keras.Model:
    """Call the architecture's builder; a model that cannot fit the data is a config error.
    A table's model takes its raw columns: the family's model behind their encoding."""
    from architectures import columns

    architecture = architecture or cfg.architecture._target_.split(".")[-2]
    module = importlib.import_module(cfg.architecture._target_.rpartition(".")[0])
    if input_spec.multimodal and not getattr(module, "MULTIMODAL", False):
        raise ConfigError(
            f"architecture={architecture} takes images only, but dataset={cfg.dataset.name} has image and "
            f"features inputs and labels {[name for name, _ in input_spec.heads]}: use architecture=multi_io"
        )
    if input_spec.tabular and not getattr(module, "TABULAR", False):
        raise ConfigError(f"architecture={architecture} takes images, but dataset={cfg.dataset.name} is a table: "
                          f"use one of {', '.join(tabular_architectures())}")
    builder_args = {k: v for k, v in cfg.architecture.items() if k not in RESERVED_ARCHITECTURE_KEYS}
    try:
        model = hydra.utils.instantiate(builder_args, _partial_=True, _convert_="all")(input_spec)
    except ValueError as error:  # builders explain bad hyperparameters and inputs this way
        raise ConfigError(f"architecture={architecture} with dataset={cfg.dataset.name}: {error}") from None
    return columns.with_column_inputs(model, input_spec) if input_spec.tabular else model


def tabular_architectures() -> list[str]:
    """The `architecture=` options whose builders take a flat feature vector (`TABULAR`)."""
    from importlib.resources import files

    names = []
    for option in sorted(files("conf").joinpath("architecture").iterdir(), key=lambda path: path.name):
        target = OmegaConf.load(str(option)).get("_target_", "") if option.name.endswith(".yaml") else ""
        if target and getattr(importlib.import_module(target.rpartition(".")[0]), "TABULAR", False):
            names.append(option.name.removesuffix(".yaml"))
    return names


def build_optimizer(cfg: DictConfig, steps_per_epoch: int, lr_scale=None,
                    name: str | None = None) -> keras.optimizers.Optimizer:
    """The configured optimizer; a value Keras refuses is a config error, not a traceback."""
    from pipeline.training import optim

    try:
        return optim.build(cfg.optimizer, steps_per_epoch, cfg.trainer.epochs, lr_scale)
    except ValueError as error:
        raise ConfigError(f"optimizer={name or cfg.optimizer._target_}: {error}") from None


def compile_args(architecture: DictConfig) -> dict:
    """Loss, loss weights and metrics: the architecture's `compile` block (per output
    head), else sparse categorical cross-entropy and accuracy for one softmax output."""
    if architecture.get("compile") is None:
        return {"loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]}
    return OmegaConf.to_container(architecture.compile, resolve=True)


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="train")
@cli.task
def main(cfg: DictConfig) -> float:
    run_plan = plan.from_hydra(cfg)
    if run_plan.sweep is not None and run_plan.sweep.finished is not None:  # +sweep.resume: done there
        return run_plan.sweep.finished
    metrics = train(run_plan)
    cfg = run_plan.cfg
    if cfg.optimized_metric not in metrics:
        log.warning("optimized_metric %r was not computed; available: %s", cfg.optimized_metric, sorted(metrics))
    return metrics.get(cfg.optimized_metric, math.nan)


def cli_main() -> None:
    cli.run(main)


if __name__ == "__main__":
    cli_main()
