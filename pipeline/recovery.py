"""What an earlier run recorded, recovered for a new invocation: `resume=RUN_ID|last`
continues an unfinished run with the config it recorded, `reproduce=RUN_ID` trains a
recorded config again as a new run. Needs the tracking store, not TensorFlow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import ConfigError
from pipeline.redact import redact

# What a resume or reproduction may change: which run, where the store is, determinism,
# how it is distributed (e.g. resume a multi-worker run on one device), where the data
# lies (a TFDS dataset is its name and version, which the code pins: another directory
# holds the same data) and (a resume, only upwards) the epochs.
KEPT_CONFIG_OVERRIDES = ("resume=", "reproduce=", "trainer.epochs=", "mlflow.tracking_uri=",
                         "mlflow.experiment_name=", "determinism=", "distribution=", "distribution.", "hydra.",
                         "dataset.data_dir=")


@dataclass(frozen=True)
class Resume:
    """The unfinished run a plan continues, and where its checkpoints are.

    `run_id` is None on a non-chief worker: it trains from the chief's checkpoints but
    records into a throwaway store, so it opens a run of its own there."""

    run_id: str | None
    checkpoint_dir: Path


def resumed(cfg: DictConfig, overrides: Sequence[str]) -> tuple[Resume, DictConfig, str]:
    """The run `cfg.resume` names (a run id, or `last`: the newest unfinished run with
    checkpoints in `cfg.mlflow.experiment_name`), the config it recorded, and its
    architecture. Only `trainer.epochs` may differ from the recorded config, and only upwards.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    _refuse_changes(f"resume={cfg.resume}", "a resumed run keeps its recorded config; only trainer.epochs may "
                    "be raised (and dataset.data_dir name where its data lies now)", overrides)
    experiment_id = tracking.connect(cfg.mlflow)
    if cfg.resume == "last":
        runs = MlflowClient().search_runs([experiment_id],
                                          "attributes.status != 'FINISHED' and tags.checkpoint_dir != ''",
                                          order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise ConfigError(f"resume=last: no unfinished run with checkpoints in experiment "
                              f"{cfg.mlflow.experiment_name!r} at {redact(mlflow.get_tracking_uri())}")
        run = runs[0]
    else:
        run = _get_run("resume", cfg.resume)
    run_id = run.info.run_id
    checkpoint_dir = run.data.tags.get("checkpoint_dir")
    if not checkpoint_dir:
        raise ConfigError(f"resume={cfg.resume}: run {run_id} saved no checkpoints (callbacks.checkpoint was off)")
    recorded = _recorded_config("resume", cfg, run_id, overrides)
    if any(o.startswith("trainer.epochs=") for o in overrides):
        if cfg.trainer.epochs < recorded.trainer.epochs:
            raise ConfigError(f"resume={cfg.resume}: trainer.epochs may only be raised (the run was configured "
                              f"for {recorded.trainer.epochs}). Received: {cfg.trainer.epochs}")
        recorded.trainer.epochs = cfg.trainer.epochs
    return Resume(run_id, Path(checkpoint_dir)), recorded, run.data.tags.get("architecture", "")


def reproduced(cfg: DictConfig, overrides: Sequence[str]) -> tuple[DictConfig, str]:
    """The config run `cfg.reproduce` recorded, to train again as a new run; and that
    run's architecture name."""
    from pipeline import tracking

    _refuse_changes(f"reproduce={cfg.reproduce}", "a reproduction uses the run's recorded config", overrides)
    tracking.connect(cfg.mlflow)
    run = _get_run("reproduce", cfg.reproduce)
    return _recorded_config("reproduce", cfg, run.info.run_id, overrides), run.data.tags.get("architecture", "")


def _refuse_changes(what: str, why: str, overrides: Sequence[str]) -> None:
    changed = [o for o in overrides if not o.lstrip("+~").startswith(KEPT_CONFIG_OVERRIDES)]
    if changed:
        raise ConfigError(f"{what}: {why}. Received: {' '.join(changed)}")


def _get_run(key: str, run_id: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_run(str(run_id))
    except Exception:  # unknown id, malformed id: MLflow raises several types
        raise ConfigError(f"{key}: no run {run_id!r} in the tracking store at "
                          f"{redact(mlflow.get_tracking_uri())}") from None


def _recorded_config(key: str, cfg: DictConfig, run_id: str, overrides: Sequence[str]) -> DictConfig:
    """`config.yaml` of run `run_id`, with this invocation's store, determinism and
    distribution, and its `dataset.data_dir` where `overrides` set one."""
    import mlflow

    try:
        recorded = OmegaConf.create(mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml"))
    except Exception as error:
        raise ConfigError(f"{key}={cfg[key]}: cannot read the config run {run_id} recorded: {error}") from None
    recorded.resume = None
    recorded.reproduce = None
    recorded.determinism = cfg.determinism
    recorded.mlflow.tracking_uri = cfg.mlflow.tracking_uri
    if cfg.get("distribution") is not None:  # how to run it, not what to train: this invocation's
        recorded.distribution = cfg.distribution
    if any(o.lstrip("+~").startswith("dataset.data_dir=") for o in overrides):
        recorded.dataset.data_dir = cfg.dataset.data_dir
    return recorded
