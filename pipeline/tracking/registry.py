"""The logged model and the model registry: the SavedModel export of a trained model,
its signature and input example, its registration, and the champion alias that follows
the best version on validation.

Keras and TensorFlow are imported only to export: the sweep callback registers a
child's logged model from the launching process, which never trains.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import tempfile
import types
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow.entities import LoggedModelStatus, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import Model, ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema, TensorSpec
from omegaconf import DictConfig, OmegaConf

from pipeline.tracking import model_card

if TYPE_CHECKING:
    import keras
    import pandas as pd
    import tensorflow as tf

    from architectures.common import Column, InputSpec

log = logging.getLogger(__name__)

# How many raw test inputs the logged model keeps as its input example.
EXAMPLE_SIZE = 3


def signature(input_spec: InputSpec) -> ModelSignature:
    """Raw inputs in, float32 probabilities out.

    A single image input is deliberately unnamed: with a named TensorSpec, MLflow 3.17's
    pyfunc passes `{name: array}` to the SavedModel's `serve` endpoint, which then fails.
    Multimodal models take and return dicts, so their specs are named. A table's model
    takes the CSV's columns by name: a column schema, so `predict` takes a DataFrame.
    """
    image = (-1, *input_spec.shape)
    if input_spec.tabular:
        return ModelSignature(
            inputs=Schema([ColSpec("double" if column.dtype == "float32" else "string", column.name)
                           for column in input_spec.columns]),
            outputs=Schema([TensorSpec(np.dtype("float32"), (-1, input_spec.num_classes))]),
        )
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


def example_inputs(test: tf.data.Dataset, input_spec: InputSpec,
                   count: int = EXAMPLE_SIZE) -> np.ndarray | dict[str, np.ndarray] | pd.DataFrame:
    """The first `count` raw inputs of the batched test split, as the model takes them:
    uint8 images `(count, H, W, C)`, a dict of arrays for a multimodal model, or a
    DataFrame of the CSV's columns for a table."""
    import tensorflow as tf

    inputs, _ = next(iter(test.take(1)))
    inputs = tf.nest.map_structure(lambda tensor: tensor[:count].numpy(), inputs)
    return column_frame(inputs, input_spec.columns) if input_spec.tabular else inputs


def column_frame(inputs: Mapping[str, np.ndarray], columns: Sequence[Column]) -> pd.DataFrame:
    """A table's model inputs ({column key: (N, 1)}) as the DataFrame of the CSV's columns
    its logged model takes: float64 numbers, or Python strings (not bytes)."""
    import pandas as pd

    frame = {}
    for column in columns:
        values = np.asarray(inputs[column.key]).reshape(-1)
        frame[column.name] = (np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)
                              if values.dtype.kind in "SOU" else values.astype(np.float64))
    return pd.DataFrame(frame)


def model_metadata(class_names: Sequence[str], label_names: Mapping[str, Sequence[str]] | None = None) -> dict:
    """What the logged model's MLmodel file carries besides its signature: the class
    names in the order of its output columns (`class_names`, per head for a multi-output
    model), read back as `mlflow.pyfunc.load_model(uri).metadata.metadata["class_names"]`."""
    if label_names:
        return {"class_names": {head: list(names) for head, names in label_names.items()}}
    return {"class_names": list(class_names)}


def _save_keras_with_example(path: str, validate_serving_input: bool = True, **kwargs: Any) -> None:
    # mlflow.keras 3.17 writes the input example before it creates the model directory,
    # and fails (mlflow/mlflow#16183): create it first. `validate_serving_input` is for
    # Model.log, not for save_model.
    os.makedirs(path, exist_ok=True)
    mlflow.keras.save_model(path=path, **kwargs)


# `mlflow.keras` as `Model.log` uses a flavor, with the input-example fix above.
KERAS_FLAVOR = types.SimpleNamespace(__name__="mlflow.keras", save_model=_save_keras_with_example)


