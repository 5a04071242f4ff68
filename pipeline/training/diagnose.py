"""Find the first layer that produced a non-finite value, by re-running one batch.

Runs only after the train step has flagged a bad step, so its cost never touches
training. For Functional and Sequential models it uses the intermediate-output model
(`keras.Model(model.inputs, [layer.output, ...])`) and descends into nested models
(e.g. ensemble members); a subclassed model has no symbolic outputs, so there each
layer's call is recorded as the forward pass runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras
import numpy as np
import tensorflow as tf

from architectures.common import nested_layers


def non_finite_count(values) -> int:
    return int(sum(np.size(a) - np.count_nonzero(np.isfinite(a))
                   for a in tf.nest.flatten(tf.nest.map_structure(np.asarray, values))
                   if np.issubdtype(np.asarray(a).dtype, np.floating)))


def first_non_finite_weights(model: keras.Model) -> str | None:
    """The path of the first layer (in model order) holding a non-finite weight."""
    from pipeline.training.guarded import layer_path

    for variable in model.weights:
        if np.issubdtype(np.dtype(variable.dtype), np.floating) and non_finite_count(variable.numpy()):
            return layer_path(variable, model)
    return None


def first_non_finite_output(model: keras.Model, inputs) -> str | None:
    """The name of the first layer whose output on `inputs` (training=True) is
    non-finite, descending into nested models; None if every output is finite."""
    if _is_functional(model):
        layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
        probe = keras.Model(model.inputs, [(layer.input, layer.output) for layer in layers])
        for layer, (layer_input, output) in zip(layers, probe(inputs, training=True)):
            if non_finite_count(output):
                if isinstance(layer, keras.Model) and not non_finite_count(layer_input):
                    inner = first_non_finite_output(layer, layer_input)
                    return f"{layer.name}/{inner}" if inner else layer.name
                return layer.name
        return None
    with _recorded_calls(model) as calls:
        model(inputs, training=True)
    return next((name for name, output in calls if non_finite_count(output)), None)


def _is_functional(model: keras.Model) -> bool:
    try:
        return bool(model.inputs) and bool(model.outputs)
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def _recorded_calls(model: keras.Model) -> Iterator[list[tuple[str, object]]]:
    """Record (layer name, output) of every leaf layer call, in execution order."""
    calls: list[tuple[str, object]] = []
    leaves = [layer for layer in nested_layers(model) if not getattr(layer, "layers", None)]
    for layer in leaves:

        def recording_call(*args, layer=layer, call=layer.call, **kwargs):
            output = call(*args, **kwargs)
            calls.append((layer.name, output))
            return output

        layer.call = recording_call  # an instance attribute shadows the class's `call`
    try:
        yield calls
    finally:
        for layer in leaves:
            del layer.call


def gradient_report(model: keras.Model, loss_fn, inputs, labels) -> tuple[str | None, dict[str, float]]:
    """(first layer with a non-finite gradient, gradient norm per layer) for one batch."""
    from pipeline.training.guarded import layer_path

    with tf.GradientTape() as tape:
        predictions = model(inputs, training=True)
        loss = loss_fn(labels, predictions)
    variables = model.trainable_variables
    norms: dict[str, float] = {}
    first = None
    for variable, gradient in zip(variables, tape.gradient(loss, variables)):
        if gradient is None:
            continue
        layer = layer_path(variable, model)
        value = float(tf.norm(tf.cast(gradient, tf.float32)))
        norms[layer] = float(np.hypot(norms.get(layer, 0.0), value))
        if first is None and not np.isfinite(value):
            first = layer
    return first, norms


def describe(model: keras.Model, inputs, labels, loss_fn) -> tuple[str, str | None]:
    """Where a non-finite value first appears for this batch, as (what, detail): the
    input, a layer's weights, a layer's output, a layer's gradient, or the loss."""
    bad_inputs = non_finite_count(inputs)
    if bad_inputs:
        layer = first_non_finite_output(model, inputs)
        what = f"non-finite output in layer '{layer}'" if layer else "non-finite input"
        return what, f"the input batch holds {bad_inputs} non-finite value(s)"
    layer = first_non_finite_weights(model)
    if layer:
        return f"non-finite weights in layer '{layer}'", None
    layer = first_non_finite_output(model, inputs)
    if layer:
        return f"non-finite output in layer '{layer}'", None
    first, norms = gradient_report(model, loss_fn, inputs, labels)
    if first:
        return f"non-finite gradient in layer '{first}'", None
    loss = float(tf.reduce_mean(loss_fn(labels, model(inputs, training=True))))
    if not np.isfinite(loss):
        return "non-finite loss", "every layer output is finite"
    return "non-finite loss or gradient norm", "it did not reproduce on a re-run of the batch (dropout-dependent?)"
