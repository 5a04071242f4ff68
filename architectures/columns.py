"""Tables: the model takes a table's raw columns by name and encodes them itself.

A family that declares `TABULAR = True` builds its usual model for a flat feature
vector (`InputSpec.shape == (features,)`); `with_column_inputs` puts the encoding in
front of it:

    raw columns {key: (B, 1)} -> standardize the numeric ones (Normalization, the training
    split's mean and variance) and one-hot the categorical ones (StringLookup, the
    training split's categories plus one slot for an unseen value) -> (B, features)
    float32 -> the family's model -> (B, classes) probabilities

so the exported model takes the columns as they are in the CSV file.
"""

from __future__ import annotations

import keras

from architectures.common import Column, InputSpec


def encoded_width(columns: tuple[Column, ...]) -> int:
    """Length of the feature vector `columns` encode to."""
    return sum(column.width for column in columns)


def column_inputs(input_spec: InputSpec) -> tuple[dict[str, keras.KerasTensor], keras.KerasTensor]:
    """The raw column inputs and their encoding.

    Returns:
        (inputs, features): `inputs` maps each column's key to its (B, 1) float32 or
        string input; `features` is (B, encoded_width) float32, numeric columns first.
    """
    columns = input_spec.columns
    inputs = {column.key: keras.Input(shape=(1,), dtype=column.dtype, name=column.key) for column in columns}
    parts = []
    numeric = [column for column in columns if column.dtype == "float32"]
    if numeric:
        stacked = inputs[numeric[0].key] if len(numeric) == 1 else keras.layers.Concatenate(name="numeric")(
            [inputs[column.key] for column in numeric])  # (B, numeric columns)
        parts.append(keras.layers.Normalization(mean=[c.mean for c in numeric], variance=[c.variance for c in numeric],
                                                name="standardize")(stacked))
    for column in columns:
        if column.dtype == "string":
            one_hot = keras.layers.StringLookup(vocabulary=list(column.vocabulary), output_mode="one_hot",
                                                name=f"one_hot_{column.key}")(inputs[column.key])  # (B, V + 1) int
            parts.append(keras.ops.cast(one_hot, "float32"))
    features = parts[0] if len(parts) == 1 else keras.layers.Concatenate(name="features")(parts)
    return inputs, features


def with_column_inputs(body: keras.Model, input_spec: InputSpec) -> keras.Model:
    """`body` (built for `input_spec.shape == (features,)`) behind the columns' encoding:
    a model that takes the raw columns, named after `body`."""
    if not input_spec.tabular:
        raise ValueError("with_column_inputs needs an InputSpec with columns. Received: no columns")
    if tuple(input_spec.shape) != (encoded_width(input_spec.columns),):
        raise ValueError(f"InputSpec.shape must be the columns' encoded width ({encoded_width(input_spec.columns)},). "
                         f"Received: {input_spec.shape}")
    inputs, features = column_inputs(input_spec)
    return keras.Model(inputs, body(features), name=body.name)
