"""Score any MLflow model on a dataset split, with none of the training code involved.

    python -m pipeline.evaluate model=models:/digits-mlp@champion
    python -m pipeline.evaluate model=models:/digits-mlp/3 split='train[:10%]'

The model is loaded through `mlflow.pyfunc`, exactly as a serving process would load
it, and receives the split's raw images.
"""

from __future__ import annotations

import logging
import os

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import cli, config  # noqa: F401  (config registers the schemas Hydra composes with)
from pipeline.errors import ConfigError, DatasetError, PipelineError

# TensorFlow's C++ INFO lines (CUDA probing, CPU features) are noise for users; keep warnings.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
log = logging.getLogger("pipeline.evaluate")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Accuracy and cross-entropy of `cfg.model` on `cfg.dataset.name[cfg.split]`.

    Args:
        cfg: the composed `conf/evaluate.yaml`.

    Returns:
        {"accuracy": ..., "loss": ..., "examples": ...}
    """
    if OmegaConf.is_missing(cfg, "model") or not cfg.model.strip():
        raise ConfigError("model is missing: give an MLflow model URI, e.g. model=models:/digits-mlp@champion")
    import mlflow
    import numpy as np
    import tensorflow_datasets as tfds

    from pipeline import data, tracking

    mlflow.set_tracking_uri(tracking.tracking_uri(cfg.mlflow.tracking_uri))
    try:
        model = mlflow.pyfunc.load_model(cfg.model)
    except Exception as error:  # unknown name/alias/run, unreadable artifacts, bad URI
        reason = " ".join(str(error).split())[:300]
        raise PipelineError(f"model: cannot load {cfg.model!r}: {reason}") from None

    builder = data.prepared_builder(cfg.dataset)
    try:
        split = builder.as_dataset(split=cfg.split, as_supervised=True, shuffle_files=False)
    except Exception as error:  # TFDS raises several types for a bad split expression
        raise DatasetError(f"split: {cfg.split!r} is not a split of {cfg.dataset.name!r}: {error}") from None

    probabilities, labels = [], []
    for images, batch_labels in tfds.as_numpy(split.batch(cfg.dataset.batch_size)):
        probabilities.append(np.asarray(model.predict(images), dtype=np.float64))
        labels.append(batch_labels)
    if not labels:
        raise DatasetError(f"split: {cfg.dataset.name}[{cfg.split}] is empty")
    probabilities, labels = np.concatenate(probabilities), np.concatenate(labels)

    picked = np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, 1.0)
    metrics = {
        "accuracy": float(np.mean(probabilities.argmax(axis=1) == labels)),
        "loss": float(-np.mean(np.log(picked))),
        "examples": float(len(labels)),
    }
    print(
        f"{cfg.model} on {cfg.dataset.name}[{cfg.split}] ({len(labels)} examples): "
        f"accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}",
        flush=True,
    )
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="evaluate")
@cli.task
def main(cfg: DictConfig) -> float:
    return evaluate(cfg)["accuracy"]


def cli_main() -> None:
    cli.run(main)


if __name__ == "__main__":
    cli_main()
