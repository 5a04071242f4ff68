"""Look inside a trained Keras model: what each layer outputs on a batch of real data.

    python -m pipeline.inspect model=runs:/RUN_ID                       # every layer
    python -m pipeline.inspect model=runs:/RUN_ID 'layers=[dense_1,dense_2]' "split='train[:10%]'" examples=64
    python -m pipeline.inspect model=path/to/model.keras output_dir=inspect/

The tutorial's intermediate-model technique (`pipeline.figures.activations`): a `keras.Model`
from the model's inputs to the chosen layers' outputs, sharing their weights, run on
`examples` raw inputs of the dataset split. Prints per layer the output shape, dtype,
mean, std, min, max, fraction of zeros and count of non-finite values, and saves one
histogram PNG per layer (plus `statistics.json`) in `output_dir`.

Layers live only in the Keras file a training run logs as `keras/model.keras`, not in
the registered SavedModel (`models:/...`), which keeps only the serving function.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline import cli, quiet
from pipeline.config import DatasetConfig, MLflowConfig
from pipeline.errors import ConfigError, DatasetError, PipelineError, one_line
from pipeline.figures import activations

if TYPE_CHECKING:
    import keras

log = logging.getLogger("pipeline.inspect")
# What inspect prints, for the job's log file only (see `main`): the console has it once.
report_log = logging.getLogger("pipeline.inspect.report")

# Where a training run keeps its Keras model file (layers, weights, custom classes).
KERAS_ARTIFACT = "keras/model.keras"


@dataclass
class InspectConfig:
    """Schema of `conf/inspect.yaml` (kept with its only user, this entry point)."""

    model: str = MISSING
    layers: List[str] = field(default_factory=list)
    split: str = MISSING
    examples: int = MISSING
    output_dir: Optional[str] = MISSING
    dataset: DatasetConfig = MISSING
    mlflow: MLflowConfig = MISSING


ConfigStore.instance().store(name="inspect_schema", node=InspectConfig)


def inspect_model(cfg: DictConfig, job_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Print and plot what every requested layer of `cfg.model` outputs on one batch.

    Args:
        cfg: the composed `conf/inspect.yaml`.
        job_dir: where the figures go unless `cfg.output_dir` says: the Hydra job's
            output directory, else `./inspect`.

    Returns:
        layer name -> `activations.layer_statistics` of its output, in model order.
    """
    if OmegaConf.is_missing(cfg, "model") or not cfg.model.strip():
        raise ConfigError("model is missing: give a Keras model, e.g. model=runs:/RUN_ID or model=path/to/model.keras")
    if cfg.examples < 1:
        raise ConfigError(f"examples must be >= 1. Received: {cfg.examples}")
    quiet.import_tensorflow()  # loading the model imports it: without its CUDA probing on a CPU-only machine
    import mlflow
    import numpy as np

    from pipeline import data, input_specs, store_uri
    from pipeline.figures import plots

    mlflow.set_tracking_uri(store_uri.tracking_uri_exporting_credentials(cfg.mlflow.tracking_uri))
    model = load_keras_model(cfg.model)
    try:
        names = list(cfg.layers) or activations.layer_names(model)
        probe = activations.intermediate_model(model, names)
    except ValueError as error:  # unknown layer, or a model without a layer graph
        raise ConfigError(f"layers: {error}") from None

    split, _ = data.split(cfg.dataset, cfg.split, autocache=False)  # one batch of it is read
    input_specs.require_fit(input_specs.of_keras(model), input_specs.of_dataset(split.element_spec), cfg.model,
                            cfg.dataset.name, "inspect it")
    # Tensors, not NumPy: a table's text columns would be object arrays, which Keras refuses.
    batch = next(iter(split.take(cfg.examples).batch(cfg.examples)), None)
    if batch is None:
        raise DatasetError(f"split: {cfg.dataset.name}[{cfg.split}] is empty")
    inputs, _ = batch
    outputs = {name: np.asarray(output) for name, output in probe(inputs, training=False).items()}

    output_dir = Path(cfg.output_dir or job_dir or "inspect")
    statistics = {name: activations.layer_statistics(name, outputs[name]) for name in names}
    examples = len(next(iter(outputs.values())))
    _report(f"{cfg.model} on {cfg.dataset.name}[{cfg.split}], {examples} examples:")
    _report(activations.format_table(statistics.values()))
    for name in statistics:
        plots.save(activations.activation_histogram(name, outputs[name]), output_dir / f"{_file_name(name)}.png")
    (output_dir / "statistics.json").write_text(json.dumps(statistics, indent=2))
    _report(f"histograms of {len(statistics)} layers and statistics.json in {output_dir}")
    return statistics


