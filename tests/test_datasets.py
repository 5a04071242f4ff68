"""Datasets: the offline `digits` builder keeps its contract, network datasets load
through TFDS's mock data, and the loader explains every failure in one line."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import compose_config
from sklearn.datasets import load_digits
from tensorflow_datasets.core.utils import tqdm_utils

from pipeline import data
from pipeline.config import cache_mode
from pipeline.datasets import tfds_dataset
from pipeline.datasets.digits.digits_dataset_builder import digits_arrays
from pipeline.datasets.offline import OfflineBuilder
from pipeline.errors import DatasetError


def split_arrays(tfds_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    ds = tfds.load("digits", split=split, data_dir=tfds_dir, download=False, as_supervised=True)
    images, labels = zip(*tfds.as_numpy(ds))
    return np.stack(images), np.array(labels)


def test_features_and_split_sizes(tfds_dir: str) -> None:
    info = tfds.builder("digits", data_dir=tfds_dir).info
    assert info.splits["train"].num_examples == 1437
    assert info.splits["test"].num_examples == 360
    assert info.features["image"].shape == (8, 8, 1)
    assert info.features["image"].np_dtype == np.uint8
    assert info.features["label"].num_classes == 10
    assert info.supervised_keys == ("image", "label")


def test_test_split_is_every_fifth_sklearn_sample(tfds_dir: str) -> None:
    sk = load_digits()
    expected_images = np.round(sk.images * 255 / 16).astype(np.uint8)[..., None]
    index = np.arange(len(sk.target))
    for split, mask in [("test", index % 5 == 0), ("train", index % 5 != 0)]:
        images, labels = split_arrays(tfds_dir, split)
        assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 1)
        assert labels.min() == 0 and labels.max() == 9
        # Same multiset of (image, label) pairs; TFDS stores them in its own order.
        got = sorted(img.tobytes() + bytes([lab]) for img, lab in zip(images, labels))
        want = sorted(img.tobytes() + bytes([lab]) for img, lab in zip(expected_images[mask], sk.target[mask]))
        assert got == want


def test_pixel_values_follow_the_contract() -> None:
    images, labels = digits_arrays()
    sk = load_digits()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0
    np.testing.assert_array_equal(images[..., 0], np.round(sk.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(labels, sk.target)


def test_loader_carves_a_fixed_validation_set(tfds_dir: str) -> None:
    cfg = compose_config([f"dataset.data_dir={tfds_dir}", "dataset.val_fraction=0.2", "dataset.batch_size=100"])
    splits = data.load(cfg.dataset, seed=0)
    assert splits.sizes == {"train": 1150, "val": 287, "test": 360}
    assert splits.steps_per_epoch == 12
    assert splits.input_spec.shape == (8, 8, 1) and splits.input_spec.dtype == "uint8"
    assert splits.input_spec.num_classes == 10

    def labels(ds):
        return np.concatenate([y for _, y in tfds.as_numpy(ds)])

    def one_epoch(splits: data.Splits) -> tf.data.Dataset:  # `train` runs on, epoch after epoch
        return splits.train.take(splits.steps_per_epoch)

    again = data.load(cfg.dataset, seed=1)
    np.testing.assert_array_equal(labels(splits.val), labels(again.val))  # same examples, same order
    assert splits.train.cardinality() == tf.data.INFINITE_CARDINALITY
    assert sum(len(y) for _, y in tfds.as_numpy(one_epoch(splits))) == 1150
    def examples(ds) -> set[bytes]:
        return {image.tobytes() + bytes([label])
                for images, ys in tfds.as_numpy(ds) for image, label in zip(images, ys)}

    train, val, test = examples(one_epoch(splits)), examples(splits.val), examples(splits.test)
    assert len(train) == 1150 and len(val) == 287 and len(test) == 360  # digits has no duplicates
    assert not train & val and not train & test and not val & test, "no example may sit in two splits"
    first_epoch = labels(one_epoch(splits))
    splits.epoch.assign(1)
    second_epoch = labels(one_epoch(splits))
    assert not np.array_equal(first_epoch, second_epoch), "train must reshuffle every epoch"
    # The order is a function of (seed, epoch) only: a resumed process sees the same
    # batches, and one batch can be rebuilt on its own for a diagnosis.
    splits.epoch.assign(0)
    np.testing.assert_array_equal(labels(one_epoch(splits)), first_epoch)
    np.testing.assert_array_equal(labels(one_epoch(data.load(cfg.dataset, seed=0))), first_epoch)
    assert not np.array_equal(labels(one_epoch(again)), first_epoch), "another seed, another order"
    # One iterator runs on from the epoch it opened at into the next ones, each in its own order.
    np.testing.assert_array_equal(labels(splits.train.take(2 * splits.steps_per_epoch)),
                                  np.concatenate([first_epoch, second_epoch]))
    np.testing.assert_array_equal(labels(splits.epoch_batches(tf.constant(1, tf.int64))), second_epoch)
    images, batch_labels = splits.train_batch(1, 3)
    np.testing.assert_array_equal(batch_labels.numpy(), second_epoch[3 * 100:4 * 100])


def test_unknown_dataset_is_one_clear_error(tfds_dir: str) -> None:
    cfg = compose_config([f"dataset.data_dir={tfds_dir}", "dataset.name=no_such_dataset"])
    with pytest.raises(DatasetError, match="dataset.name: no TFDS dataset is called 'no_such_dataset'"):
        data.load(cfg.dataset, seed=0)


def test_unprepared_dataset_says_how_to_prepare(tmp_path) -> None:
    cfg = compose_config([f"dataset.data_dir={tmp_path}", "dataset.prepare=false"])
    with pytest.raises(DatasetError, match=r"not prepared in .* `tfds build digits --data_dir"):
        data.load(cfg.dataset, seed=0)


@pytest.mark.parametrize(
    "name, shape", [("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))]
)
def test_network_datasets_through_tfds_mock_data(name: str, shape: tuple, tmp_path) -> None:
    # These datasets need a download this machine cannot make, so TFDS's own `mock_data`
    # stands in for the prepared files: the features come from the real builder, the
    # examples are random. The config composes, and the spec and pipeline fit it.
    cfg = compose_config([f"dataset={name}", f"dataset.data_dir={tmp_path}"])
    builder = tfds.builder(cfg.dataset.name, data_dir=cfg.dataset.data_dir)
    spec = tfds_dataset.Features.of(builder.info, None, None, None).input_spec
    assert spec.shape == shape and spec.dtype == "uint8" and spec.num_classes == 10
    with tfds.testing.mock_data(num_examples=40):
        mocked = tfds.builder(cfg.dataset.name, data_dir=cfg.dataset.data_dir)
        raw = mocked.as_dataset(split="train", as_supervised=True)
        pipeline = data.batched(raw, cfg.dataset.batch_size, cache_mode(cfg.dataset.cache) == "memory")
        images, labels = next(iter(pipeline))
    assert images.dtype == "uint8" and tuple(images.shape) == (40, *shape)
    assert labels.shape == (40,)


class _UnreachableBuilder:
    """Stands in for a TFDS builder whose download host does not answer."""

    name = "remote_dataset"
    data_dir = "/nowhere/remote_dataset/1.0.0"
    url_infos = {"http://127.0.0.1:9/remote_dataset.tar.gz": None}  # port 9: nothing listens


def test_unreachable_download_host_fails_fast_with_instructions() -> None:
    with pytest.raises(DatasetError) as error:
        tfds_dataset._check_download_hosts(_UnreachableBuilder())
    message = str(error.value)
    assert message.startswith("dataset 'remote_dataset' is not prepared in /nowhere/remote_dataset/1.0.0 "
                              "and cannot be downloaded here (127.0.0.1: ")
    assert "`tfds build remote_dataset --data_dir DIR`" in message and "\n" not in message


def test_offline_datasets_prepare_with_one_line_of_their_own(
        tmp_path, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    # TFDS narrates any preparation as a download ("Downloading and preparing dataset Unknown
    # size ...", progress bars); for data that ships with the code, it reads like a failure.
    cfg = compose_config([f"dataset.data_dir={tmp_path}"])
    showing = tqdm_utils._active
    with caplog.at_level(logging.INFO):
        builder = data.reader(cfg.dataset).builder()
    assert builder.is_prepared() and tqdm_utils._active == showing, "the user's progress-bar choice is back"
    out, err = capfd.readouterr()
    assert "Downloading and preparing" not in out and "downloaded and prepared" not in out, out
    assert "Generating splits" not in err and "Shuffling" not in err, err
    said = [(r.name, r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "pipeline.datasets" or r.levelno >= logging.WARNING]  # TFDS's INFO is for absl's INFO level
    assert said == [("pipeline.datasets", "INFO", "preparing dataset digits (offline, from scikit-learn's "
                                                  f"bundled data) in {tmp_path / 'digits' / '1.0.0'}")]
    for name in ["digits", "synthetic_mnist", "synthetic_multimodal"]:
        assert issubclass(tfds.builder_cls(name), OfflineBuilder), name


def test_network_datasets_keep_tfds_download_line(tmp_path, capfd: pytest.CaptureFixture) -> None:
    builder = tfds.builder("mnist", data_dir=tmp_path)
    assert not isinstance(builder, OfflineBuilder)
    builder._log_download_bytes()  # what download_and_prepare says first, before its progress bars
    assert "Downloading and preparing dataset Unknown size (download: " in capfd.readouterr().out
