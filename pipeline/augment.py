"""Augmentation of training batches (`augment=flip_crop|light|custom`, `conf/augment/`).

Each option is a callable `augment(batch, seed) -> batch` that `pipeline.data` maps over
the training batches in tf.data, never over validation or test, and never in the
model, so the exported model's serving signature has none of it. `seed` is fixed by
the run's seed, the epoch and the batch's index (stateless random ops throughout), so a
resumed run sees exactly the augmented batches the interrupted one would have.

It runs in tf.data rather than in the train step: on the input pipeline's threads it
overlaps the previous step's compute (`benchmarks/input_pipeline.py` measures it).
Images keep their raw dtype (uint8): the model rescales them as it does at serving.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import keras
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from pipeline.errors import ConfigError, one_line

FILL_MODES = ("nearest", "reflect", "constant", "wrap")


def from_config(cfg: DictConfig | None):
    """The augmentation `cfg` (the `augment` group) names, or None for `augment=none`."""
    if cfg is None or not cfg.get("_target_"):
        return None
    import hydra

    try:
        return hydra.utils.instantiate(OmegaConf.to_container(cfg, resolve=True), _convert_="all")
    except Exception as error:  # Hydra wraps what the augmentation, or a Keras layer, refused
        cause = error.__cause__ or error
        if isinstance(cause, ValueError) and re.match(r"[a-z_]+( must |: )", str(cause)):
            raise ConfigError(f"augment.{cause}") from None  # ours name the key: "pad must be >= 0. Received: -1"
        raise ConfigError(f"augment: {type(cause).__name__}: {one_line(cause)}") from None


class _Images:
    """An augmentation of the image in each (inputs, labels) batch: the inputs
    themselves, or their `image` for a multimodal dataset."""

    def __call__(self, batch: tuple, seed: tf.Tensor) -> tuple:
        inputs, labels = batch
        if isinstance(inputs, dict):
            return {**inputs, "image": self.images(inputs["image"], seed)}, labels
        return self.images(inputs, seed), labels

    def images(self, images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError


class FlipCrop(_Images):
    """The CIFAR recipe: a random horizontal flip, then a random crop of the image padded
    by `pad` zero pixels on each side (a shift of up to `pad` pixels each way).

    Args:
        flip: flip half the images left to right (a mirrored object is the same object;
            not so for digits or text).
        pad: the padding, in pixels; 0 for no crop.
    """

    def __init__(self, flip: bool = True, pad: int = 4) -> None:
        if int(pad) < 0:
            raise ValueError(f"pad must be >= 0. Received: {pad}")
        self.flip, self.pad = bool(flip), int(pad)

    def images(self, images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        count, width = tf.shape(images)[0], tf.cast(tf.shape(images)[2], tf.float32)
        flip_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        flipped = tf.random.stateless_uniform([count], flip_seed) < (0.5 if self.flip else 0.0)
        # Pad-and-crop is a whole-pixel shift with zeros filling in: (B, 2) in [-pad, pad].
        shift = tf.cast(tf.random.stateless_uniform([count, 2], shift_seed, minval=-self.pad, maxval=self.pad + 1,
                                                    dtype=tf.int32), tf.float32)
        # Output pixel (x, y) reads input (a0 x + a2, y + b2).
        a0 = tf.where(flipped, -1.0, 1.0)
        a2 = tf.where(flipped, width - 1.0, 0.0) - shift[:, 0]
        zeros, ones = tf.zeros([count]), tf.ones([count])
        transforms = tf.stack([a0, zeros, a2, zeros, ones, -shift[:, 1], zeros, zeros], axis=1)
        return _transform(images, transforms, "NEAREST", "CONSTANT")


class Light(_Images):
    """A small random rotation, zoom and translation: safe for digits and text, which a
    flip would change.

    Args:
        rotation: the largest rotation, in degrees, either way.
        zoom: the largest zoom, as a fraction, in or out.
        translation: the largest shift, as a fraction of the height and the width, either way.
        fill: how pixels from outside the image are filled: nearest (the border's own
            colour, the background of a digit or a page), reflect, constant (zeros) or wrap.
    """

    def __init__(self, rotation: float = 10.0, zoom: float = 0.1, translation: float = 0.1,
                 fill: str = "nearest") -> None:
        limits = (("rotation", rotation, 180.0), ("zoom", zoom, 0.99), ("translation", translation, 1.0))
        for name, value, top in limits:
            if not 0 <= value <= top:
                raise ValueError(f"{name} must be in [0, {top}]. Received: {value}")
        if fill not in FILL_MODES:
            raise ValueError(f"fill must be one of {FILL_MODES}. Received: {fill!r}")
        self.rotation, self.zoom, self.translation, self.fill = float(rotation), float(zoom), float(translation), fill

    def images(self, images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        count = tf.shape(images)[0]
        height, width = tf.cast(tf.shape(images)[1], tf.float32), tf.cast(tf.shape(images)[2], tf.float32)
        angle_seed, zoom_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        angle = tf.random.stateless_uniform([count], angle_seed, -1.0, 1.0) * self.rotation * math.pi / 180.0
        scale = 1.0 + tf.random.stateless_uniform([count], zoom_seed, -1.0, 1.0) * self.zoom
        shift = tf.random.stateless_uniform([count, 2], shift_seed, -1.0, 1.0) * self.translation
        tx, ty = shift[:, 0] * width, shift[:, 1] * height
        # Output pixel p reads input c + R(angle) (p - c) / scale - t, c the centre.
        cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
        cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
        transforms = tf.stack([cos, sin, cx - cos * cx - sin * cy - tx,
                               -sin, cos, cy + sin * cx - cos * cy - ty,
                               tf.zeros([count]), tf.zeros([count])], axis=1)
        return _transform(images, transforms, "BILINEAR", self.fill.upper())


class KerasLayers(_Images):
    """Keras image preprocessing layers (`keras.layers.RandomFlip`, `RandomRotation`,
    `RandomContrast`, ...), applied in order, each drawing its randomness from the
    batch's seed, so resumed runs stay exact.

        augment=custom 'augment.layers=[{_target_: keras.layers.RandomContrast, factor: 0.3}]'

    Args:
        layers: the layers (Hydra instantiates their `_target_` configs); each must be
            a Keras image preprocessing layer (it has `get_random_transformation` and
            `transform_images`), working on pixel values in [0, 255].
    """

    def __init__(self, layers: Sequence[keras.layers.Layer]) -> None:
        layers = list(layers)
        if not layers:
            raise ValueError("layers must name at least one Keras preprocessing layer. Received: []")
        for layer in layers:
            if not (hasattr(layer, "get_random_transformation") and hasattr(layer, "transform_images")):
                raise ValueError(f"layers: {type(layer).__name__} is not a Keras image preprocessing layer "
                                 "(keras.layers.RandomFlip, RandomRotation, RandomZoom, RandomContrast, ...)")
        self.layers = layers

    def images(self, images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        raw_dtype = images.dtype
        images = tf.cast(images, tf.float32)
        for index, layer in enumerate(self.layers):
            layer_seed = BatchSeed(tf.random.experimental.stateless_fold_in(seed, index))
            transformation = layer.get_random_transformation(images, training=True, seed=layer_seed)
            images = tf.cast(layer.transform_images(images, transformation, training=True), tf.float32)
        return _to_dtype(images, raw_dtype)


class BatchSeed(keras.random.SeedGenerator):
    """A `keras.random.SeedGenerator` whose every draw is fixed by a seed tensor (2,):
    Keras's random ops take their seed from `next()`, so a layer handed one draws
    stateless numbers. It holds no variable, so it can be made inside a tf.data function.
    tests/test_augment.py checks that Keras still draws through `next()`."""

    def __init__(self, seed: tf.Tensor) -> None:  # no SeedGenerator.__init__: it would create a variable
        self._seed, self._draws = tf.cast(seed, tf.int64), 0

    def next(self, ordered: bool = True) -> tf.Tensor:
        self._draws += 1
        return tf.random.experimental.stateless_fold_in(self._seed, self._draws)


def _transform(images: tf.Tensor, transforms: tf.Tensor, interpolation: str, fill_mode: str) -> tf.Tensor:
    """`images` (B, H, W, C) resampled by one projective transform each (B, 8): output
    pixel (x, y) reads input ((a0 x + a1 y + a2) / k, (b0 x + b1 y + b2) / k), k = c0 x + c1 y + 1."""
    raw_dtype = images.dtype
    if interpolation == "BILINEAR":  # in float, rounded back: uint8 arithmetic would truncate
        images = tf.cast(images, tf.float32)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=tf.cast(transforms, tf.float32), output_shape=tf.shape(images)[1:3],
        fill_value=tf.constant(0.0), interpolation=interpolation, fill_mode=fill_mode)
    return _to_dtype(out, raw_dtype)


def _to_dtype(images: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    if images.dtype == dtype:
        return images
    if dtype.is_integer:
        return tf.saturate_cast(tf.round(images), dtype)
    return tf.cast(images, dtype)
