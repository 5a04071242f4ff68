"""The dataset's train / validation / test tf.data pipelines, whatever its kind.

    splits = data.load(cfg.dataset, seed=cfg.seed, augment=augment.from_config(cfg.augment))

`cfg.dataset._target_` names the kind (`pipeline.datasets`: a prepared TFDS dataset,
a folder of images, a CSV table), built from its own keys; it reads unbatched examples.
This module batches, shuffles, caches and augments them the same way for every kind:
the training pipeline yields every epoch back to back, its order a function of the
run's seed and the epoch alone, which is what makes a resumed run continue exactly
where the interrupted one stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import hydra
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from architectures.common import InputSpec
from pipeline.config import cache_mode, dataset_arguments
from pipeline.datasets.examples import Examples, Lineage
from pipeline.errors import ConfigError, DatasetError

# The graph-level seed of the per-epoch shuffle (its operation seed is (seed, epoch)).
SHUFFLE_GRAPH_SEED = 20261126
# Configs recorded before a dataset named its kind (`_target_`) are TFDS datasets.
TFDS_TARGET = "pipeline.datasets.tfds_dataset.Tfds"

# For the functions this module hands to tf.data: none branches or loops on a tensor,
# so AutoGraph would only rewrite their source, which costs ~0.2 s at every start.
graph_as_written = tf.autograph.experimental.do_not_convert

# augment(batch, seed) -> batch: a training batch transformed, `seed` a (2,) int64 tensor
# fixed by the run's seed, the epoch and the batch (`pipeline.augment`).
Augment = Callable[[tuple, tf.Tensor], tuple]


@dataclass
class Splits:
    """Batched pipelines of (inputs, labels) plus what the model and the logs need to know.

    `train` yields every epoch from `epoch` (a variable the training loop keeps at the
    current epoch) on, back to back, `steps_per_epoch` batches each: `fit` reads it with
    one iterator and `steps_per_epoch`. `epoch_batches(e)` is epoch `e` alone. The same
    epoch number gives the same batches in every process, augmentation included, which
    is what makes a resumed run continue exactly where the interrupted one stopped.
    `train_batch(epoch, index)` rebuilds one batch.
    """

    train: tf.data.Dataset
    val: tf.data.Dataset | None
    test: tf.data.Dataset
    input_spec: InputSpec
    sizes: dict[str, int]
    steps_per_epoch: int
    class_names: tuple[str, ...]
    lineage: Lineage
    epoch: tf.Variable
    epoch_batches: Callable[[tf.Tensor], tf.data.Dataset]
    train_batch: Callable[[int, int], tuple]
    skipped: tuple[str, ...] = ()
    label_names: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


def reader(cfg: DictConfig):
    """The dataset kind `cfg._target_` names, built from its own keys (not the batching
    keys this module reads); a value it refuses is a one-line `ConfigError`."""
    try:
        return hydra.utils.get_class(cfg.get("_target_") or TFDS_TARGET)(**dataset_arguments(cfg))
    except ValueError as error:
        raise ConfigError(f"dataset.{error}") from None


def command_overrides(cfg: DictConfig) -> list[str]:
    """The command-line overrides that read this dataset again, for the commands a run
    prints (`pipeline.summary`: evaluate, inspect, predict): its option and the keys of
    its kind that differ from the kind's defaults, a relative path made absolute.
    The batching keys are left out: they do not change the examples."""
    import inspect
    from importlib.resources import files

    kind = hydra.utils.get_class(cfg.get("_target_") or TFDS_TARGET)
    arguments = dataset_arguments(cfg)
    name = str(cfg.name)
    if kind.__name__ == "Tfds":
        preset = files("conf").joinpath("dataset", f"{name}.yaml")
        option = [f"dataset={name}"] if preset.is_file() and OmegaConf.load(str(preset)).get("name") == name else \
            ["dataset=tfds", f"dataset.name={name}"]
        skip = {"name", "prepare"}
    else:  # a name the kind derives from its path goes without saying
        option = [f"dataset={OPTIONS.get(kind.__name__, kind.__name__)}"]
        skip = {"name"} if kind(**{**arguments, "name": None}).name == name else set()
    if option == ["dataset=digits"]:
        option = []  # the default
    defaults = {key: parameter.default for key, parameter in inspect.signature(kind).parameters.items()}
    for key, value in arguments.items():
        default = defaults.get(key, inspect.Parameter.empty)
        if key in skip or value == default or (isinstance(value, list) and isinstance(default, tuple)
                                               and tuple(value) == default):
            continue
        if key == "path":
            value = str(Path(str(value)).expanduser().absolute())
        if isinstance(value, (list, tuple)):
            value = "[" + ",".join(map(str, value)) + "]"
        option.append(f"dataset.{key}={'null' if value is None else value}")
    return option


# The `dataset=` option of each kind of files (`conf/dataset/`).
OPTIONS = {"ImageFolder": "image_folder", "CsvTable": "csv"}


def load(cfg: DictConfig, seed: int, augment: Augment | None = None) -> Splits:
    """Read the dataset `cfg` describes and build its three pipelines.

    Args:
        cfg: the `dataset` config group.
        seed: the run's seed: with the epoch, it orders (and augments) each epoch.
        augment: applied to training batches only (`pipeline.augment`).
    """
    mode = cache_mode(cfg.cache)
    examples = reader(cfg).read(mode)
    raw, sizes, input_spec = dict(examples.roles), dict(examples.sizes), examples.input_spec
    if augment is not None and input_spec.tabular:
        raise ConfigError(f"augment transforms images, but dataset={cfg.name} is a table: use augment=none")
    in_memory = mode == "memory"
    steps_per_epoch = math.ceil(sizes["train"] / cfg.batch_size)
    inject_at = cfg.get("inject_nan_at_step")
    if inject_at is not None:
        # Debug: NaN needs a float input, so the images (and the model's input) become float32.
        raw = {role: ds.map(_as_float32, num_parallel_calls=tf.data.AUTOTUNE) for role, ds in raw.items()}
        input_spec = dataclasses.replace(input_spec, dtype="float32")

    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_epoch")
    if in_memory:
        epoch_batches = _in_memory_epochs(raw["train"], sizes["train"], cfg.batch_size, seed)
    else:
        epoch_batches = _streaming_epochs(raw["train"], cfg.batch_size, seed, cfg.shuffle_buffer)

    @graph_as_written
    def one_epoch(epoch_number: tf.Tensor) -> tf.data.Dataset:
        ds = epoch_batches(epoch_number)
        if augment is not None:
            ds = ds.enumerate().map(functools.partial(_augmented, augment=augment, seed=seed, epoch=epoch_number),
                                    num_parallel_calls=tf.data.AUTOTUNE)
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
        val=batched(raw["val"], cfg.batch_size, in_memory) if "val" in raw else None,
        test=batched(raw["test"], cfg.batch_size, in_memory),
        input_spec=input_spec,
        sizes=sizes,
        steps_per_epoch=steps_per_epoch,
        class_names=examples.class_names,
        lineage=examples.lineage,
        epoch=epoch,
        epoch_batches=one_epoch,
        train_batch=train_batch,
        skipped=examples.skipped,
        label_names=examples.label_names,
    )


@graph_as_written
def _augmented(index: tf.Tensor, batch: tuple, *, augment: Augment, seed: int, epoch: tf.Tensor) -> tuple:
    """Batch `index` of epoch `epoch`, augmented with a seed fixed by (seed, epoch, index)."""
    batch_seed = tf.random.experimental.stateless_fold_in(
        tf.stack([tf.constant(seed, tf.int64), epoch]), index)
    return augment(batch, batch_seed)


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
    """Epochs of a split held in memory (`dataset.cache=memory`): read once, then each epoch
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
    """Epochs of a split read again every epoch (`dataset.cache=disk` or `none`),
    shuffled through a `shuffle_buffer`-example window seeded by (seed, epoch)."""

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
    """Debug (`dataset.inject_nan_at_step`): numeric inputs as float32, so they can hold a NaN."""
    cast = lambda t: t if t.dtype == tf.string else tf.cast(t, tf.float32)  # noqa: E731
    return tf.nest.map_structure(cast, inputs), labels


