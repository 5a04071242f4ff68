"""Load a TFDS dataset into train / validation / test tf.data pipelines.

Any TFDS dataset with an image and a class label works (`dataset.name=mnist` on a
machine with network). `digits`, the default, ships with this project and needs none.
A dataset is prepared once into `dataset.data_dir` and read with `download=False` ever
after.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from omegaconf import DictConfig

import pipeline.datasets  # noqa: F401  (registers the project's own TFDS builders)
from architectures.common import InputSpec
from pipeline.errors import DatasetError, one_line

# The graph-level seed of the per-epoch shuffle (its operation seed is (seed, epoch)).
SHUFFLE_GRAPH_SEED = 20261126

# For the functions this module hands to tf.data: none branches or loops on a tensor,
# so AutoGraph would only rewrite their source, which costs ~0.2 s at every start.
graph_as_written = tf.autograph.experimental.do_not_convert


@dataclass
class Splits:
    """Batched pipelines of (image, label) plus what the model and the logs need to know.

    `train` yields every epoch from `epoch` (a variable the training loop keeps at the
    current epoch) on, back to back, `steps_per_epoch` batches each: `fit` reads it with
    one iterator and `steps_per_epoch`. `epoch_batches(e)` is epoch `e` alone. The same
    epoch number gives the same batches in every process, which is what makes a resumed
    run continue exactly where the interrupted one stopped. `train_batch(epoch, index)`
    rebuilds one batch.
    """

    train: tf.data.Dataset
    val: tf.data.Dataset | None
    test: tf.data.Dataset
    input_spec: InputSpec
    sizes: dict[str, int]
    steps_per_epoch: int
    info: tfds.core.DatasetInfo
    epoch: tf.Variable
    epoch_batches: Callable[[tf.Tensor], tf.data.Dataset]
    train_batch: Callable[[int, int], tuple]


def prepared_builder(cfg: DictConfig) -> tfds.core.DatasetBuilder:
    """The TFDS builder for `cfg.name`, prepared in `cfg.data_dir` if it was not yet."""
    try:
        builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DatasetError(f"dataset.name: no TFDS dataset is called {cfg.name!r}") from None
    # is_prepared() warns "Variant folder ... has no dataset_info.json" when the folder
    # does not even exist: a first run, where nothing is wrong.
    if builder.data_path.exists() and builder.is_prepared():
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
        reason = one_line(error)
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

    steps_per_epoch = math.ceil(sizes["train"] / cfg.batch_size)
    inject_at = cfg.get("inject_nan_at_step")
    if inject_at is not None:
        # Debug: NaN needs a float input, so the images (and the model's input) become float32.
        raw = {role: ds.map(_as_float32, num_parallel_calls=tf.data.AUTOTUNE) for role, ds in raw.items()}
        input_spec = dataclasses.replace(input_spec, dtype="float32")

    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_epoch")
    if cfg.cache:
        epoch_batches = _in_memory_epochs(raw["train"], sizes["train"], cfg.batch_size, seed)
    else:
        epoch_batches = _streaming_epochs(raw["train"], cfg.batch_size, seed, cfg.shuffle_buffer)

    @graph_as_written
    def one_epoch(epoch_number: tf.Tensor) -> tf.data.Dataset:
        ds = epoch_batches(epoch_number)
        if inject_at is not None:
            ds = ds.enumerate().map(functools.partial(_inject_nan, at=inject_at,
                                                      first=epoch_number * steps_per_epoch))
        return ds.apply(tf.data.experimental.assert_cardinality(steps_per_epoch))

    def train_batch(epoch_number: int, index: int) -> tuple:
        """Batch `index` of epoch `epoch_number`, exactly as training saw it."""
        epochs = tf.data.Dataset.from_tensors(tf.constant(epoch_number, tf.int64))
        return epochs.flat_map(one_epoch).skip(index).take(1).get_single_element()

    return Splits(
        train=consecutive_epochs(one_epoch, epoch),
        val=batched(raw["val"], cfg.batch_size, cfg.cache) if num_val else None,
        test=batched(raw["test"], cfg.batch_size, cfg.cache),
        input_spec=input_spec,
        sizes=sizes,
        steps_per_epoch=steps_per_epoch,
        info=info,
        epoch=epoch,
        epoch_batches=one_epoch,
        train_batch=train_batch,
    )


def consecutive_epochs(epoch_batches: Callable[[tf.Tensor], tf.data.Dataset], epoch: tf.Variable) -> tf.data.Dataset:
    """Epochs `epoch_batches(e)` for e = `epoch`'s value when an iterator opens, e + 1, ...,
    back to back, without end.

    `fit` opens one iterator for the whole run, after `on_epoch_begin` has set `epoch`
    to the first epoch (or to the epoch a resume re-enters), so no epoch waits for an
    iterator to be made: the next epoch's pipeline is set up by the prefetch thread
    while the last batches of this one train. Each epoch's order comes from its number,
    not from the variable, so reading ahead cannot race the callbacks that advance it.
    """
    return (tf.data.Dataset.from_tensors(0)
            .flat_map(graph_as_written(lambda _: tf.data.Dataset.counter(epoch.read_value())))
            .flat_map(epoch_batches)
            .apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
            .prefetch(tf.data.AUTOTUNE))


def _in_memory_epochs(examples: tf.data.Dataset, size: int, batch_size: int,
                      seed: int) -> Callable[[tf.Tensor], tf.data.Dataset]:
    """Epochs of a split held in memory (`dataset.cache=true`): read once, then each epoch
    is a full permutation of it, seeded by (seed, epoch), gathered one batch at a time.
    Per-batch rather than per-example work keeps the input pipeline far ahead of training."""
    whole = examples.batch(size).cache()  # one element, the whole split: read on first use
    steps = math.ceil(size / batch_size)

    def epoch_batches(epoch_number: tf.Tensor) -> tf.data.Dataset:
        @graph_as_written
        def batches(inputs, labels) -> tf.data.Dataset:
            order = tf.random.experimental.stateless_shuffle(
                tf.range(size, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch_number]))

            @graph_as_written
            def gather(step):
                index = order[step * batch_size:tf.minimum((step + 1) * batch_size, size)]
                return tf.nest.map_structure(lambda t: tf.gather(t, index), (inputs, labels))

            return tf.data.Dataset.range(steps).map(gather)

        return whole.flat_map(batches)

    return epoch_batches


def _streaming_epochs(examples: tf.data.Dataset, batch_size: int, seed: int,
                      shuffle_buffer: int) -> Callable[[tf.Tensor], tf.data.Dataset]:
    """Epochs of a split read from disk every epoch (`dataset.cache=false`), shuffled
    through a `shuffle_buffer`-example window seeded by (seed, epoch)."""

    @graph_as_written
    def epoch_batches(epoch_number: tf.Tensor) -> tf.data.Dataset:
        # A fresh, seeded order per epoch: (seed, epoch) decides it, not how many
        # iterators this process opened before. Always traced as a dataset function, whose
        # graph-level seed is fixed here: so the process's global seed plays no part (and
        # TensorFlow cannot combine a global seed of 0 with a tensor operation seed).
        tf.compat.v1.set_random_seed(SHUFFLE_GRAPH_SEED)
        return examples.shuffle(shuffle_buffer, seed=seed * 1_000_003 + epoch_number).batch(batch_size)

    return epoch_batches


def zeros_batch(ds: tf.data.Dataset) -> tuple:
    """A batch of one all-zeros example with `ds`'s structure and dtypes, made without
    reading `ds` (a partly read `cache()` can be left holding only what was read)."""
    return tf.nest.map_structure(lambda spec: tf.zeros([1, *spec.shape[1:]], spec.dtype), ds.element_spec)


@graph_as_written
def _as_float32(inputs, labels):
    if isinstance(inputs, dict):
        return {key: tf.cast(value, tf.float32) for key, value in inputs.items()}, labels
    return tf.cast(inputs, tf.float32), labels


@graph_as_written
def _inject_nan(index, batch, *, at: int, first: tf.Tensor):
    """Debug (`dataset.inject_nan_at_step`): one NaN in the first example of global batch `at`."""
    inputs, labels = batch

    def poison(tensor):
        flat = tf.reshape(tensor, [-1])
        nan = tf.where(first + index == at, tf.constant(math.nan, tensor.dtype), flat[0])
        return tf.reshape(tf.tensor_scatter_nd_update(flat, [[0]], [nan]), tf.shape(tensor))

    if isinstance(inputs, dict):  # multimodal: the tabular features carry it
        return {**inputs, "features": poison(inputs["features"])}, labels
    return poison(inputs), labels


def split(cfg: DictConfig, expression: str, *, autocache: bool = True) -> tf.data.Dataset:
    """The (inputs, labels) examples of `cfg.name[expression]` (e.g. `test`, `train[:10%]`),
    prepared if needed; a bad split expression is a one-line `DatasetError`. `autocache=False`
    for a caller that reads only part of it: TFDS caches small datasets, and TensorFlow
    warns when a pass stops inside a cache ("did not fully read the dataset being cached")."""
    builder = prepared_builder(cfg)
    try:
        return builder.as_dataset(split=expression, as_supervised=True, shuffle_files=False,
                                  read_config=tfds.ReadConfig(try_autocache=autocache))
    except Exception as error:  # TFDS raises several types for a bad split expression
        raise DatasetError(f"split: {expression!r} is not a split of {cfg.name!r}: {error}") from None


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


def batched(ds: tf.data.Dataset, batch_size: int, cache: bool) -> tf.data.Dataset:
    """An evaluation pipeline: fixed order. Images stay in their raw dtype: the model
    rescales them, so the same model serves raw images after export. Multimodal
    elements are ({image, features}, {labels})."""
    ds = ds.batch(batch_size)
    if cache:
        ds = ds.cache()  # decoded batches in memory: decode and batch once, not every epoch
    return ds.prefetch(tf.data.AUTOTUNE)
