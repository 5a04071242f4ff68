"""Everything the pipeline writes to MLflow, and the one place a run is opened and closed.

The tracking URI is `mlflow.tracking_uri` if set, else `$MLFLOW_TRACKING_URI`, else a
sqlite store `mlflow.db` in the launch directory (MLflow's own default, no server
needed; artifacts go to `./mlruns`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import secrets
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from omegaconf import DictConfig, OmegaConf

from architectures.common import InputSpec
from pipeline import sweep
from pipeline.errors import ConfigError, PipelineError, TrainingInterrupted, one_line

log = logging.getLogger(__name__)

# MLflow refuses longer parameter values.
MAX_PARAM_LENGTH = 6000


def tracking_uri(configured: str | None) -> str:
    """The configured URI, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/mlflow.db`."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{os.path.abspath('mlflow.db')}"


def connect(cfg: DictConfig) -> str:
    """Point MLflow at the configured store (`cfg` is the `mlflow` group) and return the
    experiment id, creating the experiment if needed.

    Called before any training, so an unreachable server costs seconds, not a trained
    model: MLflow's own HTTP retries would take minutes to give up.
    """
    uri = tracking_uri(cfg.tracking_uri)
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=10).raise_for_status()
        except requests.RequestException as error:
            raise PipelineError(
                f"mlflow.tracking_uri: cannot reach the tracking server at {uri} "
                f"({type(error).__name__}). Start it, or unset MLFLOW_TRACKING_URI to use "
                "the local sqlite store"
            ) from None
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.set_experiment(cfg.experiment_name).experiment_id
    except Exception as error:  # bad path, unwritable directory, corrupt database, ...
        reason = one_line(error)
        raise PipelineError(f"mlflow.tracking_uri: cannot open the MLflow store at {uri}: {reason}") from None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"optimizer": {"lr": 0.001}} -> {"optimizer.lr": "0.001"}; lists stay whole."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


@dataclass(frozen=True)
class RunNames:
    """How a training run and its registered model are named and tagged."""

    run: str
    model: str
    tags: dict[str, str]

    @classmethod
    def from_config(cls, cfg: DictConfig, choices: Mapping[str, str], precision: str) -> RunNames:
        """`precision` is the resolved dtype policy (e.g. mixed_bfloat16 for "mixed").

        The default run name is `{architecture}-{dataset}-{precision}-{6 hex digits}`
        (e.g. `mlp-digits-float32-3fa91c`): what ran, at a glance, and distinct between
        the runs of a sweep. The run's description (`mlflow.note.content`) says what was
        trained on what, with which optimizer, rate and epochs.
        """
        # Under Hydra the group choice ("mlp") names the architecture; without it, the
        # builder's module does (architectures.mlp.build -> "mlp").
        architecture = choices.get("architecture") or cfg.architecture._target_.split(".")[-2]
        dataset = cfg.dataset.name
        return cls(
            run=cfg.mlflow.run_name or f"{architecture}-{dataset}-{precision}-{secrets.token_hex(3)}",
            model=cfg.mlflow.registered_model_name or f"{dataset}-{architecture}",
            tags={"architecture": architecture, "dataset": dataset, "precision": precision,
                  "mlflow.note.content": run_description(cfg, choices, architecture, precision)},
        )


@contextlib.contextmanager
def start_run(
    experiment_id: str,
    run_name: str,
    tags: Mapping[str, str],
    log_file: Path | None = None,
    run_id: str | None = None,
    log_system_metrics: bool | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open the training run (or reopen run `run_id`, to resume it) and always close it.

    The run ends FINISHED on success, KILLED on Ctrl-C or SIGTERM, and FAILED on any
    other error, with the reason in the `failure_reason` tag, so no run is ever left
    RUNNING for the next job of a sweep. `log_file` (the job's log) is attached to the
    run either way. `log_system_metrics` goes to `mlflow.start_run` (None: MLflow's
    `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING` decides; see `provenance.enable_system_metrics`).
    """
    if run_id is None:
        sweep_job = sweep.current_job()
        if sweep_job is not None:  # a job of a Hydra sweep: a child of its parent run, named by its overrides
            run_name = sweep_job["run_name"]
            tags = {**tags, **sweep_job["tags"], "mlflow.parentRunId": sweep_job["parent_run_id"]}
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=dict(tags),
                               log_system_metrics=log_system_metrics)
    else:
        run = mlflow.start_run(run_id=run_id, log_system_metrics=log_system_metrics)
        if "failure_reason" in run.data.tags:  # the reason the previous attempt ended
            MlflowClient().delete_tag(run_id, "failure_reason")
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except (KeyboardInterrupt, TrainingInterrupted) as error:
        status = "KILLED"
        _tag_failure(run.info.run_id, str(error) or "interrupted (KeyboardInterrupt)")
        raise
    except BaseException as error:
        _tag_failure(run.info.run_id, f"{type(error).__name__}: {error}")
        raise
    finally:
        if log_file is not None and log_file.is_file():
            try:
                mlflow.log_artifact(str(log_file))
            except Exception:  # a lost log must not hide the run's real outcome
                log.exception("could not attach %s to run %s", log_file, run.info.run_id)
        try:
            mlflow.end_run(status)  # leaves no active run even when the store does not answer
        except Exception:
            log.exception("could not mark run %s %s in the MLflow store", run.info.run_id, status)


@dataclass(frozen=True)
class Resume:
    """A run to continue: its id, recorded config and checkpoint directory."""

    run_id: str
    config: DictConfig
    checkpoint_dir: str
    architecture: str


# What a resume or reproduction may change: which run, where the store is, determinism,
# how it is distributed (e.g. resume a multi-worker run on one device) and (a resume,
# only upwards) the epochs.
KEPT_CONFIG_OVERRIDES = ("resume=", "reproduce=", "trainer.epochs=", "mlflow.tracking_uri=",
                         "mlflow.experiment_name=", "determinism=", "distribution=", "distribution.", "hydra.")


def resumable_run(cfg: DictConfig, overrides: list[str]) -> Resume:
    """Find the run `cfg.resume` names (a run id, or `last`: the newest unfinished run
    with checkpoints in `cfg.mlflow.experiment_name`) and the config it recorded.

    Only `trainer.epochs` may differ from the recorded config, and only upwards.
    """
    _refuse_changes(f"resume={cfg.resume}", "a resumed run keeps its recorded config; only trainer.epochs may "
                    "be raised", overrides)
    experiment_id = connect(cfg.mlflow)
    client = MlflowClient()
    if cfg.resume == "last":
        runs = client.search_runs([experiment_id], "attributes.status != 'FINISHED' and tags.checkpoint_dir != ''",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise ConfigError(f"resume=last: no unfinished run with checkpoints in experiment "
                              f"{cfg.mlflow.experiment_name!r} at {mlflow.get_tracking_uri()}")
        run = runs[0]
    else:
        run = _get_run("resume", cfg.resume)
    run_id = run.info.run_id
    checkpoint_dir = run.data.tags.get("checkpoint_dir")
    if not checkpoint_dir:
        raise ConfigError(f"resume={cfg.resume}: run {run_id} saved no checkpoints (callbacks.checkpoint was off)")
    recorded = recorded_config("resume", cfg, run_id)
    epochs = recorded.trainer.epochs
    if any(o.startswith("trainer.epochs=") for o in overrides):
        if cfg.trainer.epochs < epochs:
            raise ConfigError(f"resume={cfg.resume}: trainer.epochs may only be raised (the run was configured "
                              f"for {epochs}). Received: {cfg.trainer.epochs}")
        epochs = cfg.trainer.epochs
    recorded.trainer.epochs = epochs
    return Resume(run_id, recorded, checkpoint_dir, run.data.tags.get("architecture", ""))


def reproduced_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, str]:
    """The config run `cfg.reproduce` recorded, to train again as a new run; and that
    run's architecture name."""
    _refuse_changes(f"reproduce={cfg.reproduce}", "a reproduction uses the run's recorded config", overrides)
    connect(cfg.mlflow)
    run = _get_run("reproduce", cfg.reproduce)
    return recorded_config("reproduce", cfg, run.info.run_id), run.data.tags.get("architecture", "")


def _refuse_changes(what: str, why: str, overrides: list[str]) -> None:
    changed = [o for o in overrides if not o.lstrip("+~").startswith(KEPT_CONFIG_OVERRIDES)]
    if changed:
        raise ConfigError(f"{what}: {why}. Received: {' '.join(changed)}")


def _get_run(key: str, run_id: str):
    try:
        return MlflowClient().get_run(str(run_id))
    except Exception:  # unknown id, malformed id: MLflow raises several types
        raise ConfigError(f"{key}: no run {run_id!r} in the tracking store at {mlflow.get_tracking_uri()}") from None


def recorded_config(key: str, cfg: DictConfig, run_id: str) -> DictConfig:
    """`config.yaml` of run `run_id`, with this invocation's store and determinism."""
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
    return recorded


def _tag_failure(run_id: str, reason: str) -> None:
    try:
        MlflowClient().set_tag(run_id, "failure_reason", one_line(reason, 5000))
    except Exception:  # the store may be the thing that failed; the status still gets set
        log.exception("could not record the failure reason on run %s", run_id)


def log_config(cfg: DictConfig, overrides: list[str]) -> None:
    """The resolved config as flattened params and as `config.yaml`; overrides as a tag."""
    container = OmegaConf.to_container(cfg, resolve=True)
    mlflow.log_params(flatten(container))
    mlflow.set_tag("overrides", " ".join(overrides) if overrides else "(defaults)")
    mlflow.set_tag("command", " ".join([os.path.basename(sys.executable), *sys.argv]))
    mlflow.log_text(OmegaConf.to_yaml(container), "config.yaml")


def log_dataset(name: str, version: str, sizes: Mapping[str, int]) -> None:
    """What the run trained on: TFDS version and the size of each split."""
    mlflow.log_params({"data.version": f"{name}:{version}"} | {f"data.{role}_examples": n for role, n in sizes.items()})


def log_model_summary(model: keras.Model) -> None:
    """`model_summary.txt` and the parameter count as the `model.parameters` param."""
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line), line_length=110)
    mlflow.log_text("\n".join(lines), "model_summary.txt")
    mlflow.log_param("model.parameters", model.count_params())


def signature(input_spec: InputSpec) -> ModelSignature:
    """Raw images in, float32 probabilities out.

    A single image input is deliberately unnamed: with a named TensorSpec, MLflow 3.17's
    pyfunc passes `{name: array}` to the SavedModel's `serve` endpoint, which then fails.
    Multimodal models take and return dicts, so their specs are named.
    """
    image = (-1, *input_spec.shape)
    if not input_spec.multimodal:
        return ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(input_spec.dtype), image)]),
            outputs=Schema([TensorSpec(np.dtype("float32"), (-1, input_spec.num_classes))]),
        )
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(input_spec.dtype), image, "image"),
                       TensorSpec(np.dtype("float32"), (-1, input_spec.features), "features")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, 1 if classes == 2 else classes), name)
                        for name, classes in input_spec.heads]),
    )


def log_saved_model(model: keras.Model, input_spec: InputSpec, registered_model_name: str | None) -> ModelInfo:
    """Log `model` as a SavedModel (`serve` endpoint) and optionally register it.

    Single-input models go through `mlflow.keras` (flavors keras + pyfunc). Multimodal
    models are exported here with a dict-input endpoint and served by
    `pipeline/serving.py` as a pyfunc model from code. Either way, reloading needs
    TensorFlow and MLflow only.

    No `input_example`: mlflow.keras 3.17 writes it before creating the model directory
    and fails (mlflow/mlflow#16183); the signature carries the shapes and dtypes.
    """
    import tensorflow as tf

    common = {
        "name": "model",
        "signature": signature(input_spec),
        "registered_model_name": registered_model_name,
        # Explicit requirements: inferring them reloads the model in a subprocess.
        "pip_requirements": [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}",
                             f"mlflow=={mlflow.__version__}"],
    }
    # Keras prints every endpoint and captured variable of an export to stdout; keep
    # that out of the user's terminal and in the debug log.
    with (contextlib.redirect_stdout(io.StringIO()) as export_report, tempfile.TemporaryDirectory() as tmp,
          warnings.catch_warnings()):
        if not input_spec.multimodal:
            info = mlflow.keras.log_model(model, save_exported_model=True, **common)
        else:
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint(
                name="serve",
                fn=lambda inputs: model(inputs, training=False),
                input_signature=[{
                    "image": tf.TensorSpec((None, *input_spec.shape), input_spec.dtype),
                    "features": tf.TensorSpec((None, input_spec.features), tf.float32),
                }],
            )
            archive.write_out(f"{tmp}/saved_model")
            # MLflow suggests type hints and an input example; the explicit tensor
            # signature already validates inputs, and the example is mlflow#16183 above.
            warnings.filterwarnings("ignore", message=".*(type hints|input example was not provided).*")
            info = mlflow.pyfunc.log_model(
                python_model=str(Path(__file__).with_name("serving.py")),
                artifacts={"saved_model": f"{tmp}/saved_model"},
                **common,
            )
    log.debug("SavedModel export: %s", export_report.getvalue())
    return info


def promote_if_better(
    client: MlflowClient,
    name: str,
    version: str,
    alias: str,
    metric: str,
    value: float,
    greater_is_better: bool = True,
) -> tuple[bool, str | None]:
    """Point `alias` at `version` if its `metric` beats the current holder's.

    The metric is stored as a tag on every version it is computed for, so the
    comparison needs nothing but the registry.

    Returns:
        (promoted, previous): whether the alias moved, and the version it pointed to.
    """
    if not math.isfinite(value):  # a diverged run never takes the alias
        return False, None
    client.set_model_version_tag(name, version, metric, repr(float(value)))
    # Read the alias off the registered model: a missing alias is an error whose code
    # differs between the sqlite store and the REST server.
    previous = client.get_registered_model(name).aliases.get(alias)
    if previous is not None and str(previous) != version:
        current = client.get_model_version(name, str(previous))
        best = current.tags.get(metric)
        if best is None and current.run_id:  # e.g. a version registered by hand
            best = client.get_run(current.run_id).data.metrics.get(metric)
        if best is not None and math.isfinite(float(best)):  # a non-finite holder is always beaten
            better = value > float(best) if greater_is_better else value < float(best)
            if not better:
                return False, str(previous)
    client.set_registered_model_alias(name, alias, version)
    return True, None if previous is None else str(previous)


def register_champion(cfg: DictConfig, name: str, model_info: ModelInfo, metrics: Mapping[str, float]) -> bool:
    """Move the champion alias (`cfg` is the `mlflow` group) to version
    `model_info.registered_model_version` of `name` if it beats the current champion;
    tag the active run with the outcome."""
    version = str(model_info.registered_model_version)
    if cfg.champion_metric not in metrics:
        log.warning("@%s not moved: mlflow.champion_metric=%s was not computed; available: %s",
                    cfg.champion_alias, cfg.champion_metric, ", ".join(sorted(metrics)))
        mlflow.set_tags({"registered_model": f"{name}/{version}",
                         f"{cfg.champion_alias}_promoted": f"skipped: no metric {cfg.champion_metric}"})
        return False
    promoted, previous = promote_if_better(
        MlflowClient(), name, version, cfg.champion_alias, cfg.champion_metric,
        metrics[cfg.champion_metric], greater_is_better=cfg.champion_mode == "max",
    )
    mlflow.set_tags({"registered_model": f"{name}/{version}", f"{cfg.champion_alias}_promoted": str(promoted).lower()})
    log.info("registered models:/%s/%s; @%s %s (previous: %s)", name, version, cfg.champion_alias,
             "moved to it" if promoted else "stays", previous or "none")
    return promoted


def run_description(cfg: DictConfig, choices: Mapping[str, str], architecture: str, precision: str) -> str:
    """Two lines for the run page's description (`mlflow.note.content`, Markdown:
    a blank line between them, so they stay two lines), e.g.

        mlp trained on digits (batch 128) in float32.
        adam, lr 0.001 (cosine schedule, 1 warmup epoch), up to 20 epochs, seed 0.
    """
    optimizer = choices.get("optimizer") or str(cfg.optimizer._target_).rsplit(".", 1)[-1]
    schedule = cfg.optimizer.get("schedule", "constant")
    warmup = cfg.optimizer.get("warmup_epochs", 0) or 0
    detail = f"{schedule} schedule" + (f", {warmup} warmup epoch{'s' if warmup != 1 else ''}" if warmup else "")
    return (f"{architecture} trained on {cfg.dataset.name} (batch {cfg.dataset.batch_size}) in {precision}.\n\n"
            f"{optimizer}, lr {cfg.optimizer.lr:g} ({detail}), up to {cfg.trainer.epochs} epochs, seed {cfg.seed}.")
