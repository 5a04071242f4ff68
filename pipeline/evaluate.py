"""Score any MLflow model on a dataset split, with none of the training code involved.

    python -m pipeline.evaluate model=models:/digits-mlp@champion
    python -m pipeline.evaluate model=models:/digits-mlp/3 split='train[:10%]'

The model is loaded through `mlflow.pyfunc`, exactly as a serving process would load
it, and receives the split's raw images.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import cli, config  # noqa: F401  (config registers the schemas Hydra composes with)
from pipeline.errors import ConfigError, DatasetError, PipelineError

log = logging.getLogger("pipeline.evaluate")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Accuracy and cross-entropy of `cfg.model` on `cfg.dataset.name[cfg.split]`, per label.

    Args:
        cfg: the composed `conf/evaluate.yaml`.

    Returns:
        {"accuracy", "loss", "examples"}; for a multi-label dataset, `<head>_accuracy`
        and `<head>_loss` per label instead of the first two.
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

    # Accumulate per head: a single-label dataset has one unnamed head.
    correct: dict[str, float] = {}
    log_loss: dict[str, float] = {}
    examples = 0
    for inputs, labels in tfds.as_numpy(split.batch(cfg.dataset.batch_size)):
        outputs = model.predict(inputs)
        if not isinstance(outputs, dict):
            outputs, labels = {"": outputs}, {"": labels}
        for head, probabilities in outputs.items():
            hits, nll = _score(np.asarray(probabilities, dtype=np.float64), labels[head])
            correct[head] = correct.get(head, 0.0) + hits
            log_loss[head] = log_loss.get(head, 0.0) + nll
        examples += len(next(iter(labels.values())))
    if not examples:
        raise DatasetError(f"split: {cfg.dataset.name}[{cfg.split}] is empty")

    metrics = {"examples": float(examples)}
    for head in correct:
        prefix = f"{head}_" if head else ""
        metrics[f"{prefix}accuracy"] = correct[head] / examples
        metrics[f"{prefix}loss"] = log_loss[head] / examples
    summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "examples")
    print(f"{cfg.model} on {cfg.dataset.name}[{cfg.split}] ({examples} examples): {summary}", flush=True)
    return metrics


def _score(probabilities, labels) -> tuple[float, float]:
    """(number correct, summed cross-entropy) of one head: a 1-unit sigmoid or a softmax."""
    import numpy as np

    labels = np.asarray(labels).reshape(-1)
    if probabilities.shape[-1] == 1:
        p = probabilities[:, 0]
        predicted, picked = (p > 0.5).astype(labels.dtype), np.where(labels == 1, p, 1.0 - p)
    else:
        predicted, picked = probabilities.argmax(axis=1), probabilities[np.arange(len(labels)), labels]
    return float(np.sum(predicted == labels)), float(-np.sum(np.log(np.clip(picked, 1e-12, 1.0))))


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="evaluate")
@cli.task
def main(cfg: DictConfig) -> dict[str, float]:
    return evaluate(cfg)


def cli_main() -> None:
    cli.run(main)


if __name__ == "__main__":
    cli_main()
