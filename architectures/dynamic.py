"""`dynamic`: a multilayer perceptron whose depth and widths are data, not code.

Rescale -> Flatten -> [Dense(size) -> Dropout] for each size in `layer_sizes` -> softmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from architectures.common import InputSpec, check_dropout, classifier_head, image_input

# Builds for a flat feature vector too: trains on tables (architectures/columns.py).
TABULAR = True


def build(
    input_spec: InputSpec,
    *,
    layer_sizes: Sequence[int] = (256, 128, 64),
    dropout: float = 0.2,
    activation: str = "relu",
) -> keras.Model:
    """Build a Functional MLP with one hidden Dense + Dropout per entry of `layer_sizes`.

    Args:
        input_spec: image shape, raw dtype and class count of the dataset.
        layer_sizes: width of each hidden Dense layer, input side first; its length is
            the depth.
        dropout: rate of the Dropout after every hidden layer, in [0, 1).
        activation: activation of the hidden layers.

    Returns:
        An uncompiled Functional `keras.Model` mapping raw images (B, *shape) to
        float32 class probabilities (B, num_classes).
    """
    # Stricter than check_units: "128" or [64.5] would pass int(u) >= 1 and silently
    # build a different network.
    if (isinstance(layer_sizes, str) or not layer_sizes
            or any(isinstance(u, bool) or not isinstance(u, int) or u < 1 for u in layer_sizes)):
        raise ValueError(f"layer_sizes must be a non-empty list of positive ints. Received: {layer_sizes!r}")
    check_dropout(dropout)

    inputs, x = image_input(input_spec)
    x = keras.layers.Flatten(name="flatten")(x)  # (B, prod(shape))
    for index, units in enumerate(layer_sizes, start=1):
        x = keras.layers.Dense(units, activation=activation, name=f"dense_{index}")(x)  # (B, units)
        x = keras.layers.Dropout(dropout, name=f"dropout_{index}")(x)
    outputs = classifier_head(input_spec.num_classes)(x)
    return keras.Model(inputs, outputs, name="dynamic")
