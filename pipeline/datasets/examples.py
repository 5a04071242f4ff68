"""What every dataset kind hands the training pipeline: unbatched examples per split, and
what the model and the run's records need to know about them.

The kinds (`conf/dataset/`): a prepared TFDS dataset (`tfds_dataset.Tfds`), a folder of
images (`image_folder.ImageFolder`), a CSV table (`csv_table.CsvTable`). Each is a class
named by the option's `_target_`, built from its keys, whose `read(cache)` returns
`Examples`; `pipeline.data` batches, shuffles and caches them the same way for all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf

    from architectures.common import InputSpec

# dataset.cache: where decoded examples live between epochs.
CACHE_MODES = ("memory", "disk", "none")
ROLES = ("train", "val", "test")


@dataclass(frozen=True)
class Lineage:
    """What MLflow records of the data a run trained on (`pipeline.tracking.provenance`).

    Args:
        name: e.g. "digits", or a folder's or CSV file's name.
        version: a TFDS version ("1.0.0"), or the first 8 hex digits of `digest` for
            files, so that a changed folder or table is a new dataset version.
        kind: "tfds", "image_folder" or "csv".
        location: the prepared TFDS directory, the folder or the file.
        digest: a hash of what was read: for files, their relative paths, sizes and
            modification times; for TFDS, name and version (its versions are immutable).
    """

    name: str
    version: str
    kind: str
    location: str | None
    digest: str


@dataclass(frozen=True)
class Examples:
    """A dataset read for training.

    Args:
        roles: role ("train", "test", and "val" unless there is no validation split) ->
            unbatched (inputs, label) examples, in a fixed order.
        sizes: role -> number of examples.
        input_spec: what the model builders need (`architectures.common.InputSpec`).
        class_names: the name of each class, in the order of the model's output columns
            (empty for multi-label datasets).
        lineage: what MLflow records of the data.
        skipped: files left out as unreadable (`on_bad_file=skip`), relative to the dataset.
        label_names: for multi-label datasets, each label's class names.
    """

    roles: Mapping[str, tf.data.Dataset]
    sizes: Mapping[str, int]
    input_spec: InputSpec
    class_names: tuple[str, ...]
    lineage: Lineage
    skipped: tuple[str, ...] = ()
    label_names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def hash_fraction(key: str) -> float:
    """A number in [0, 1) fixed by `key` alone (e.g. a file's path relative to its
    folder): the same on every machine and in every run, unlike Python's `hash`."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def role_by_hash(key: str, test_fraction: float, val_fraction: float) -> str:
    """The split of the example named `key`: "test" for the first `test_fraction` of the
    hash range, "val" for the next `val_fraction`, else "train". Adding examples never
    moves another between splits."""
    fraction = hash_fraction(key)
    if fraction < test_fraction:
        return "test"
    if fraction < test_fraction + val_fraction:
        return "val"
    return "train"


def check_fractions(test_fraction: float, val_fraction: float) -> None:
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1). Received: {test_fraction}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1). Received: {val_fraction}")
    if test_fraction + val_fraction >= 1:
        raise ValueError(f"test_fraction + val_fraction must be < 1: nothing would be left to train on. "
                         f"Received: {test_fraction} + {val_fraction}")


def class_order(names: set[str] | list[str]) -> tuple[str, ...]:
    """Class names in the order of the model's outputs: numerically when every name is an
    integer (so "10" comes after "9"), else alphabetically, as Keras orders folders."""
    names = set(names)
    if all(name.lstrip("-").isdigit() for name in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))
