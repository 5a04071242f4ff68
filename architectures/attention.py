"""`attention`: attention pooling over the image read as a sequence of rows.

The (H, W, C) image becomes H timesteps of W*C features. Each row is embedded by a shared
Dense layer, a learned position embedding tells the rows apart, and `AttentionPooling`
(the tutorial's layer: tanh projection, learned context vector, softmax over time,
weighted sum) reduces the sequence to one vector, layer-normalized for the softmax head.
"""

from __future__ import annotations

from typing import Any

import keras

from architectures.common import InputSpec, check_dropout, check_positive_int, classifier_head, image_input


@keras.saving.register_keras_serializable(package="architectures")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned vector per timestep: (B, T, D) -> (B, T, D).

    T and D come from the input at build time, so the layer has no arguments of its own
    and the inherited `get_config` is complete.

    Args:
        **kwargs: base `Layer` arguments (name, dtype, ...).
    """

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.embeddings = self.add_weight(shape=input_shape[-2:], initializer="random_normal", name="embeddings")

    def call(self, inputs: Any) -> Any:
        return inputs + self.embeddings  # (B, T, D) + (T, D)


@keras.saving.register_keras_serializable(package="architectures")
class AttentionPooling(keras.layers.Layer):
    """Softmax-weighted sum over time: (B, T, D) -> (B, D).

    score_t = context . tanh(x_t W + b); weights = softmax_t(score); output = sum_t weights_t x_t.

    Args:
        units: width of the tanh projection the context vector scores.
        **kwargs: base `Layer` arguments (name, dtype, ...).
    """

    def __init__(self, units: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_positive_int(units, "units")
        self.units = int(units)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), initializer="glorot_uniform", name="kernel")
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")
        self.context = self.add_weight(shape=(self.units,), initializer="glorot_uniform", name="context")

    def call(self, inputs: Any) -> Any:
        projected = keras.ops.tanh(keras.ops.matmul(inputs, self.kernel) + self.bias)  # (B, T, units)
        scores = keras.ops.einsum("btu,u->bt", projected, self.context)  # (B, T)
        weights = keras.ops.softmax(scores, axis=1)  # (B, T), sums to 1 over time
        return keras.ops.einsum("bt,btd->bd", weights, inputs)  # (B, D)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": self.units}


def build(
    input_spec: InputSpec,
    *,
    embed_dim: int = 128,
    attention_units: int = 64,
    dropout: float = 0.1,
    activation: str = "relu",
) -> keras.Model:
    """Build the row-sequence attention-pooling classifier.

    Args:
        input_spec: image shape (H, W, C), raw dtype and class count of the dataset.
        embed_dim: width of each row's embedding, and so of the pooled vector.
        attention_units: width of the tanh projection inside `AttentionPooling`.
        dropout: rate of the Dropout on the normalized pooled vector, in [0, 1).
        activation: applied to row embedding plus position embedding.

    Returns:
        An uncompiled Functional `keras.Model` mapping raw images (B, H, W, C) to
        float32 class probabilities (B, num_classes).
    """
    if len(input_spec.shape) != 3:
        raise ValueError(f"input_spec.shape must be (H, W, C). Received: {input_spec.shape}")
    check_positive_int(embed_dim, "embed_dim")
    check_positive_int(attention_units, "attention_units")
    check_dropout(dropout)
    height, width, channels = input_spec.shape

    inputs, scaled = image_input(input_spec)
    rows = keras.layers.Reshape((height, width * channels), name="rows")(scaled)  # (B, H, W*C)
    x = keras.layers.Dense(int(embed_dim), name="row_embedding")(rows)  # (B, H, D), shared across rows
    x = PositionEmbedding(name="position_embedding")(x)  # (B, H, D)
    # Activate after adding positions, so the same row pattern yields different features at different heights.
    x = keras.layers.Activation(activation, name="row_activation")(x)
    x = AttentionPooling(attention_units, name="attention_pooling")(x)  # (B, D)
    # A softmax-weighted average is small and varies little between images; normalizing
    # it lets the head see the differences (digits: test accuracy ~0.75 -> ~0.95 in 20 epochs).
    x = keras.layers.LayerNormalization(name="pooled_norm")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = classifier_head(input_spec.num_classes)(x)
    return keras.Model(inputs, outputs, name="attention")
