"""What the layers of a Keras model output: `intermediate_model`, a model from its inputs
to the chosen layers' outputs (inside nested sub-models too) sharing its weights, and
`layer_statistics` of those outputs on a batch, printed by `format_table`, and an
`activation_histogram` figure of each.

    from pipeline.figures import activations
    probe = activations.intermediate_model(model, ["dense_1"])
    outputs = probe.predict(batch)                          # {"dense_1": (B, units)}
    print(activations.format_table([activations.layer_statistics(n, a) for n, a in outputs.items()]))

`python -m pipeline.inspect` runs this on a trained run's model and a dataset split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import keras
    from matplotlib.figure import Figure


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


def activation_histogram(name: str, values: np.ndarray, bins: int = 60) -> Figure:
    """Histogram of one layer's output values (non-finite values are counted in the title).

    Args:
        name: the layer name, used as the title.
        values: the layer's output on a batch, any shape.
        bins: number of histogram bins.

    Returns:
        A figure with one axes, log-scale count axis so that rare outliers stay visible.
    """
    from matplotlib.figure import Figure  # here: `pipeline.inspect` imports this module before it draws anything

    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = flat[np.isfinite(flat)]
    figure = Figure(figsize=(6, 3.5), layout="constrained")
    ax = figure.add_subplot()
    if finite.size:
        ax.hist(finite, bins=bins, color="steelblue", log=True)
    title = f"{name}  {tuple(np.shape(values))}"
    if finite.size != flat.size:
        title += f"  ({flat.size - finite.size} non-finite not shown)"
    ax.set_title(title)
    ax.set_xlabel("value")
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)
    return figure
