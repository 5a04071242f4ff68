"""Load a TFDS dataset into train / validation / test tf.data pipelines.

Any TFDS dataset with an image and a class label works (`dataset.name=mnist` on a
machine with network). `digits`, the default, ships with this project and needs none.
A dataset is prepared once into `dataset.data_dir` and read with `download=False` ever
after.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

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
    _check_download_hosts(builder)
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


def _check_download_hosts(builder: tfds.core.DatasetBuilder) -> None:
    """Fail in seconds, not after TFDS's minutes of retries, when a host is unreachable."""
    hosts = {(urlparse(url).hostname, urlparse(url).port or (443 if url.startswith("https") else 80))
             for url in (builder.url_infos or {})}
    for host, port in sorted(hosts):
        try:
            socket.create_connection((host, port), timeout=10).close()
        except OSError as error:
            raise DatasetError(
                f"dataset {builder.name!r} is not prepared in {builder.data_dir} and cannot be downloaded "
                f"here ({host}: {error}). Prepare it where there is network (`tfds build {builder.name} "
                f"--data_dir DIR`), copy DIR here and set dataset.data_dir=DIR"
            ) from None


def load(cfg: DictConfig, seed: int) -> Splits:
    """Build the three pipelines for `cfg` (the `dataset` config group).

    The validation set is the last `cfg.val_fraction` of the (hash-shuffled, fixed)
    TFDS train split, so it is the same examples in every run.
    """
    builder = prepared_builder(cfg)
    info = builder.info
    input_spec = input_spec_of(info)
    missing = {"train", "test"} - set(info.splits)
    if missing:
        raise DatasetError(f"dataset {cfg.name!r} has no {' or '.join(sorted(missing))} split "
                           f"(it has: {', '.join(info.splits)}); this pipeline needs both")

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
        train=batched(raw["train"], batch, cfg.cache, shuffle_buffer=cfg.shuffle_buffer, seed=seed),
        val=batched(raw["val"], batch, cfg.cache) if num_val else None,
        test=batched(raw["test"], batch, cfg.cache),
        input_spec=input_spec,
        sizes=sizes,
        steps_per_epoch=math.ceil(sizes["train"] / batch),
        info=info,
    )


def input_spec_of(info: tfds.core.DatasetInfo) -> InputSpec:
    """What a builder needs from a TFDS dataset's supervised keys: either (image, label),
    or ({"image", "features"}, {label name: label}) for a multimodal dataset."""
    keys = info.supervised_keys
    if not keys or len(keys) != 2:
        raise DatasetError(f"dataset {info.name!r} has no (inputs, labels) supervised keys")
    inputs, labels = keys
    image_key = inputs if isinstance(inputs, str) else inputs.get("image") if isinstance(inputs, dict) else None
    if image_key is None:
        raise DatasetError(f"dataset {info.name!r}: supervised keys {keys} are neither (image, label) "
                           "nor ({image, features}, {labels})")
    image = info.features[image_key]
    if None in image.shape:
        raise DatasetError(f"dataset {info.name!r}: images must have a fixed shape; resize them in the "
                           f"dataset first. Received: {image.shape}")
    if isinstance(inputs, str) and isinstance(labels, str):
        return InputSpec(shape=tuple(int(d) for d in image.shape), dtype=np.dtype(image.np_dtype).name,
                         num_classes=int(info.features[labels].num_classes))
    if isinstance(inputs, dict) and isinstance(labels, dict) and set(inputs) == {"image", "features"}:
        features = info.features[inputs["features"]]
        return InputSpec(
            shape=tuple(int(d) for d in image.shape),
            dtype=np.dtype(image.np_dtype).name,
            num_classes=0,
            features=int(features.shape[-1]),
            heads=tuple((name, int(info.features[key].num_classes)) for name, key in labels.items()),
        )
    raise DatasetError(f"dataset {info.name!r}: supervised keys {keys} are neither (image, label) "
                       "nor ({image, features}, {labels})")


def batched(
    ds: tf.data.Dataset,
    batch_size: int,
    cache: bool,
    shuffle_buffer: int | None = None,
    seed: int | None = None,
) -> tf.data.Dataset:
    # Images stay in their raw dtype: the model rescales them, so the same model serves
    # raw images after export. Multimodal elements are ({image, features}, {labels}).
    if cache:
        ds = ds.cache()  # decoded examples in memory: decode once, not every epoch
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
