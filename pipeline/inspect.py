"""Look inside a trained Keras model: what each layer outputs on a batch of real data.

    python -m pipeline.inspect model=runs:/RUN_ID                       # every layer
    python -m pipeline.inspect model=runs:/RUN_ID layers=[dense_1,dense_2] split='train[:10%]' examples=64
    python -m pipeline.inspect model=path/to/model.keras output_dir=inspect/

The tutorial's intermediate-model technique: a `keras.Model` from the model's inputs to
the chosen layers' outputs, sharing their weights, run on `examples` raw inputs of the
dataset split. Prints per layer the output shape, dtype, mean, std, min, max, fraction
of zeros and count of non-finite values, and saves one histogram PNG per layer (plus
`statistics.json`) in `output_dir`.

Layers live only in the Keras file a training run logs as `keras/model.keras`, not in
the registered SavedModel (`models:/...`), which keeps only the serving function.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline import cli
from pipeline.config import DatasetConfig, MLflowConfig
from pipeline.errors import ConfigError, DatasetError, PipelineError, one_line

if TYPE_CHECKING:
    import keras

log = logging.getLogger("pipeline.inspect")

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


def inspect_model(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Print and plot what every requested layer of `cfg.model` outputs on one batch.

    Args:
        cfg: the composed `conf/inspect.yaml`.

    Returns:
        layer name -> `layer_statistics` of its output, in model order.
    """
    if OmegaConf.is_missing(cfg, "model") or not cfg.model.strip():
        raise ConfigError("model is missing: give a Keras model, e.g. model=runs:/RUN_ID or model=path/to/model.keras")
    if cfg.examples < 1:
        raise ConfigError(f"examples must be >= 1. Received: {cfg.examples}")
    import mlflow
    import tensorflow_datasets as tfds

    from pipeline import data, plots, tracking

    mlflow.set_tracking_uri(tracking.tracking_uri(cfg.mlflow.tracking_uri))
    model = load_keras_model(cfg.model)
    try:
        names = list(cfg.layers) or layer_names(model)
        probe = intermediate_model(model, names)
    except ValueError as error:  # unknown layer, or a model without a layer graph
        raise ConfigError(f"layers: {error}") from None

    split = data.split(cfg.dataset, cfg.split)
    batch = next(iter(tfds.as_numpy(split.take(cfg.examples).batch(cfg.examples))), None)
    if batch is None:
        raise DatasetError(f"split: {cfg.dataset.name}[{cfg.split}] is empty")
    inputs, _ = batch
    outputs = probe.predict(inputs, verbose=0)

    output_dir = Path(cfg.output_dir or _job_output_dir() or "inspect")
    statistics = {name: layer_statistics(name, outputs[name]) for name in names}
    examples = len(next(iter(outputs.values())))
    print(f"{cfg.model} on {cfg.dataset.name}[{cfg.split}], {examples} examples:", flush=True)
    print(format_table(statistics.values()), flush=True)
    for name in statistics:
        plots.save(plots.activation_histogram(name, outputs[name]), output_dir / f"{_file_name(name)}.png")
    (output_dir / "statistics.json").write_text(json.dumps(statistics, indent=2))
    print(f"histograms of {len(statistics)} layers and statistics.json in {output_dir}", flush=True)
    return statistics


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


def layer_names(model: keras.Model) -> list[str]:
    """Every layer `intermediate_model` can read, in model order: top-level layers by
    name, and the layers of nested Functional or Sequential sub-models (ensemble
    members) as `member/layer`, at any depth. Input layers are left out."""
    import keras

    names = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        names.append(layer.name)
        if _has_graph(layer):
            names += [f"{layer.name}/{inner}" for inner in layer_names(layer)]
    return names


def intermediate_model(model: keras.Model, layer_names_to_read: Sequence[str] | None = None) -> keras.Model:
    """A model from `model`'s inputs to the outputs of some of its layers, sharing weights.

    Works for Sequential and Functional models, including layers inside nested
    Functional or Sequential sub-models such as ensemble members (named `member/layer`,
    see `layer_names`): such a sub-model is re-entered where the outer model calls it.
    Subclassed models have no layer graph to read and are refused. A layer (or
    sub-model) must be called exactly once in its model; a multi-output one is refused.

    Args:
        model: a built Sequential or Functional model.
        layer_names_to_read: names from `layer_names(model)`; None or empty = all of them.

    Returns:
        A Functional model taking `model`'s inputs and returning a dict layer name ->
        output tensor (B, ...), in the order asked.

    Raises:
        ValueError: for an unknown layer name (the message lists the available ones),
            or a model or layer whose outputs are not symbolic.
    """
    import keras

    inputs = _graph_inputs(model)
    available = layer_names(model)
    names = list(layer_names_to_read or available)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"{', '.join(unknown)} {'is not a layer' if len(unknown) == 1 else 'are not layers'} of "
                         f"{model.name}. Available: {', '.join(available)}")
    return keras.Model(inputs, {name: _symbolic_output(model, name) for name in names},
                       name=f"{model.name}_intermediate")


