"""What every builder shares: the input description, the output head, argument checks,
and the walk over a model's (nested) layers."""

from __future__ import annotations

from dataclasses import dataclass

import keras


@dataclass(frozen=True)
class Column:
    """One column of a table, which the model takes raw and encodes itself
    (`architectures.columns`), so its export needs none of this project's code.

    Args:
        name: the column's name in the table's header.
        key: the model's input for it: `name` made an identifier (`alcohol %` ->
            `alcohol__`), unique in the table.
        dtype: "float32" for a numeric column (standardized by `mean` and `variance`),
            "string" for a categorical one (one-hot over `vocabulary`, plus one slot
            for a value not in it).
        mean: of the column on the training split.
        variance: of the column on the training split.
        vocabulary: the categories seen in the training split, sorted.
    """

    name: str
    key: str
    dtype: str
    mean: float = 0.0
    variance: float = 1.0
    vocabulary: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        """How many features the column becomes: 1, or one per category plus one."""
        return 1 if self.dtype == "float32" else len(self.vocabulary) + 1


@dataclass(frozen=True)
class InputSpec:
    """What a builder needs to know about the data, derived from the dataset at run time.

    Args:
        shape: one example's image shape, e.g. (8, 8, 1) for digits, (28, 28, 1) for MNIST.
        dtype: the raw image dtype the model will receive, e.g. "uint8".
        num_classes: size of the softmax output of a single-label dataset; 0 when the
            dataset has several labels (see `heads`).
        max_value: largest raw pixel value; the model rescales by 1 / max_value.
        features: length of the numeric `features` input of a multimodal dataset; 0 for
            datasets of images only.
        heads: (label name, number of classes) of each label of a multi-label dataset,
            e.g. (("binary", 2), ("category", 3)); empty for single-label datasets.
        columns: a table's columns, which the model takes raw, by name; `shape` is then
            (number of encoded features,), what a builder receives (see
            `architectures.columns`). Empty for images.
    """

    shape: tuple[int, ...]
    dtype: str = "uint8"
    num_classes: int = 10
    max_value: float = 255.0
    features: int = 0
    heads: tuple[tuple[str, int], ...] = ()
    columns: tuple[Column, ...] = ()

    def __post_init__(self) -> None:
        if not self.shape or any(int(d) < 1 for d in self.shape):
            raise ValueError(f"InputSpec.shape must be non-empty and positive. Received: {self.shape}")
        if not self.heads and self.num_classes < 2:
            raise ValueError(f"InputSpec.num_classes must be >= 2. Received: {self.num_classes}")

    @property
    def multimodal(self) -> bool:
        """Images plus numeric features in, several labels out."""
        return self.features > 0 or bool(self.heads)

    @property
    def tabular(self) -> bool:
        """Columns of a table in, by name."""
        return bool(self.columns)


def image_layers(input_spec: InputSpec, name: str = "image") -> tuple[keras.KerasTensor, keras.layers.Rescaling]:
    """The raw-image `Input` and the `Rescaling` layer to [0, 1], for Sequential builders.

    The input keeps the dataset dtype (e.g. uint8), so the exported signature takes raw
    images; the model carries its own preprocessing.
    """
    inputs = keras.Input(shape=input_spec.shape, dtype=input_spec.dtype, name=name)
    return inputs, keras.layers.Rescaling(1.0 / input_spec.max_value, name="rescale")


def image_input(input_spec: InputSpec, name: str = "image") -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """The raw-image `Input` and its rescaled float version, for Functional builders.

    Returns:
        (inputs, scaled): `inputs` keeps the dataset dtype (e.g. uint8); `scaled` is
        (B, *input_spec.shape) in [0, 1], in the layers' compute dtype (float32, or
        bfloat16/float16 under mixed precision).
    """
    inputs, rescale = image_layers(input_spec, name)
    return inputs, rescale(inputs)


def classifier_head(num_classes: int, name: str = "probabilities") -> keras.layers.Dense:
    """Softmax output kept in float32 under any precision policy, for stable losses and
    a float32 serving signature."""
    return keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name=name)


def check_dropout(rate: float, name: str = "dropout") -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1). Received: {rate}")


def check_positive_int(value: int, name: str) -> None:
    if int(value) < 1:
        raise ValueError(f"{name} must be a positive int. Received: {value}")


def check_units(units: list[int] | tuple[int, ...], name: str) -> None:
    if not units or any(int(u) < 1 for u in units):
        raise ValueError(f"{name} must be a non-empty list of positive ints. Received: {list(units)}")


def nested_layers(model: keras.layers.Layer):
    """Every layer of `model`, descending into nested models (e.g. ensemble members)."""
    for layer in getattr(model, "layers", []):
        yield layer
        yield from nested_layers(layer)