def _report(text: str) -> None:
    """Print `text`, and keep it in the job's log (`inspect.log`) through `report_log`."""
    print(text, flush=True)
    report_log.info(text)


def load_keras_model(uri: str) -> keras.Model:
    """The Keras model at `uri`: `runs:/RUN_ID` (its `keras/model.keras`),
    `runs:/RUN_ID/<artifact path>`, any other MLflow artifact URI, or a local path.

    Raises:
        ConfigError: for `models:/` URIs and SavedModel directories, which have no layers.
        PipelineError: when the file cannot be found, downloaded or loaded.
    """
    import keras
    import mlflow

    import architectures  # noqa: F401  (registers the custom layers a .keras file may name)

    if uri.startswith("models:/"):
        raise ConfigError(f"model: {uri} is a registered SavedModel, which keeps no Keras layers to inspect; "
                          f"give its training run instead: model=runs:/{_training_run_of(uri) or 'RUN_ID'}")
    with tempfile.TemporaryDirectory() as download_dir:
        if re.match(r"^[a-zA-Z][\w+.-]*:/", uri) and not re.match(r"^[a-zA-Z]:[\\/]", uri):  # a URI, not C:\ paths
            artifact_uri = f"{uri.rstrip('/')}/{KERAS_ARTIFACT}" if re.fullmatch(r"runs:/[^/]+/?", uri) else uri
            try:
                path = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=download_dir))
            except Exception as error:  # unknown run, missing artifact, unreachable store
                reason = one_line(error)
                raise PipelineError(f"model: cannot download {artifact_uri}: {reason}") from None
        else:
            path = Path(uri)
            if not path.exists():
                raise PipelineError(f"model: no such file: {uri}")
        if path.is_dir():
            path = _keras_file_in(path, uri)
        try:
            return keras.saving.load_model(path, compile=False)  # inference only: no optimizer state needed
        except Exception as error:
            reason = one_line(error)
            raise PipelineError(f"model: cannot load {uri} as a Keras model: {reason}") from None


def _keras_file_in(directory: Path, uri: str) -> Path:
    if (directory / "saved_model.pb").exists() or (directory / "MLmodel").exists():
        raise ConfigError(f"model: {uri} is a SavedModel, which keeps no Keras layers to inspect; give the "
                          f"training run's Keras file instead: model=runs:/RUN_ID")
    candidates = sorted(directory.rglob("*.keras"))
    if len(candidates) != 1:
        raise PipelineError(f"model: {uri} is a directory with {len(candidates)} .keras files; name one")
    return candidates[0]


def _training_run_of(uri: str) -> str | None:
    """The run that logged the registered model `uri`, if the registry can tell."""
    from pipeline.evaluate import registered_version

    version = registered_version(uri)
    return version.run_id if version is not None and version.run_id else None


def _file_name(layer_name: str) -> str:
    return re.sub(r"[^\w.-]", "_", layer_name.replace("/", "__"))


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="inspect")
@cli.task
def main(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    # Hydra logs to the console and to inspect.log: the printed report goes to the file alone.
    log_files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    report_log.handlers, report_log.propagate = log_files, not log_files
    return inspect_model(cfg, cli.job_output_dir())


def cli_main() -> None:
    cli.run(main)


if __name__ == "__main__":
    cli_main()
