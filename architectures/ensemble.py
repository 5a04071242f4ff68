"""`ensemble`: the plain average of member architectures' class probabilities.

raw images -> each member model (its own rescaling and head) -> Average -> probabilities.
Members are other families of architectures/, named in the config and trained jointly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import keras

from architectures.common import InputSpec
from architectures.members import check_members, member_probabilities


def build(
    input_spec: InputSpec,
    *,
    members: Sequence[str] = ("mlp", "dynamic", "conditional"),
    member_overrides: Mapping[str, Mapping[str, Any]] = MappingProxyType({}),  # read-only {}
) -> keras.Model:
    """Build the averaging ensemble.

    Args:
        input_spec: image shape, raw dtype and class count of the dataset; every
            member is built with it.
        members: at least 2 distinct architecture names (modules of architectures/).
        member_overrides: member name -> hyperparameters passed to that member's
            `build`, e.g. {"mlp": {"dropout": 0.3}}; {} keeps every default.

    Returns:
        An uncompiled Functional `keras.Model` mapping raw images (B, *shape) to the
        float32 mean of the members' class probabilities (B, num_classes).
    """
    names, overrides = check_members(members, member_overrides)

    inputs = keras.Input(shape=input_spec.shape, dtype=input_spec.dtype, name="image")
    probabilities = member_probabilities(inputs, input_spec, names, overrides)  # M x (B, num_classes)
    # float32 like every member's head: under mixed precision Average would otherwise
    # cast the probabilities down to bfloat16/float16.
    outputs = keras.layers.Average(dtype="float32", name="probabilities")(probabilities)
    return keras.Model(inputs, outputs, name="ensemble")
