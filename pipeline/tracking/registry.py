"""The logged model and the model registry: the SavedModel export of a trained model,
its signature, and the champion alias that follows the best version.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import keras
import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from omegaconf import DictConfig

from architectures.common import InputSpec

log = logging.getLogger(__name__)


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
    `pipeline/tracking/serving.py` as a pyfunc model from code. Either way, reloading needs
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