@graph_as_written
def _inject_nan(index, batch, *, at: int, first: tf.Tensor):
    """Debug (`dataset.inject_nan_at_step`): one NaN in the first example of global batch
    `at`: in the image, in a multimodal dataset's `features`, or in a table's first numeric column."""
    inputs, labels = batch

    def poison(tensor):
        flat = tf.reshape(tensor, [-1])
        nan = tf.where(first + index == at, tf.constant(math.nan, tensor.dtype), flat[0])
        return tf.reshape(tf.tensor_scatter_nd_update(flat, [[0]], [nan]), tf.shape(tensor))

    if isinstance(inputs, dict):
        key = "features" if "features" in inputs else next(k for k, t in inputs.items() if t.dtype != tf.string)
        return {**inputs, key: poison(inputs[key])}, labels
    return poison(inputs), labels


def split(cfg: DictConfig, expression: str, *, autocache: bool = True) -> tuple[tf.data.Dataset, Examples | None]:
    """The (inputs, labels) examples of one split of the dataset, for scoring a model:
    any TFDS split expression (`test`, `train[:10%]`), or a role (`train`, `val`,
    `test`) of a folder or a table. Also the read `Examples` (None for a TFDS
    expression), whose `input_spec` says what the examples are. A bad expression is a
    one-line `DatasetError`. `autocache=False` for a caller that reads only part of it."""
    source = reader(cfg)
    if hasattr(source, "split"):  # TFDS: any split expression
        return source.split(expression, autocache=autocache)[0], None
    role = {"validation": "val"}.get(expression, expression)
    if role not in ("train", "val", "test"):
        raise DatasetError(f"split: dataset {cfg.get('name')!r} has the splits train, val and test. "
                           f"Received: {expression!r}")
    examples = source.read(cache_mode(cfg.cache), roles=(role,))
    if role not in examples.roles:
        raise DatasetError(f"split: dataset {cfg.get('name')!r} has no {role} split (its val_fraction is 0)")
    return examples.roles[role], examples


def batched(ds: tf.data.Dataset, batch_size: int, cache: bool) -> tf.data.Dataset:
    """An evaluation pipeline: fixed order. Images stay in their raw dtype: the model
    rescales them, so the same model serves raw images after export. Multimodal
    elements are ({image, features}, {labels})."""
    ds = ds.batch(batch_size)
    if cache:
        ds = ds.cache()  # decoded batches in memory: decode and batch once, not every epoch
    return ds.prefetch(tf.data.AUTOTUNE)
