"""Score any MLflow model on a dataset split, with none of the training code involved.

    python -m pipeline.evaluate model=models:/digits-mlp@champion
    python -m pipeline.evaluate model=models:/digits-mlp/3 "split='train[:10%]'"   # Hydra needs the inner quotes

The model is loaded through `mlflow.pyfunc`, exactly as a serving process would load
it, and receives the split's raw images. Unless `log_run=false`, the evaluation is
recorded as its own MLflow run (`eval-<model>-<split>`, tag `evaluation=true`) with the
metrics, a confusion matrix per output head, and a link to the evaluated model: MLflow
3 lists the metrics on that LoggedModel and the model among the run's inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import cli, config, quiet  # noqa: F401  (config registers the schemas Hydra composes with)
from pipeline.errors import ConfigError, DatasetError, PipelineError, one_line
from pipeline.redact import redact

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger("pipeline.evaluate")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Accuracy and cross-entropy of `cfg.model` on `cfg.dataset.name[cfg.split]`, per label.

    Args:
        cfg: the composed `conf/evaluate.yaml`.

    Returns:
        {"accuracy", "loss", "examples"}; for a multi-label dataset, `<head>_accuracy`
        and `<head>_loss` per label instead of the first two. The same values are
        logged to the evaluation run when `cfg.log_run` is true.
    """
    if OmegaConf.is_missing(cfg, "model") or not cfg.model.strip():
        raise ConfigError("model is missing: give an MLflow model URI, e.g. model=models:/digits-mlp@champion")
    quiet.import_tensorflow()  # loading the model imports it: without its CUDA probing on a CPU-only machine
    import mlflow
    import numpy as np
    import tensorflow_datasets as tfds

    from pipeline import data, input_specs, store_uri
    from pipeline.tracking import registry

    mlflow.set_tracking_uri(store_uri.tracking_uri_exporting_credentials(cfg.mlflow.tracking_uri))
    try:
        model = mlflow.pyfunc.load_model(cfg.model)
    except Exception as error:  # unknown name/alias/run, unreadable artifacts, bad URI
        reason = one_line(error)
        raise PipelineError(f"model: cannot load {cfg.model!r}: {reason}") from None

    split, examples = data.split(cfg.dataset, cfg.split)
    columns = examples.input_spec.columns if examples is not None else ()
    input_specs.require_fit(input_specs.of_signature(model.metadata.get_input_schema()),
                            input_specs.of_dataset(split.element_spec), cfg.model, cfg.dataset.name, "evaluate it")

    # Accumulate per head: a single-label dataset has one unnamed head.
    log_loss: dict[str, float] = {}
    true_classes: dict[str, list] = {}
    predicted_classes: dict[str, list] = {}
    num_classes: dict[str, int] = {}
    for inputs, labels in tfds.as_numpy(split.batch(cfg.dataset.batch_size)):
        if columns:  # a table's model takes a DataFrame of the CSV's columns
            inputs = registry.column_frame(inputs, columns)
        outputs = model.predict(inputs)
        if not isinstance(outputs, dict):
            outputs, labels = {"": outputs}, {"": labels}
        for head, probabilities in outputs.items():
            probabilities = np.asarray(probabilities, dtype=np.float64)
            truth = np.asarray(labels[head]).reshape(-1)
            predicted, nll = _score(probabilities, truth)
            log_loss[head] = log_loss.get(head, 0.0) + nll
            true_classes.setdefault(head, []).append(truth)
            predicted_classes.setdefault(head, []).append(predicted)
            num_classes[head] = max(probabilities.shape[-1], 2)  # a 1-unit sigmoid head has 2 classes
    confusions = {head: (np.concatenate(true_classes[head]), np.concatenate(predicted_classes[head]),
                         num_classes[head]) for head in true_classes}
    examples = len(next(iter(confusions.values()))[0]) if confusions else 0
    if not examples:
        raise DatasetError(f"split: {cfg.dataset.name}[{cfg.split}] is empty")

    metrics = {"examples": float(examples)}
    for head, (truth, predicted, _) in confusions.items():
        prefix = f"{head}_" if head else ""
        metrics[f"{prefix}accuracy"] = float(np.sum(predicted == truth)) / examples
        metrics[f"{prefix}loss"] = log_loss[head] / examples
    summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "examples")
    print(f"{cfg.model} on {cfg.dataset.name}[{cfg.split}] ({examples} examples): {summary}", flush=True)
    if cfg.log_run:
        run_id = log_evaluation_run(cfg, _model_id(model, cfg.model), metrics, confusions, class_names_of(model))
        store = redact(mlflow.get_tracking_uri())
        print(f"logged as run {run_id} in experiment {cfg.mlflow.experiment_name!r} at {store}",
              flush=True)
    return metrics


