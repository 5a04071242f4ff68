"""`dataset=tfds dataset.name=NAME`: any TFDS image-classification dataset, prepared in
`dataset.data_dir` (`tfds build NAME --data_dir DIR` on a machine with network).

The image and label features are the dataset's supervised keys, else its one `Image`
and one `ClassLabel` feature; `image_key` and `label_key` choose others. Images of
varying size are resized to `image_size`. `digits`, `synthetic_mnist`,
`synthetic_multimodal`, `mnist`, `fashion_mnist` and `cifar10` are presets of this
option (`conf/dataset/`); the first three ship with this project (`pipeline/datasets/`)
and prepare offline.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Sequence
from urllib.parse import urlparse

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from architectures.common import InputSpec
from pipeline.datasets import examples, images
from pipeline.datasets.examples import Examples, Lineage
from pipeline.errors import DatasetError, one_line

# For the functions handed to tf.data: none branches on a tensor, so AutoGraph would
# only rewrite their source, which costs time at every start.
graph_as_written = tf.autograph.experimental.do_not_convert


class Tfds:
    """A TFDS dataset with `train` and `test` splits; validation is the last
    `val_fraction` of `train`, the same examples in every run.

    Args:
        name: the TFDS name, e.g. "mnist", or "NAME:VERSION".
        data_dir: where it is prepared; None: TFDS's default (`$TFDS_DATA_DIR` or
            `~/tensorflow_datasets`).
        prepare: prepare it there first if it is not (downloads, unless it is one of
            this project's offline builders).
        val_fraction: the share of `train` that validates.
        image_key: the image feature; None: inferred.
        label_key: the label feature (a `ClassLabel`); None: inferred.
        image_size: [height, width] to resize images to; None: the images must share one size.
    """

    def __init__(self, name: str, data_dir: str | None = None, prepare: bool = False, val_fraction: float = 0.1,
                 image_key: str | None = None, label_key: str | None = None,
                 image_size: Sequence[int] | None = None) -> None:
        if image_size is not None and (len(image_size) != 2 or any(int(d) < 1 for d in image_size)):
            raise ValueError(f"image_size must be [height, width] of positive ints or null. Received: "
                             f"{list(image_size)}")
        examples.check_fractions(0.0, val_fraction)
        self.name, self.data_dir, self.prepare = name, data_dir, prepare
        self.val_fraction = float(val_fraction)
        self.image_key, self.label_key = image_key, label_key
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))

    def read(self, cache: str, roles: Sequence[str] = examples.ROLES) -> Examples:
        """The prepared dataset's train/val/test examples (`cache` is `pipeline.data`'s to apply)."""
        del cache  # TFDS reads its records from disk; pipeline.data keeps them in memory or not
        builder = self.builder()
        info = builder.info
        missing = {"train", "test"} - set(info.splits)
        if missing:
            raise DatasetError(f"dataset {self.name!r} has no {' or '.join(sorted(missing))} split "
                               f"(it has: {', '.join(info.splits)}); this pipeline needs both")
        num_train = info.splits["train"].num_examples
        num_val = round(num_train * self.val_fraction)
        if num_train - num_val < 1:
            raise DatasetError(f"dataset {self.name!r}: train split has {num_train} examples, none left to train on")
        split_names = {"train": f"train[:{num_train - num_val}]", "test": "test"}
        if num_val:
            split_names["val"] = f"train[{num_train - num_val}:]"
        split_names = {role: split for role, split in split_names.items() if role in roles}
        sizes = {role: int(info.splits[split].num_examples) for role, split in split_names.items()}
        for role, size in sizes.items():
            if size == 0:
                raise DatasetError(f"dataset {self.name!r}: split {split_names[role]!r} is empty")
        features = Features.of(info, self.image_key, self.label_key, self.image_size)
        return Examples(
            roles={role: features.examples(builder, split) for role, split in split_names.items()},
            sizes=sizes,
            input_spec=features.input_spec,
            class_names=features.class_names,
            label_names=features.label_names,
            lineage=Lineage(info.name, str(info.version), "tfds", str(info.data_dir),
                            hashlib.sha256(json.dumps([info.name, str(info.version)]).encode()).hexdigest()),
        )

    def split(self, expression: str, autocache: bool = True) -> tuple[tf.data.Dataset, InputSpec]:
        """The (inputs, label) examples of any TFDS split expression (`test`,
        `train[:10%]`); a bad expression is a one-line `DatasetError`. `autocache=False`
        for a caller that reads only part of it: TFDS caches small datasets, and
        TensorFlow warns when a pass stops inside a cache."""
        builder = self.builder()
        features = Features.of(builder.info, self.image_key, self.label_key, self.image_size)
        try:
            return features.examples(builder, expression, autocache), features.input_spec
        except DatasetError:
            raise
        except Exception as error:  # TFDS raises several types for a bad split expression
            raise DatasetError(f"split: {expression!r} is not a split of {self.name!r}: {error}") from None

    def builder(self) -> tfds.core.DatasetBuilder:
        """The TFDS builder, prepared in `data_dir` if it was not yet (and `prepare`)."""
        try:
            builder = tfds.builder(self.name, data_dir=self.data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise DatasetError(f"dataset.name: no TFDS dataset is called {self.name!r}") from None
        # is_prepared() warns "Variant folder ... has no dataset_info.json" when the folder
        # does not even exist: a first run, where nothing is wrong.
        if builder.data_path.exists() and builder.is_prepared():
            return builder
        where = builder.data_dir
        if not self.prepare:
            raise DatasetError(
                f"dataset {self.name!r} is not prepared in {where} and dataset.prepare=false. "
                f"Prepare it with `tfds build {self.name} --data_dir {builder.data_dir_root}` "
                "or set dataset.prepare=true"
            )
        _check_download_hosts(builder)
        try:
            builder.download_and_prepare()
        except Exception as error:  # any network or build failure: say what to do instead
            raise DatasetError(
                f"dataset {self.name!r} is not prepared in {where} and preparing it failed "
                f"({type(error).__name__}: {one_line(error)}). Prepare it where there is network "
                f"(`tfds build {self.name} --data_dir DIR`) and point dataset.data_dir at DIR"
            ) from None
        return builder


class Features:
    """Which features of a TFDS dataset are the inputs and the labels, and how to read them."""

    def __init__(self, info: tfds.core.DatasetInfo, input_spec: InputSpec, supervised: bool,
                 image_key: str | None, label_key: str | None, resize_to: tuple[int, int] | None,
                 class_names: tuple[str, ...], label_names: dict[str, tuple[str, ...]]) -> None:
        self.info, self.input_spec, self.supervised = info, input_spec, supervised
        self.image_key, self.label_key, self.resize_to = image_key, label_key, resize_to
        self.class_names, self.label_names = class_names, label_names

    @classmethod
    def of(cls, info: tfds.core.DatasetInfo, image_key: str | None, label_key: str | None,
           image_size: tuple[int, int] | None) -> Features:
        keys = info.supervised_keys
        if image_key is None and label_key is None and keys and len(keys) == 2 and isinstance(keys[0], dict):
            return cls._multimodal(info, keys)
        image_key = image_key or (keys[0] if keys and isinstance(keys[0], str) else None) or \
            _only_feature(info, tfds.features.Image, "image", "dataset.image_key")
        label_key = label_key or (keys[1] if keys and isinstance(keys[1], str) else None) or \
            _only_feature(info, tfds.features.ClassLabel, "class label", "dataset.label_key")
        for key, flag in ((image_key, "dataset.image_key"), (label_key, "dataset.label_key")):
            if key not in info.features:
                raise DatasetError(f"{flag}: dataset {info.name!r} has no feature {key!r} "
                                   f"(it has: {', '.join(info.features)})")
        image, label = info.features[image_key], info.features[label_key]
        if not isinstance(label, tfds.features.ClassLabel):
            raise DatasetError(f"dataset.label_key: feature {label_key!r} of {info.name!r} is not a class label "
                               f"({type(label).__name__}); name one with dataset.label_key")
        shape = tuple(image.shape)
        if len(shape) != 3 or shape[-1] is None:
            raise DatasetError(f"dataset.image_key: feature {image_key!r} of {info.name!r} is not an image of "
                               f"(height, width, channels). Received shape: {shape}")
        resize_to = None
        if image_size is not None and tuple(shape[:2]) != tuple(image_size):
            resize_to = tuple(image_size)
        elif None in shape:
            raise DatasetError(f"dataset.image_size is needed: the images of {info.name!r} vary in size "
                               f"({shape}); set e.g. dataset.image_size=[128,128]")
        if resize_to is not None and np.dtype(image.np_dtype) != np.uint8:
            raise DatasetError(f"dataset.image_size: only uint8 images are resized; {image_key!r} of {info.name!r} "
                               f"is {np.dtype(image.np_dtype).name}")
        size = resize_to or shape[:2]
        spec = InputSpec(shape=(int(size[0]), int(size[1]), int(shape[-1])), dtype=np.dtype(image.np_dtype).name,
                         num_classes=int(label.num_classes))
        supervised = bool(keys) and (image_key, label_key) == tuple(keys)
        return cls(info, spec, supervised, image_key, label_key, resize_to, tuple(label.names), {})

    @classmethod
    def _multimodal(cls, info: tfds.core.DatasetInfo, keys) -> Features:
        """({"image", "features"}, {label name: label}) supervised keys: several inputs and labels."""
        inputs, labels = keys
        if set(inputs) != {"image", "features"} or not isinstance(labels, dict):
            raise DatasetError(f"dataset {info.name!r}: supervised keys {keys} are neither (image, label) "
                               "nor ({image, features}, {labels})")
        image = info.features[inputs["image"]]
        if None in image.shape:
            raise DatasetError(f"dataset {info.name!r}: images must have a fixed shape. Received: {image.shape}")
        spec = InputSpec(
            shape=tuple(int(d) for d in image.shape),
            dtype=np.dtype(image.np_dtype).name,
            num_classes=0,
            features=int(info.features[inputs["features"]].shape[-1]),
            heads=tuple((name, int(info.features[key].num_classes)) for name, key in labels.items()),
        )
        label_names = {name: tuple(info.features[key].names) for name, key in labels.items()}
        return cls(info, spec, True, None, None, None, (), label_names)

    def examples(self, builder: tfds.core.DatasetBuilder, split: str, autocache: bool = True) -> tf.data.Dataset:
        """(inputs, label) examples of `split`, resized where the features say so."""
        read_config = tfds.ReadConfig(try_autocache=autocache)
        if self.supervised:
            ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False, read_config=read_config)
        else:
            image_key, label_key = self.image_key, self.label_key
            ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config).map(
                graph_as_written(lambda example: (example[image_key], example[label_key])),
                num_parallel_calls=tf.data.AUTOTUNE)
        if self.resize_to is not None:
            size, channels = self.resize_to, self.input_spec.shape[-1]
            ds = ds.map(graph_as_written(lambda image, label: (images.resize(image, size, channels), label)),
                        num_parallel_calls=tf.data.AUTOTUNE)
        return ds


def _only_feature(info: tfds.core.DatasetInfo, kind: type, what: str, flag: str) -> str:
    """The name of the dataset's one top-level feature of type `kind`."""
    found = [name for name, feature in info.features.items() if isinstance(feature, kind)]
    if len(found) != 1:
        raise DatasetError(f"{flag} is needed: dataset {info.name!r} has {len(found) or 'no'} {what} feature"
                           f"{'s' if len(found) != 1 else ''}{': ' + ', '.join(found) if found else ''}; "
                           f"name the one to use, e.g. {flag}={found[0] if found else 'NAME'}")
    return found[0]


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
