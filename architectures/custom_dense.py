"""`custom_dense`: an MLP of hand-written Dense layers (a `keras.layers.Layer` subclass).

Rescale -> Flatten -> SimpleDense 64 relu -> SimpleDense 32 relu -> softmax. `SimpleDense`
is the subclassing tutorial's layer: weights from `add_weight`, `get_config` for saving,
registered so a `.keras` file reloads it by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from architectures.common import InputSpec, check_positive_int, check_units, classifier_head, image_input

# Builds for a flat feature vector too: trains on tables (architectures/columns.py).
TABULAR = True


@keras.saving.register_keras_serializable(package="architectures")
class SimpleDense(keras.layers.Layer):
    """`activation(inputs @ kernel + bias)`, written out by hand.

    Args:
        units: output width.
        activation: name or callable of the activation; None for linear.
        **kwargs: base `Layer` arguments (name, dtype, ...).
    """

    def __init__(self, units: int, activation: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_positive_int(units, "units")
        self.units = int(units)
        self.activation = keras.activations.get(activation)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        # Weights are created here, not in __init__, because the input width is known only now.
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), initializer="glorot_uniform", name="kernel")
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")

    def call(self, inputs: Any) -> Any:
        return self.activation(keras.ops.matmul(inputs, self.kernel) + self.bias)  # (B, units)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (*input_shape[:-1], self.units)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": self.units,
                "activation": keras.activations.serialize(self.activation)}


def build(
    input_spec: InputSpec,
    *,
    hidden_units: Sequence[int] = (64, 32),
    activation: str = "relu",
) -> keras.Model:
    """Build the MLP of `SimpleDense` layers.

    Args:
        input_spec: image shape, raw dtype and class count of the dataset.
        hidden_units: width of each hidden `SimpleDense` layer, input side first.
        activation: activation of the hidden layers.

    Returns:
        An uncompiled Functional `keras.Model` mapping raw images (B, *shape) to
        float32 class probabilities (B, num_classes).
    """
    check_units(hidden_units, "hidden_units")

    inputs, scaled = image_input(input_spec)
    x = keras.layers.Flatten(name="flatten")(scaled)  # (B, H*W*C)
    for index, units in enumerate(hidden_units, start=1):
        x = SimpleDense(units, activation=activation, name=f"simple_dense_{index}")(x)
    outputs = classifier_head(input_spec.num_classes)(x)
    return keras.Model(inputs, outputs, name="custom_dense")
