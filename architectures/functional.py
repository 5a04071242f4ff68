"""`functional`: a two-branch Functional classifier.

Two views of the flattened image are learned side by side and concatenated:
    relu branch: Dense 128 relu -> Dropout -> Dense 64 relu
    tanh branch: Dense 64 tanh -> Dropout
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from architectures.common import (
    InputSpec,
    check_dropout,
    check_positive_int,
    check_units,
    classifier_head,
    image_input,
)

# Builds for a flat feature vector too: trains on tables (architectures/columns.py).
TABULAR = True


def build(
    input_spec: InputSpec,
    *,
    relu_units: Sequence[int] = (128, 64),
    tanh_units: int = 64,
    dropout: float = 0.2,
) -> keras.Model:
    """Build the two-branch Functional model.

    Args:
        input_spec: image shape, raw dtype and class count of the dataset.
        relu_units: widths of the relu branch's Dense layers, input side first; a
            Dropout sits between consecutive layers.
        tanh_units: width of the tanh branch's single Dense layer.
        dropout: rate of every Dropout, in [0, 1).

    Returns:
        An uncompiled Functional `keras.Model` mapping raw images (B, *shape) to
        float32 class probabilities (B, num_classes).
    """
    check_units(relu_units, "relu_units")
    check_positive_int(tanh_units, "tanh_units")
    check_dropout(dropout)

    inputs, scaled = image_input(input_spec)
    flat = keras.layers.Flatten(name="flatten")(scaled)  # (B, H*W*C)

    relu = flat
    for index, units in enumerate(relu_units, start=1):
        if index > 1:
            relu = keras.layers.Dropout(dropout, name=f"relu_dropout_{index - 1}")(relu)
        relu = keras.layers.Dense(int(units), activation="relu", name=f"relu_dense_{index}")(relu)

    tanh = keras.layers.Dense(int(tanh_units), activation="tanh", name="tanh_dense")(flat)
    tanh = keras.layers.Dropout(dropout, name="tanh_dropout")(tanh)

    merged = keras.layers.Concatenate(name="concat")([relu, tanh])  # (B, relu_units[-1] + tanh_units)
    outputs = classifier_head(input_spec.num_classes)(merged)
    return keras.Model(inputs, outputs, name="functional")