def log_saved_model(model: keras.Model, input_spec: InputSpec, registered_model_name: str | None = None,
                    input_example: Any = None, metadata: Mapping[str, Any] | None = None) -> ModelInfo:
    """Log `model` as a SavedModel (`serve` endpoint), with `input_example` (a few raw
    inputs: MLflow derives `serving_input_example.json` from it, the body `mlflow models
    predict` and `/invocations` take) and `metadata` (`model_metadata`: the class
    names), and optionally register it.

    Single-input models go through `mlflow.keras` (flavors keras + pyfunc). Multimodal
    models and tables are exported here with a dict-input endpoint and served by
    `pipeline/tracking/serving.py` as a pyfunc model from code. Either way, reloading needs
    TensorFlow and MLflow only.
    """
    import keras
    import tensorflow as tf

    common = {
        "name": "model",
        "signature": signature(input_spec),
        "input_example": input_example,
        "registered_model_name": registered_model_name,
        "metadata": dict(metadata or {}),
        # Explicit requirements: inferring them reloads the model in a subprocess.
        "pip_requirements": [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}",
                             f"mlflow=={mlflow.__version__}"],
    }
    # Keras prints every endpoint and captured variable of an export to stdout; keep
    # that out of the user's terminal and in the debug log.
    with (contextlib.redirect_stdout(io.StringIO()) as export_report, tempfile.TemporaryDirectory() as tmp,
          warnings.catch_warnings()):
        if not (input_spec.multimodal or input_spec.tabular):
            info = Model.log(artifact_path=None, flavor=KERAS_FLAVOR, model=model, save_exported_model=True,
                             **common)
        else:
            if input_spec.tabular:  # {column key: (B, 1)}; serving.py maps the CSV's column names to them
                inputs = {column.key: tf.TensorSpec((None, 1), tf.string if column.dtype == "string" else tf.float32)
                          for column in input_spec.columns}
                model_config = {"columns": {column.name: column.key for column in input_spec.columns}}
            else:
                inputs = {"image": tf.TensorSpec((None, *input_spec.shape), input_spec.dtype),
                          "features": tf.TensorSpec((None, input_spec.features), tf.float32)}
                model_config = {}
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint(name="serve", fn=lambda inputs: model(inputs, training=False),
                                 input_signature=[inputs])
            archive.write_out(f"{tmp}/saved_model")
            # MLflow suggests type hints; the explicit signature already validates inputs.
            warnings.filterwarnings("ignore", message=".*type hints.*")
            info = mlflow.pyfunc.log_model(
                python_model=str(Path(__file__).with_name("serving.py")),
                artifacts={"saved_model": f"{tmp}/saved_model"},
                model_config=model_config,
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
    min_delta: float = 0.0,
) -> tuple[bool, str | None]:
    """Point `alias` at `version` if its `metric` beats the current holder's by more
    than `min_delta` (so noise the size of one validation example does not move it).

    The metric is stored as a tag on every version it is computed for, so the
    comparison needs nothing but the registry. A non-finite value never takes the alias;
    a holder without a finite value is always beaten.

    Returns:
        (promoted, previous): whether the alias moved, and the version it pointed to.
    """
    # Read the alias off the registered model: a missing alias is an error whose code
    # differs between the sqlite store and the REST server.
    previous = client.get_registered_model(name).aliases.get(alias)
    previous = None if previous is None else str(previous)
    if not math.isfinite(value):  # a diverged run never takes the alias
        return False, previous
    client.set_model_version_tag(name, version, metric, repr(float(value)))
    if previous is not None and previous != version:
        current = client.get_model_version(name, previous)
        best = current.tags.get(metric)
        if best is None and current.run_id:  # e.g. a version registered by hand
            best = client.get_run(current.run_id).data.metrics.get(metric)
        if best is not None and math.isfinite(float(best)):
            margin = value - float(best) if greater_is_better else float(best) - value
            if not margin > min_delta:
                return False, previous
    client.set_registered_model_alias(name, alias, version)
    return True, previous


def head_means(metrics: Mapping[str, float], heads: Sequence[str],
               prefixes: Sequence[str] = ("final_val_", "test_")) -> dict[str, float]:
    """`final_val_accuracy` and `test_accuracy` of a multi-output model: the mean of its
    heads' (`final_val_binary_accuracy`, ...), so that the default champion metric and
    optimized metric exist for it too. Empty for a single-output model."""
    means = {}
    for prefix in prefixes:
        per_head = [metrics.get(f"{prefix}{head}_accuracy") for head in heads]
        if len(heads) > 1 and f"{prefix}accuracy" not in metrics and None not in per_head:
            means[f"{prefix}accuracy"] = float(np.mean(per_head))
    return means


def logged_model_of(client: MlflowClient, run: Run) -> str | None:
    """The id of the model `run` has already logged (before a kill, when a resume
    continues it), or None. One left unfinished by the kill is deleted: it is logged again."""
    found = None
    for model in client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run.info.run_id}'"):
        if model.status == LoggedModelStatus.READY and found is None:
            found = model.model_id
        else:
            client.delete_logged_model(model.model_id)
    return found


def register(client: MlflowClient, cfg: DictConfig, name: str, model_id: str, run_id: str,
             metrics: Mapping[str, float]) -> ModelVersion:
    """Register the logged model `model_id` of run `run_id` as a new version of `name`
    (or take the version the run registered before a kill),
    write its model card (`model_card`), and move the champion alias (`cfg` is the run's
    `mlflow` group) to it if its `cfg.champion_metric` in `metrics` beats the champion's by
    more than `cfg.champion_min_delta`. The run is tagged with the version and the outcome.
    """
    try:
        client.create_registered_model(name)
    except mlflow.MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # A resumed run that was killed after registering keeps its version: one per run.
    registered = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    model_version = registered[0] if registered else client.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id)
    version = str(model_version.version)
    model_card.describe(client, name, version)
    alias, metric = cfg.champion_alias, cfg.champion_metric
    if metric not in metrics:
        log.warning("@%s not moved: mlflow.champion_metric=%s was not computed; available: %s",
                    alias, metric, ", ".join(sorted(metrics)))
        outcome = f"skipped: no metric {metric}"
    else:
        promoted, previous = promote_if_better(client, name, version, alias, metric, metrics[metric],
                                               greater_is_better=cfg.champion_mode == "max",
                                               min_delta=cfg.get("champion_min_delta", 0.0))
        outcome = str(promoted).lower()
        log.info("registered models:/%s/%s; @%s %s (previous: %s)", name, version, alias,
                 "moved to it" if promoted else "stays", previous or "none")
    for key, value in {"registered_model": f"{name}/{version}", f"{alias}_promoted": outcome}.items():
        client.set_tag(run_id, key, value)
    return model_version


def register_run(client: MlflowClient, run_id: str) -> str:
    """Register the model that run `run_id` logged (e.g. a sweep's best job), under the
    name and champion rules of the run's own recorded config (`config.yaml`).

    Returns:
        `NAME/VERSION`, or "" if the run logged no model.
    """
    from pipeline.tracking import registered_model_name

    run = client.get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs else []
    if not outputs:
        return ""
    model_id = max(outputs, key=lambda output: output.step).model_id
    with tempfile.TemporaryDirectory() as tmp:
        cfg = OmegaConf.load(client.download_artifacts(run_id, "config.yaml", tmp))
    name = registered_model_name(cfg, run.data.tags.get("architecture", ""))
    version = register(client, cfg.mlflow, name, model_id, run_id, run.data.metrics)
    return f"{name}/{version.version}"