def log_evaluation_run(
    cfg: DictConfig,
    model_id: str | None,
    metrics: Mapping[str, float],
    confusions: Mapping[str, tuple[Any, Any, int]],
    class_names: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """Record one evaluation as its own MLflow run, linked to the evaluated model.

    The run goes to experiment `cfg.mlflow.experiment_name` (the dataset's, by default:
    next to the training runs), named `eval-<model reference>-<split>`, with tags
    `evaluation=true`, `model_uri`, `dataset` (and `model_id`, and `registered_model`
    NAME/VERSION when the URI names a registry version or alias, which may move
    later), params `dataset` and `split`, and `metrics`. The metrics are logged with
    the LoggedModel's `model_id`: MLflow then also records the model as an input of
    the run and shows the metrics on the model's page.

    Args:
        cfg: the composed `conf/evaluate.yaml`.
        model_id: the evaluated LoggedModel's id; None logs the run unlinked.
        metrics: name -> value, e.g. {"accuracy": 0.97, "loss": 0.1, "examples": 360.0}.
        confusions: head name ("" for a single-output model) -> (true classes,
            predicted classes, number of classes); one `confusion_matrix[_<head>].png`
            artifact each.
        class_names: head -> its classes' names, for the matrices' axes (`class_names_of`).

    Returns:
        The evaluation run's id.
    """
    import mlflow

    from pipeline import tracking
    from pipeline.figures import plots

    class_names = class_names or {}
    experiment_id = tracking.connect(cfg.mlflow)
    tags = {"evaluation": "true", "model_uri": cfg.model, "dataset": cfg.dataset.name}
    if model_id:
        tags["model_id"] = model_id
    else:
        log.warning("%s names no MLflow LoggedModel: the evaluation run is not linked to a model", cfg.model)
    version = registered_version(cfg.model)
    if version is not None:
        tags["registered_model"] = f"{version.name}/{version.version}"
    with tracking.start_run(experiment_id, f"eval-{model_reference(cfg.model)}-{cfg.split}", tags) as run:
        mlflow.log_params({"dataset": cfg.dataset.name, "split": cfg.split})
        mlflow.log_metrics(dict(metrics), model_id=model_id)
        for head, (truth, predicted, classes) in confusions.items():
            title = f"{cfg.model}{f' ({head})' if head else ''} on {cfg.dataset.name}[{cfg.split}]"
            mlflow.log_figure(plots.confusion_matrix(truth, predicted, classes, title=title,
                                                     class_names=class_names.get(head, ())),
                              f"confusion_matrix{f'_{head}' if head else ''}.png")
    return run.info.run_id


def class_names_of(model: Any) -> dict[str, list[str]]:
    """Head ("" for a single-output model) -> the class names the pipeline recorded in
    the logged model's metadata; empty for a model logged without them."""
    names = (model.metadata.metadata or {}).get("class_names") if getattr(model, "metadata", None) else None
    if isinstance(names, list):
        return {"": [str(name) for name in names]}
    if isinstance(names, dict):
        return {str(head): [str(name) for name in head_names] for head, head_names in names.items()}
    return {}


def model_reference(uri: str) -> str:
    """A short name for a model URI: models:/digits-mlp@champion -> digits-mlp@champion,
    runs:/RUN_ID/model -> RUN_ID/model, /path/to/model -> model."""
    for scheme in ("models:/", "runs:/"):
        if uri.startswith(scheme):
            return uri[len(scheme):].strip("/")
    return PurePath(uri.rstrip("/\\")).name or uri


def registered_version(uri: str) -> ModelVersion | None:
    """The registry version `models:/NAME/VERSION` or `models:/NAME@ALIAS` points to now;
    None for other URIs, `models:/NAME/latest`, or a name the registry does not know."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("models:/"):
        return None
    reference = uri[len("models:/"):].rstrip("/")
    try:
        if "@" in reference:
            name, alias = reference.rsplit("@", 1)
            return MlflowClient().get_model_version_by_alias(name, alias)
        name, version = reference.rsplit("/", 1)
        return MlflowClient().get_model_version(name, version) if version.isdigit() else None
    except Exception:  # unknown name, alias or version
        return None


def _model_id(model: Any, uri: str) -> str | None:
    """The LoggedModel id of a loaded pyfunc model: MLflow 3 records it in the model's
    MLmodel file. Else, for a registry URI, the version's: its `model_id` field, which
    the sqlite store of MLflow 3.17 leaves empty, or its `models:/<model_id>` source."""
    if getattr(model, "model_id", None):
        return model.model_id
    version = registered_version(uri)
    if version is None:
        return None
    if version.model_id:
        return version.model_id
    source = str(version.source or "")
    return source[len("models:/"):] if source.startswith("models:/m-") else None


def _score(probabilities, labels) -> tuple[Any, float]:
    """(predicted classes, summed cross-entropy) of one head: a 1-unit sigmoid or a softmax."""
    import numpy as np

    labels = np.asarray(labels).reshape(-1)
    if probabilities.shape[-1] == 1:
        p = probabilities[:, 0]
        predicted, picked = (p > 0.5).astype(labels.dtype), np.where(labels == 1, p, 1.0 - p)
    else:
        predicted, picked = probabilities.argmax(axis=1), probabilities[np.arange(len(labels)), labels]
    return predicted, float(-np.sum(np.log(np.clip(picked, 1e-12, 1.0))))


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="evaluate")
@cli.task
def main(cfg: DictConfig) -> dict[str, float]:
    return evaluate(cfg)


def cli_main() -> None:
    cli.run(main)


if __name__ == "__main__":
    cli_main()
