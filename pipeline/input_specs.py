"""Whether a dataset's examples fit a model's inputs, checked before any batch is fed
(`pipeline.evaluate`, `pipeline.inspect`), and said in one line naming both:

    error: model models:/digits-mlp@champion takes uint8 (-1, 8, 8, 1), but dataset synthetic_mnist gives
    uint8 (-1, 28, 28, 1): evaluate it on data of its own input shape and dtype

Without the check, MLflow's signature enforcement or Keras's input check fails on the
first batch, with a traceback that prints the batch. Shapes are written as MLflow's
signatures write them: -1 for the batch and any other free dimension.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Spec:
    """One input tensor: its dtype's NumPy name and its shape without the batch dimension
    (None: any size)."""

    dtype: str
    shape: tuple[int | None, ...]

    def __str__(self) -> str:
        return f"{self.dtype} ({', '.join(str(-1 if size is None else size) for size in (None, *self.shape))})"

    def accepts(self, given: Spec) -> bool:
        """Same dtype and rank, and no size that differs where both are known (a dataset of
        images of several sizes knows none: the model's own check sees each batch)."""
        return self.dtype == given.dtype and len(self.shape) == len(given.shape) and all(
            size is None or other is None or size == other for size, other in zip(self.shape, given.shape, strict=True))


# Input name -> spec; "" names the one input of a single-input model or dataset.
Inputs = Mapping[str, Spec]


def describe(inputs: Inputs) -> str:
    """`uint8 (-1, 8, 8, 1)`, or `{features: float32 (-1, 10), image: uint8 (-1, 32, 32, 3)}` (by name)."""
    if list(inputs) == [""]:
        return str(inputs[""])
    return "{" + ", ".join(f"{name}: {inputs[name]}" for name in sorted(inputs)) + "}"


def require_fit(model: Inputs | None, data: Inputs, model_name: str, dataset_name: str, task: str) -> None:
    """Raise `ConfigError` unless every input of `model` is given, in a dtype and shape it
    accepts, by `data`; `model` None (no signature recorded) passes. `task` finishes the
    sentence: what to do it on, e.g. "evaluate it"."""
    if model is None:
        return
    if set(model) == set(data) and all(model[name].accepts(data[name]) for name in model):
        return
    raise ConfigError(f"model {model_name} takes {describe(model)}, but dataset {dataset_name} gives "
                      f"{describe(data)}: {task} on data of its own input shape and dtype")


def of_dataset(element_spec: Any) -> dict[str, Spec]:
    """The inputs of a `(inputs, labels)` tf.data element spec, unbatched."""
    inputs = element_spec[0]
    named = inputs.items() if isinstance(inputs, Mapping) else [("", inputs)]
    return {name: Spec(spec.dtype.name, tuple(spec.shape.as_list())) for name, spec in named}


def of_signature(schema: Any) -> dict[str, Spec] | None:
    """The inputs of an MLflow model's input schema (`model.metadata.get_input_schema()`),
    or None where it records no tensor specs to check against."""
    if schema is None or not schema.is_tensor_spec():
        return None
    return {(spec.name if schema.has_input_names() else ""): Spec(spec.type.name, tuple(
        None if size == -1 else size for size in spec.shape[1:])) for spec in schema.inputs}


def of_keras(model: Any) -> dict[str, Spec]:
    """The inputs of a functional or sequential Keras model, by its `keras.Input` names."""
    inputs = model.inputs
    named = [("", inputs[0])] if len(inputs) == 1 else [(tensor.name, tensor) for tensor in inputs]
    return {name: Spec(str(tensor.dtype), tuple(tensor.shape[1:])) for name, tensor in named}
