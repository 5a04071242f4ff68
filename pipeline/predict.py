"""Predict the classes of new files with any MLflow model the pipeline logged.

    python -m pipeline.predict model=models:/photos-mlp@champion inputs=new_photos/
    python -m pipeline.predict model=models:/wine-mlp/3 inputs=new_wines.csv output=wines_predicted.csv

`inputs` is an image file, a folder of images (searched recursively), or a CSV file with
the columns the model was trained on (others, such as an id or the label, are ignored).
Images are decoded and resized exactly as training did (`pipeline.datasets.images`), to
the size the model's signature takes. The model is loaded through `mlflow.pyfunc`, as a
serving process would. It writes `predictions.csv` (into this job's output directory,
unless `output=` names a file) with the columns `input` (the file, or `FILE:LINE` for a
row), `prediction` (a class name), `probability`, and one probability column per class,
and prints where it went. Unreadable files and incomplete rows are handled as in
training: `on_bad_file=error` stops with one line naming them, `skip` leaves them out.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline import cli, quiet
from pipeline.errors import ConfigError, DatasetError, PipelineError, one_line

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("pipeline.predict")

ON_BAD_FILE = ("error", "skip")
# How many unreadable files or bad cells an error names (it counts them all).
NAMED = 5


@dataclass
class PredictMlflowConfig:
    tracking_uri: Optional[str] = MISSING


@dataclass
class PredictConfig:
    """Keys and types of `conf/predict.yaml` (values and their reasons live there)."""

    model: str = MISSING
    inputs: str = MISSING
    output: Optional[str] = MISSING
    on_bad_file: str = MISSING
    batch_size: int = MISSING
    mlflow: PredictMlflowConfig = field(default_factory=PredictMlflowConfig)


ConfigStore.instance().store(name="predict_schema", node=PredictConfig)


@dataclass(frozen=True)
class Predictions:
    """What a model said about each input that could be read."""

    inputs: list[str]
    probabilities: np.ndarray  # (N, classes)
    class_names: list[str]
    skipped: list[str]


def predict(cfg: DictConfig, output_dir: Path | None = None) -> Path:
    """Predict `cfg.inputs` with `cfg.model` and write the predictions CSV.

    Args:
        cfg: the composed `conf/predict.yaml`.
        output_dir: where `predictions.csv` goes unless `cfg.output` names a file
            (the job's output directory); default the working directory.

    Returns:
        The CSV file written.
    """
    for key in ("model", "inputs"):
        if OmegaConf.is_missing(cfg, key) or not str(cfg[key]).strip():
            raise ConfigError(f"{key} is missing: give "
                              + ("an MLflow model URI, e.g. model=models:/photos-mlp@champion" if key == "model" else
                                 "an image, a folder of images or a CSV file, e.g. inputs=new_photos/"))
    if cfg.on_bad_file not in ON_BAD_FILE:
        raise ConfigError(f"on_bad_file must be one of {ON_BAD_FILE}. Received: {cfg.on_bad_file!r}")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1. Received: {cfg.batch_size}")
    inputs = Path(str(cfg.inputs)).expanduser()
    if not inputs.exists():
        raise DatasetError(f"inputs: {inputs} does not exist")
    quiet.import_tensorflow()  # loading the model imports it: without its CUDA probing on a CPU-only machine
    import mlflow

    from pipeline import store_uri

    mlflow.set_tracking_uri(store_uri.tracking_uri_exporting_credentials(cfg.mlflow.tracking_uri))
    try:
        model = mlflow.pyfunc.load_model(model_uri(cfg.model))
    except Exception as error:  # unknown name/alias/run, unreadable artifacts, bad URI
        raise PipelineError(f"model: cannot load {cfg.model!r}: {one_line(error)}") from None
    schema = model.metadata.get_input_schema()
    if schema is None:
        raise PipelineError(f"model: {cfg.model} has no signature, so its inputs are unknown")
    if schema.is_tensor_spec():
        if len(schema.inputs) != 1:
            raise PipelineError(f"model: {cfg.model} takes {', '.join(schema.input_names())}; pipeline.predict "
                                "reads images or a CSV table for a model of one input")
        result = _predict_images(model, schema.inputs[0], inputs, cfg)
    else:
        if inputs.is_dir() or inputs.suffix.lower() != ".csv":
            columns = ", ".join(schema.input_names()[:5]) + (", ..." if len(schema.input_names()) > 5 else "")
            raise DatasetError(f"inputs: {cfg.model} takes the columns of a table ({columns}): give a CSV file. "
                               f"Received: {inputs}")
        result = _predict_table(model, schema, inputs, cfg)
    path = Path(str(cfg.output)).expanduser() if cfg.output else (output_dir or Path.cwd()) / "predictions.csv"
    _write(result, path)
    skipped = f", {len(result.skipped)} skipped" if result.skipped else ""
    print(f"{len(result.inputs)} predictions{skipped} by {cfg.model} written to {path.absolute()}", flush=True)
    return path


def model_uri(uri: str) -> str:
    """`uri` as MLflow loads it: `runs:/RUN_ID` alone means the model the run logged
    (`runs:/RUN_ID/model`, the name the pipeline logs it under)."""
    if re.fullmatch(r"runs:/[0-9a-f]{32}/?", uri.strip()):
        return uri.strip().rstrip("/") + "/model"
    return uri


def _predict_images(model, spec, inputs: Path, cfg: DictConfig) -> Predictions:
    """Decode and resize each image as training did, then predict in batches."""
    import numpy as np
    import tensorflow as tf

    from pipeline.datasets import images

    shape = tuple(spec.shape)
    if len(shape) != 4 or None in shape[1:] or -1 in shape[1:]:
        raise PipelineError(f"model: {cfg.model} takes inputs of shape {shape}, not images (N, H, W, C)")
    size, channels = (int(shape[1]), int(shape[2])), int(shape[3])
    if channels not in (1, 3):
        raise PipelineError(f"model: {cfg.model} takes images of {channels} channels; files decode to 1 or 3")
    files = sorted(p for p in inputs.rglob("*") if p.is_file() and images.is_image(p)) if inputs.is_dir() \
        else [inputs]
    if not files:
        raise DatasetError(f"inputs: no image file ({', '.join(sorted(images.IMAGE_EXTENSIONS))}) in {inputs}")
    names = [str(p.relative_to(inputs)) if inputs.is_dir() else p.name for p in files]
    dtype = np.dtype(spec.type)
    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(files)), [str(p) for p in files]))
    ds = ds.map(lambda index, path: (index, images.load(path, size, channels)),
                num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    kept, probabilities = [], []
    with quiet.image_decoding():  # a bad file is named below, in one line
        for index, batch in ds.batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
            kept.extend(index.tolist())
            probabilities.append(np.asarray(model.predict(batch.astype(dtype)), dtype=np.float64))
    decoded = set(kept)
    skipped = [name for index, name in enumerate(names) if index not in decoded]
    _check_skipped(skipped, len(names), cfg.on_bad_file,
                   f"{len(skipped)} of {len(names)} image files cannot be decoded")
    return Predictions([names[index] for index in kept], _stacked(probabilities), _class_names(model), skipped)


def _predict_table(model, schema, inputs: Path, cfg: DictConfig) -> Predictions:
    """Parse the columns the model takes as training did, then predict in batches."""
    import numpy as np
    import pandas as pd

    from pipeline.datasets.csv_table import parse, read_frame

    frame = read_frame(inputs, {"inputs": schema.input_names()}, flag="inputs")
    kinds = {spec.name: "string" if spec.type.name in ("string", "binary") else "float32" for spec in schema.inputs}
    values, bad = parse(frame, kinds, label=None)
    bad_lines = sorted({cell.line for cell in bad})
    _check_skipped([f"{inputs.name}:{line}" for line in bad_lines], len(frame), cfg.on_bad_file,
                   f"{len(bad_lines)} of {len(frame)} rows have a missing or unparsable cell, "
                   f"first {inputs.name} {bad[0]}" if bad else "")
    keep = ~np.isin(np.arange(len(frame)) + 2, bad_lines)
    table = pd.DataFrame({name: values[name][keep] for name in kinds})
    probabilities = [np.asarray(model.predict(table.iloc[start:start + cfg.batch_size]), dtype=np.float64)
                     for start in range(0, len(table), cfg.batch_size)]
    lines = (np.arange(len(frame)) + 2)[keep]
    return Predictions([f"{inputs.name}:{line}" for line in lines], _stacked(probabilities), _class_names(model),
                       [f"{inputs.name}:{line}" for line in bad_lines])


def _check_skipped(bad: list[str], total: int, on_bad_file: str, what: str) -> None:
    """Stop on `bad` inputs (files, or a table's cells) naming them, or warn and go on."""
    if not bad:
        return
    named = "; ".join(bad[:NAMED]) + ("; ..." if len(bad) > NAMED else "")
    if on_bad_file == "error":
        raise DatasetError(f"inputs: {what} ({named}); fix them, or set on_bad_file=skip to predict the rest")
    log.warning("skipped %d of %d inputs: %s (%s)", len(bad), total, what, named)


def _stacked(batches: list) -> np.ndarray:
    import numpy as np

    if not batches:
        raise DatasetError("inputs: nothing left to predict")
    probabilities = np.concatenate(batches)
    if probabilities.ndim != 2:
        raise PipelineError(f"model: its output has shape {probabilities.shape}, not (N, classes)")
    if probabilities.shape[1] == 1:  # one sigmoid unit: P(class 1)
        probabilities = np.concatenate([1.0 - probabilities, probabilities], axis=1)
    return probabilities


def _class_names(model) -> list[str]:
    """The class names the pipeline recorded with the model (in output order), if any."""
    names = (model.metadata.metadata or {}).get("class_names")
    return [str(name) for name in names] if isinstance(names, list) else []


def _write(result: Predictions, path: Path) -> None:
    """The predictions as CSV: input, prediction, probability, then one column per class."""
    classes = result.probabilities.shape[1]
    names = result.class_names if len(result.class_names) == classes else [str(i) for i in range(classes)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["input", "prediction", "probability", *names])
        for name, row in zip(result.inputs, result.probabilities, strict=True):
            best = int(row.argmax())
            writer.writerow([name, names[best], f"{row[best]:.6f}", *(f"{p:.6f}" for p in row)])


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="predict")
@cli.task
def main(cfg: DictConfig) -> None:
    predict(cfg, output_dir=cli.job_output_dir())


def cli_main() -> None:
    cli.run(main)


if __name__ == "__main__":
    cli_main()
