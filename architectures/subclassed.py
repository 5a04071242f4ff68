"""`subclassed`: an MLP written as a `keras.Model` subclass, the imperative style.

Rescale -> Flatten -> [Dense relu -> Dropout] x N -> softmax, with `call` passing
`training` to every Dropout explicitly. Registered serializable with `get_config` /
`from_config`, so `.keras` files reload it and `model.export()` serves raw images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from architectures.common import InputSpec, check_dropout, check_units, classifier_head

# Builds for a flat feature vector too: trains on tables (architectures/columns.py).
TABULAR = True


@keras.saving.register_keras_serializable(package="architectures")
class SubclassedMLP(keras.Model):
    """Raw images (B, *shape) -> float32 class probabilities (B, num_classes).

    Args:
        num_classes: size of the softmax output.
        hidden_units: width of each hidden Dense layer, input side first.
        dropout: rate of the Dropout after every hidden layer, in [0, 1).
        activation: activation of the hidden layers.
        max_value: largest raw pixel value; inputs are rescaled by 1 / max_value.
        **kwargs: base `Model` arguments (name, ...).
    """

    def __init__(
        self,
        num_classes: int,
        hidden_units: Sequence[int] = (128, 64),
        dropout: float = 0.2,
        activation: str = "relu",
        max_value: float = 255.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.hidden_units = [int(units) for units in hidden_units]
        self.dropout = float(dropout)
        self.activation = activation
        self.max_value = float(max_value)
        self.rescale = keras.layers.Rescaling(1.0 / self.max_value, name="rescale")
        self.flatten = keras.layers.Flatten(name="flatten")
        self.hidden = [
            keras.layers.Dense(units, activation=activation, name=f"dense_{index}")
            for index, units in enumerate(self.hidden_units, start=1)
        ]
        self.dropouts = [
            keras.layers.Dropout(self.dropout, name=f"dropout_{index}")
            for index in range(1, len(self.hidden_units) + 1)
        ]
        self.head = classifier_head(self.num_classes)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        x = self.flatten(self.rescale(inputs))  # (B, H*W*C), cast from the raw dtype by Rescaling
        for dense, dropout in zip(self.hidden, self.dropouts):
            x = dropout(dense(x), training=training)  # active only when training
        return self.head(x)  # (B, num_classes)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "hidden_units": self.hidden_units,
            "dropout": self.dropout,
            "activation": self.activation,
            "max_value": self.max_value,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SubclassedMLP:
        return cls(**config)


def build(
    input_spec: InputSpec,
    *,
    hidden_units: Sequence[int] = (128, 64),
    dropout: float = 0.2,
    activation: str = "relu",
) -> keras.Model:
    """Build the subclassed MLP with its weights already created.

    Args:
        input_spec: image shape, raw dtype and class count of the dataset.
        hidden_units: width of each hidden Dense layer, input side first.
        dropout: rate of the Dropout after every hidden layer, in [0, 1).
        activation: activation of the hidden layers.

    Returns:
        An uncompiled, built `SubclassedMLP` mapping raw images (B, *shape) to float32
        class probabilities (B, num_classes).
    """
    check_units(hidden_units, "hidden_units")
    check_dropout(dropout)
    model = SubclassedMLP(
        input_spec.num_classes,
        hidden_units=hidden_units,
        dropout=dropout,
        activation=activation,
        max_value=input_spec.max_value,
        name="subclassed",
    )
    # A subclassed model has no weights until first called; one symbolic call on a raw-image
    # Input creates them (Model.build would not), so count_params() and export work at once.
    model(keras.Input(shape=input_spec.shape, dtype=input_spec.dtype))
    return model
