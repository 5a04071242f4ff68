"""Members of the `ensemble` and `weighted_ensemble` families: check the requested
architecture names and their overrides, then build each member on one shared input.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras

import architectures
from architectures.common import InputSpec

# Modules of architectures/ that hold shared code, not a model family.
HELPER_MODULES = frozenset({"common", "members"})


def families() -> list[str]:
    """Names of every model family: the modules of architectures/ except the helpers."""
    return sorted(
        module.name for module in pkgutil.iter_modules(architectures.__path__)
        if module.name not in HELPER_MODULES and not module.name.startswith("_")
    )


def _builder(name: str) -> Callable[..., keras.Model]:
    return importlib.import_module(f"architectures.{name}").build


def check_members(
    members: Sequence[str], member_overrides: Mapping[str, Mapping[str, Any]]
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Validate the member list and overrides; raise `ValueError` naming the bad value.

    Returns:
        (names, overrides) as plain Python: the member names in order, and
        name -> hyperparameters for the members that have overrides.
    """
    if isinstance(members, str) or len(members) < 2:
        raise ValueError(f"members must list at least 2 architecture names. Received: {members!r}")
    names = [str(name) for name in members]
    if len(set(names)) != len(names):
        # Overrides are keyed by name, so a repeated member would be an identical copy.
        raise ValueError(f"members must not repeat an architecture. Received: {names}")
    available = families()
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"members must be architectures ({', '.join(available)}). Received: {unknown}")
    if not isinstance(member_overrides, Mapping):
        raise ValueError(f"member_overrides must map member names to hyperparameters. Received: {member_overrides!r}")

    overrides: dict[str, dict[str, Any]] = {}
    for name, hyperparameters in member_overrides.items():
        if name not in names:
            raise ValueError(f"member_overrides keys must be members ({', '.join(names)}). Received: {name!r}")
        if not isinstance(hyperparameters, Mapping):
            raise ValueError(f"member_overrides.{name} must map hyperparameters to values. "
                             f"Received: {hyperparameters!r}")
        accepted = list(inspect.signature(_builder(name)).parameters)[1:]  # after input_spec
        for key in hyperparameters:
            if key not in accepted:
                raise ValueError(f"member_overrides.{name}.{key} is not a hyperparameter of "
                                 f"architectures.{name}.build. Accepted: {', '.join(accepted)}")
        overrides[str(name)] = dict(hyperparameters)
    return names, overrides


def member_probabilities(
    inputs: keras.KerasTensor,
    input_spec: InputSpec,
    names: Sequence[str],
    overrides: Mapping[str, Mapping[str, Any]],
) -> list[keras.KerasTensor]:
    """Build every member with its overrides and call it, as a sub-model, on `inputs`.

    Args:
        inputs: the ensemble's raw-image `keras.Input`; each member rescales it itself.
        input_spec: passed to every member's `build`.
        names, overrides: as returned by `check_members`.

    Returns:
        One float32 (B, num_classes) probability tensor per member, in `names` order.
    """
    probabilities = []
    for name in names:
        try:
            member = _builder(name)(input_spec, **overrides.get(name, {}))
        except ValueError as error:  # a member's own check, e.g. a bad override value
            raise ValueError(f"ensemble member {name!r}: {error}") from error
        # Named by family, not by its builder's choice: sub-model names must be unique
        # in the ensemble, and the family name is what users wrote in `members`.
        member.name = name
        probabilities.append(member(inputs))
    return probabilities


def ensemble_model(
    input_spec: InputSpec,
    members: Sequence[str],
    member_overrides: Mapping[str, Mapping[str, Any]],
    combine: Callable[[list[str]], keras.layers.Layer],
    name: str,
) -> keras.Model:
    """raw images -> every member -> `combine(member names)` -> probabilities.

    Args:
        input_spec, members, member_overrides: as the ensembles' `build` takes them.
        combine: makes the layer that merges the M member outputs (B, num_classes) into
            float32 probabilities (B, num_classes), given the member names.
        name: the model's name.
    """
    names, overrides = check_members(members, member_overrides)
    inputs = keras.Input(shape=input_spec.shape, dtype=input_spec.dtype, name="image")
    probabilities = member_probabilities(inputs, input_spec, names, overrides)  # M x (B, num_classes)
    return keras.Model(inputs, combine(names)(probabilities), name=name)
