"""`residual_mlp`: an MLP of residual blocks over the flattened image.

Each block is Dense -> Dense, added to its input, then the activation:
    x <- act(shortcut(x) + Dense(Dense(x)))
where the shortcut is the identity when the width is unchanged and a linear Dense
projection when it differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from architectures.common import InputSpec, check_dropout, check_units, classifier_head, image_input

# Builds for a flat feature vector too: trains on tables (architectures/columns.py).
TABULAR = True


def build(
    input_spec: InputSpec,
    *,
    widths: Sequence[int] = (64, 64, 128),
    dropout: float = 0.1,
    activation: str = "relu",
) -> keras.Model:
    """Build the residual MLP.

    Args:
        input_spec: image shape, raw dtype and class count of the dataset.
        widths: output width of each residual block, input side first.
        dropout: rate of the Dropout after every block, in [0, 1).
        activation: activation inside and after every block.

    Returns:
        An uncompiled Functional `keras.Model` mapping raw images (B, *shape) to
        float32 class probabilities (B, num_classes).
    """
    check_units(widths, "widths")
    check_dropout(dropout)

    inputs, scaled = image_input(input_spec)
    x = keras.layers.Flatten(name="flatten")(scaled)  # (B, H*W*C)
    for index, width in enumerate(widths, start=1):
        width, name = int(width), f"block_{index}"
        # Add needs equal widths: project the input only when the block changes it.
        shortcut = x if x.shape[-1] == width else keras.layers.Dense(width, name=f"{name}_projection")(x)
        residual = keras.layers.Dense(width, activation=activation, name=f"{name}_dense_1")(x)
        residual = keras.layers.Dense(width, name=f"{name}_dense_2")(residual)  # activated after the sum
        x = keras.layers.Add(name=f"{name}_add")([shortcut, residual])  # (B, width)
        x = keras.layers.Activation(activation, name=f"{name}_activation")(x)
        x = keras.layers.Dropout(dropout, name=f"{name}_dropout")(x)
    outputs = classifier_head(input_spec.num_classes)(x)
    return keras.Model(inputs, outputs, name="residual_mlp")
