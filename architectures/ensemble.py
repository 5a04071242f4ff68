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
from architectures.members import ensemble_model

# Builds for a flat feature vector when its members do: trains on tables (architectures/columns.py).
TABULAR = True


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
    # float32 like every member's head: under mixed precision Average would otherwise
    # cast the probabilities down to bfloat16/float16.
    return ensemble_model(input_spec, members, member_overrides,
                          lambda names: keras.layers.Average(dtype="float32", name="probabilities"), "ensemble")
