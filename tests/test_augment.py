"""Augmentation (`augment=flip_crop|light|custom`): each does what its name says to
training batches only, and the same (seed, epoch, batch) always gives the same batch,
which is what keeps a resumed run exact (tests/test_kill_points.py trains with
`augment=flip_crop` end to end; tests/test_private_api_canaries.py checks how custom
Keras layers get their seed)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import compose_config

from pipeline import augment, data
from pipeline.augment import FlipCrop, KerasLayers, Light
from pipeline.errors import ConfigError


def batch(count: int = 6, size: int = 8, channels: int = 3) -> tuple[tf.Tensor, tf.Tensor]:
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(count, size, size, channels), dtype=np.uint8)  # no zeros: fill is visible
    return tf.constant(images), tf.range(count)


def seed(*values: int) -> tf.Tensor:
    return tf.constant(values, tf.int64)


def shifted(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """`image` moved right by dx and down by dy, zeros filling in: a crop of the padded image."""
    out = np.zeros_like(image)
    height, width = image.shape[:2]
    out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        image[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
    return out


def test_flip_crop_is_a_flip_and_a_whole_pixel_shift_of_each_image() -> None:
    images, labels = batch(count=32)
    out, out_labels = FlipCrop(flip=True, pad=2)((images, labels), seed(7, 1))
    assert out.dtype == tf.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(out_labels, labels)
    found = []
    for original, augmented in zip(images.numpy(), out.numpy(), strict=True):
        matches = [(flip, dx, dy) for flip in (False, True) for dx in range(-2, 3) for dy in range(-2, 3)
                   if np.array_equal(shifted(original[:, ::-1] if flip else original, dx, dy), augmented)]
        assert matches, "every output is one flip-and-shift of its input"
        found.append(matches[0])
    assert {flip for flip, _, _ in found} == {False, True}, "half flipped, half not"
    assert len({(dx, dy) for _, dx, dy in found}) > 5, "shifts vary from image to image"


def test_flip_crop_without_flip_or_pad_changes_nothing() -> None:
    images, labels = batch()
    out, _ = FlipCrop(flip=False, pad=0)((images, labels), seed(1, 2))
    np.testing.assert_array_equal(out, images)


def test_light_with_nothing_to_do_changes_nothing_and_otherwise_a_little() -> None:
    images, labels = batch(size=28, channels=1)
    still, _ = Light(rotation=0, zoom=0, translation=0)((images, labels), seed(3, 4))
    np.testing.assert_array_equal(still, images)
    moved, _ = Light()((images, labels), seed(3, 4))
    assert moved.dtype == tf.uint8 and moved.shape == images.shape
    assert not np.array_equal(moved, images)


@pytest.mark.parametrize("augmentation", [FlipCrop(), Light(), KerasLayers([keras.layers.RandomFlip("horizontal"),
                                                                            keras.layers.RandomContrast(0.3)])],
                         ids=["flip_crop", "light", "custom"])
def test_the_seed_alone_decides_the_batch(augmentation) -> None:
    images, labels = batch(count=16)
    first, _ = augmentation((images, labels), seed(11, 5))
    again, _ = augmentation((images, labels), seed(11, 5))
    other, _ = augmentation((images, labels), seed(11, 6))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.dtype == images.dtype


def test_only_training_batches_are_augmented_and_each_epoch_differently(tfds_dir: str) -> None:
    cfg = compose_config([f"dataset.data_dir={tfds_dir}", "augment=flip_crop", "augment.pad=2"])
    plain = data.load(cfg.dataset, seed=3)
    augmented = data.load(cfg.dataset, seed=3, augment=augment.from_config(cfg.augment))
    first = augmented.train_batch(0, 0)
    np.testing.assert_array_equal(first[0], augmented.train_batch(0, 0)[0])
    np.testing.assert_array_equal(first[1], plain.train_batch(0, 0)[1])  # the same examples, in the same order
    assert not np.array_equal(first[0], plain.train_batch(0, 0)[0])
    assert not np.array_equal(augmented.train_batch(1, 0)[0], plain.train_batch(1, 0)[0])
    for split in ("val", "test"):
        np.testing.assert_array_equal(next(iter(getattr(augmented, split)))[0], next(iter(getattr(plain, split)))[0])


def test_a_table_is_refused(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("x,y\n" + "".join(f"{i},{i % 2}\n" for i in range(60)))
    cfg = compose_config(["dataset=csv", f"dataset.path={path}", "dataset.label=y", "augment=light"])
    with pytest.raises(ConfigError, match="^augment transforms images, but dataset=t is a table: use augment=none$"):
        data.load(cfg.dataset, seed=0, augment=augment.from_config(cfg.augment))
