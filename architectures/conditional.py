"""`conditional`: one of two single-hidden-layer classifiers, chosen by config.

Rescale -> Flatten -> branch -> softmax, where `branch` is
  relu: Dense 128 relu -> Dropout
  tanh: Dense 64 tanh -> Dropout
"""

from __future__ import annotations

import keras

from architectures.common import InputSpec, check_dropout, classifier_head, image_input

# Builds for a flat feature vector too: trains on tables (architectures/columns.py).
TABULAR = True

# branch name -> (hidden units, activation)
BRANCHES = {"relu": (128, "relu"), "tanh": (64, "tanh")}


def build(input_spec: InputSpec, *, branch: str = "relu", dropout: float = 0.2) -> keras.Model:
    """Build the classifier with the chosen hidden branch.

    Args:
        input_spec: image shape, raw dtype and class count of the dataset.
        branch: "relu" (Dense 128 relu) or "tanh" (Dense 64 tanh).
        dropout: rate of the Dropout after the hidden layer, in [0, 1).

    Returns:
        An uncompiled Functional `keras.Model` mapping raw images (B, *shape) to
        float32 class probabilities (B, num_classes).
    """
    if not isinstance(branch, str) or branch not in BRANCHES:
        raise ValueError(f"branch must be one of {sorted(BRANCHES)}. Received: {branch!r}")
    check_dropout(dropout)

    units, activation = BRANCHES[branch]
    inputs, x = image_input(input_spec)
    x = keras.layers.Flatten(name="flatten")(x)  # (B, prod(shape))
    x = keras.layers.Dense(units, activation=activation, name=f"{branch}_dense")(x)  # (B, units)
    x = keras.layers.Dropout(dropout, name=f"{branch}_dropout")(x)
    outputs = classifier_head(input_spec.num_classes)(x)
    return keras.Model(inputs, outputs, name="conditional")
