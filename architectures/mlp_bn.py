"""`mlp_bn`: a Sequential MLP built layer by layer with `.add()`, batch-normalized.

Rescale -> Flatten -> Dense 128 relu -> BatchNorm -> Dropout 0.3 -> Dense 64 relu
-> Dropout 0.2 -> softmax.
"""

from __future__ import annotations

import keras

from architectures.common import InputSpec, check_dropout, check_positive_int, classifier_head, image_layers

# Builds for a flat feature vector too: trains on tables (architectures/columns.py).
TABULAR = True


def build(
    input_spec: InputSpec,
    *,
    units_1: int = 128,
    dropout_1: float = 0.3,
    units_2: int = 64,
    dropout_2: float = 0.2,
    activation: str = "relu",
) -> keras.Model:
    """Build the batch-normalized Sequential multilayer perceptron.

    Args:
        input_spec: image shape, raw dtype and class count of the dataset.
        units_1: width of the first, batch-normalized, hidden Dense layer.
        dropout_1: rate of the Dropout after the first hidden layer, in [0, 1).
        units_2: width of the second hidden Dense layer.
        dropout_2: rate of the Dropout after the second hidden layer, in [0, 1).
        activation: activation of the hidden layers.

    Returns:
        An uncompiled `keras.Sequential` mapping raw images (B, *shape) to float32
        class probabilities (B, num_classes).
    """
    check_positive_int(units_1, "units_1")
    check_positive_int(units_2, "units_2")
    check_dropout(dropout_1, "dropout_1")
    check_dropout(dropout_2, "dropout_2")

    model = keras.Sequential(name="mlp_bn")
    for layer in image_layers(input_spec):
        model.add(layer)
    model.add(keras.layers.Flatten(name="flatten"))
    model.add(keras.layers.Dense(int(units_1), activation=activation, name="dense_1"))
    model.add(keras.layers.BatchNormalization(name="batch_norm_1"))
    model.add(keras.layers.Dropout(dropout_1, name="dropout_1"))
    model.add(keras.layers.Dense(int(units_2), activation=activation, name="dense_2"))
    model.add(keras.layers.Dropout(dropout_2, name="dropout_2"))
    model.add(classifier_head(input_spec.num_classes))
    return model
