"""`mlp`: the tutorial's Sequential MNIST classifier.

Rescale -> Flatten -> Dense 512 relu -> Dropout 0.2 -> Dense 256 relu -> Dropout 0.2 -> softmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from architectures.common import InputSpec, check_dropout, check_units, classifier_head, image_layers

# Builds for a flat feature vector too: trains on tables (architectures/columns.py).
TABULAR = True


def build(
    input_spec: InputSpec,
    *,
    hidden_units: Sequence[int] = (512, 256),
    dropout: float = 0.2,
    activation: str = "relu",
) -> keras.Model:
    """Build the Sequential multilayer perceptron.

    Args:
        input_spec: image shape, raw dtype and class count of the dataset.
        hidden_units: width of each hidden Dense layer, input side first.
        dropout: rate of the Dropout after every hidden layer, in [0, 1).
        activation: activation of the hidden layers.

    Returns:
        An uncompiled `keras.Sequential` mapping raw images (B, *shape) to float32
        class probabilities (B, num_classes).
    """
    check_units(hidden_units, "hidden_units")
    check_dropout(dropout)
    layers: list[keras.layers.Layer] = [*image_layers(input_spec), keras.layers.Flatten(name="flatten")]
    for index, units in enumerate(hidden_units, start=1):
        layers += [
            keras.layers.Dense(int(units), activation=activation, name=f"dense_{index}"),
            keras.layers.Dropout(dropout, name=f"dropout_{index}"),
        ]
    layers.append(classifier_head(input_spec.num_classes))
    return keras.Sequential(layers, name="mlp")
