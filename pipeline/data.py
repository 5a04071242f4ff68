"""Load a TFDS dataset into train / validation / test tf.data pipelines.

Any TFDS dataset with an image and a class label works (`dataset.name=mnist` on a
machine with network). `digits`, the default, ships with this project and needs none.
A dataset is prepared once into `dataset.data_dir` and read with `download=False` ever
after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from omegaconf import DictConfig

import pipeline.datasets  # noqa: F401  (registers the project's own TFDS builders)
from architectures.common import InputSpec
from pipeline.errors import DatasetError


@dataclass
class Splits:
    """Batched pipelines of (image, label) plus what the model and the logs need to know."""

    train: tf.data.Dataset
    val: tf.data.Dataset | None
    test: tf.data.Dataset
    input_spec: InputSpec
    sizes: dict[str, int]
    steps_per_epoch: int
    info: tfds.core.DatasetInfo


def prepared_builder(cfg: DictConfig) -> tfds.core.DatasetBuilder:
    """The TFDS builder for `cfg.name`, prepared in `cfg.data_dir` if it was not yet."""
    try:
        builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DatasetError(f"dataset.name: no TFDS dataset is called {cfg.name!r}") from None
    if builder.is_prepared():
        return builder
    where = builder.data_dir
    if not cfg.prepare:
        raise DatasetError(
            f"dataset {cfg.name!r} is not prepared in {where} and dataset.prepare=false. "
            f"Prepare it with `tfds build {cfg.name} --data_dir {builder.data_dir_root}` "
            "or set dataset.prepare=true"
        )
    try:
        builder.download_and_prepare()
    except Exception as error:  # any network or build failure: say what to do instead
        reason = " ".join(str(error).split())[:300]
        raise DatasetError(
            f"dataset {cfg.name!r} is not prepared in {where} and preparing it failed "
            f"({type(error).__name__}: {reason}). Prepare it where there is network "
            f"(`tfds build {cfg.name} --data_dir DIR`) and point dataset.data_dir at DIR"
        ) from None
    return builder


def load(cfg: DictConfig, seed: int) -> Splits:
    """Build the three pipelines for `cfg` (the `dataset` config group).

    The validation set is the last `cfg.val_fraction` of the (hash-shuffled, fixed)
    TFDS train split, so it is the same examples in every run.
    """
    builder = prepared_builder(cfg)
    info = builder.info
    image_key, label_key = _supervised_keys(info, cfg.name)
    image_feature, label_feature = info.features[image_key], info.features[label_key]
    input_spec = InputSpec(
        shape=tuple(int(d) for d in image_feature.shape),
        dtype=np.dtype(image_feature.np_dtype).name,
        num_classes=int(label_feature.num_classes),
    )

    num_train = info.splits["train"].num_examples
    num_val = round(num_train * cfg.val_fraction)
    if num_train - num_val < 1:
        raise DatasetError(f"dataset {cfg.name!r}: train split has {num_train} examples, none left to train on")
    split_names = {"train": f"train[:{num_train - num_val}]", "test": "test"}
    if num_val:
        split_names["val"] = f"train[{num_train - num_val}:]"
    raw = {
        role: builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
        for role, split in split_names.items()
    }
    sizes = {role: int(info.splits[split].num_examples) for role, split in split_names.items()}
    for role, size in sizes.items():
        if size == 0:
            raise DatasetError(f"dataset {cfg.name!r}: split {split_names[role]!r} is empty")

    batch = cfg.batch_size
    return Splits(
        train=_batched(raw["train"], batch, cfg.cache, shuffle_buffer=cfg.shuffle_buffer, seed=seed),
        val=_batched(raw["val"], batch, cfg.cache) if num_val else None,
        test=_batched(raw["test"], batch, cfg.cache),
        input_spec=input_spec,
        sizes=sizes,
        steps_per_epoch=math.ceil(sizes["train"] / batch),
        info=info,
    )


def _supervised_keys(info: tfds.core.DatasetInfo, name: str) -> tuple[str, str]:
    keys = info.supervised_keys
    if not keys or len(keys) != 2 or not all(isinstance(k, str) for k in keys):
        raise DatasetError(f"dataset {name!r} has no (image, label) supervised keys")
    return keys[0], keys[1]


def _batched(
    ds: tf.data.Dataset,
    batch_size: int,
    cache: bool,
    shuffle_buffer: int | None = None,
    seed: int | None = None,
) -> tf.data.Dataset:
    # Images stay in their raw dtype: the model rescales them, so the same model serves
    # raw images after export.
    if cache:
        ds = ds.cache()  # decoded examples in memory: decode once, not every epoch
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