def _has_graph(layer: Any) -> bool:
    """Whether `layer` is a model whose own layers have symbolic outputs."""
    import keras

    if not isinstance(layer, keras.Model):
        return False
    try:
        return bool(layer.inputs)
    except AttributeError:  # subclassed models have no `inputs`
        return False


def _graph_inputs(model: keras.Model) -> list:
    import keras

    if not _has_graph(model):
        if isinstance(model, keras.Sequential):
            raise ValueError(f"{model.name} is a Sequential model without a keras.Input, so its layers have no "
                             "symbolic outputs to read. Start it with keras.Input(shape=...)")
        raise ValueError(f"{model.name} is a subclassed {type(model).__name__}: its layers have no symbolic "
                         "outputs to read. Inspect a Sequential or Functional model")
    # A list even for dict-input models: Keras matches a dict batch to inputs by name.
    return model.inputs


def _only_call(layer: Any, model: keras.Model) -> Any:
    """The one node where `model`'s graph calls `layer`.

    Keras keeps a layer's calls only in private attributes (`_inbound_nodes`, and the
    graph's `_nodes_by_depth`). A layer may have calls outside this graph: a reloaded
    nested Sequential is built more than once. And a sub-model's public `output` is
    its own inner output, not the tensor where the outer graph uses it.
    """
    import keras

    graph = model._functional if isinstance(model, keras.Sequential) else model
    in_graph = {id(node) for nodes in graph._nodes_by_depth.values() for node in nodes}
    nodes = [node for node in layer._inbound_nodes if id(node) in in_graph]
    if len(nodes) != 1:
        raise ValueError(f"{layer.name} is called {len(nodes)} times in {model.name}; only layers called once "
                         "have one output to read")
    return nodes[0]


def _symbolic_output(model: keras.Model, name: str) -> Any:
    """The KerasTensor of layer `name` (or `member/.../layer`) in `model`'s graph."""
    import keras

    head, _, rest = name.partition("/")
    layer = model.get_layer(head)
    node = _only_call(layer, model)
    if rest:  # a layer inside the sub-model `layer` (layer_names lists only such paths)
        # Rebuild the path inside the sub-model, then call it on the tensors the outer
        # graph feeds the sub-model: same layers, same weights.
        inner = keras.Model(_graph_inputs(layer), _symbolic_output(layer, rest))
        return inner(*node.arguments.args, **node.arguments.kwargs)
    outputs = node.output_tensors
    if len(outputs) != 1:
        raise ValueError(f"{name} has {len(outputs)} outputs; read the layers that use them instead")
    return outputs[0]


def layer_statistics(name: str, array: Any) -> dict[str, Any]:
    """Summary statistics of one layer's output on a batch.

    Mean, std, min and max are over the finite values only (NaN if there are none), so
    a few infinities do not hide what the rest of the layer does; `non_finite` counts
    the others.

    Args:
        name: the layer name, echoed in the result.
        array: the layer's output, any shape (e.g. (B, units)).

    Returns:
        {"layer", "shape", "dtype", "mean", "std", "min", "max", "zero_fraction",
        "non_finite"}; floats are Python floats, `shape` a list (JSON-ready).
    """
    values = np.asarray(array)
    flat = values.astype(np.float64).reshape(-1)
    finite = flat[np.isfinite(flat)]
    summary = (float(finite.mean()), float(finite.std()), float(finite.min()), float(finite.max())) \
        if finite.size else (math.nan,) * 4
    return {
        "layer": name,
        "shape": list(values.shape),
        "dtype": str(values.dtype),
        "mean": summary[0],
        "std": summary[1],
        "min": summary[2],
        "max": summary[3],
        "zero_fraction": float(np.mean(flat == 0)) if flat.size else math.nan,
        "non_finite": int(flat.size - finite.size),
    }


def format_table(statistics: Sequence[dict[str, Any]] | Any) -> str:
    """`layer_statistics` results as an aligned text table, one layer per row."""
    rows = [["layer", "shape", "dtype", "mean", "std", "min", "max", "zeros", "non-finite"]]
    for s in statistics:
        rows.append([s["layer"], "(" + ", ".join(map(str, s["shape"])) + ")", s["dtype"],
                     *(f"{s[k]:.4g}" for k in ("mean", "std", "min", "max")), f"{s['zero_fraction']:.3f}",
                     str(s["non_finite"])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) if i < 3 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in rows)


def _file_name(layer_name: str) -> str:
    return re.sub(r"[^\w.-]", "_", layer_name.replace("/", "__"))


def _job_output_dir() -> str | None:
    if not HydraConfig.initialized():
        return None
    runtime = HydraConfig.get().runtime
    return None if OmegaConf.is_missing(runtime, "output_dir") else runtime.output_dir


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="inspect")
@cli.task
def main(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    return inspect_model(cfg)


def cli_main() -> None:
    cli.run(main)


if __name__ == "__main__":
    cli_main()
