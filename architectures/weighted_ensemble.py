"""`weighted_ensemble`: member architectures combined by learned softmax weights.

raw images -> each member model -> SoftmaxWeightedAverage -> probabilities, where the
weights softmax(logits) start equal and are trained with the members. The per-epoch
MLflow logger records them as `ensemble_weight_<member>` through `logged_values()`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import keras

from architectures.common import InputSpec
from architectures.members import ensemble_model

# Builds for a flat feature vector when its members do: trains on tables (architectures/columns.py).
TABULAR = True


@keras.saving.register_keras_serializable(package="architectures")
class SoftmaxWeightedAverage(keras.layers.Layer):
    """sum_i softmax(logits)_i * p_i over member probabilities p_i, one logit per member.

    Computes in float32 unless given another dtype: it produces the model's final
    probabilities, which must stay float32 under mixed precision.

    Args:
        member_names: one name per input tensor, in order; names the logged weights.
    """

    def __init__(self, member_names: Sequence[str], **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if len(member_names) < 2:
            raise ValueError(f"member_names must name at least 2 members. Received: {list(member_names)}")
        self.member_names = [str(name) for name in member_names]

    def build(self, input_shape: Sequence[tuple[int | None, ...]]) -> None:
        if len(input_shape) != len(self.member_names):
            raise ValueError(f"SoftmaxWeightedAverage expects one input per member "
                             f"({len(self.member_names)}). Received: {len(input_shape)} inputs")
        # Zeros: equal weights 1/M at the start, i.e. the plain average.
        self.logits = self.add_weight(name="member_logits", shape=(len(self.member_names),), initializer="zeros")

    def call(self, inputs: Sequence[keras.KerasTensor]) -> keras.KerasTensor:
        stacked = keras.ops.stack(inputs, axis=-1)  # (B, C, M)
        weights = keras.ops.softmax(self.logits)  # (M,), sums to 1
        return keras.ops.sum(stacked * weights, axis=-1)  # (B, C)

    def compute_output_shape(self, input_shape: Sequence[tuple[int | None, ...]]) -> tuple[int | None, ...]:
        return tuple(input_shape[0])

    def logged_values(self) -> dict[str, float]:
        """The current member weights softmax(logits) as `ensemble_weight_<member>` metrics."""
        weights = keras.ops.convert_to_numpy(keras.ops.softmax(self.logits))
        return {f"ensemble_weight_{name}": float(weight) for name, weight in zip(self.member_names, weights)}

    def get_config(self) -> dict[str, Any]:
        return super().get_config() | {"member_names": self.member_names}


def build(
    input_spec: InputSpec,
    *,
    members: Sequence[str] = ("mlp", "dynamic", "conditional"),
    member_overrides: Mapping[str, Mapping[str, Any]] = MappingProxyType({}),  # read-only {}
) -> keras.Model:
    """Build the ensemble with trainable softmax member weights.

    Args:
        input_spec: image shape, raw dtype and class count of the dataset; every
            member is built with it.
        members: at least 2 distinct architecture names (modules of architectures/).
        member_overrides: member name -> hyperparameters passed to that member's
            `build`, e.g. {"mlp": {"dropout": 0.3}}; {} keeps every default.

    Returns:
        An uncompiled Functional `keras.Model` mapping raw images (B, *shape) to the
        float32 weighted mean of the members' class probabilities (B, num_classes).
    """
    return ensemble_model(input_spec, members, member_overrides,
                          lambda names: SoftmaxWeightedAverage(names, name="probabilities"), "weighted_ensemble")
