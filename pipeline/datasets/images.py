"""Image files as the pipeline reads them: in training (`image_folder`) and in
`pipeline.predict` alike, so a model sees new files exactly as it saw its training set.

    image = images.load(tf.constant("cat/001.jpg"), size=(64, 64), channels=3)  # (64, 64, 3) uint8
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

# What `decode` reads, by file name extension (any case). A GIF gives its first frame.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif"})


def is_image(path: str | Path) -> bool:
    """Whether `path` has an image file name extension (the contents are not read)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


@tf.autograph.experimental.do_not_convert  # no Python control flow on tensors: nothing to rewrite
def load(path: tf.Tensor, size: tuple[int, int], channels: int) -> tf.Tensor:
    """The image in file `path` as (size[0], size[1], channels) uint8.

    Grayscale, grayscale-with-alpha, RGBA and palette images become RGB (alpha is
    dropped); `channels=1` then takes the luma (ITU-R 601). An unreadable or corrupt
    file raises `tf.errors.InvalidArgumentError` (or `NotFoundError`) when the op runs.
    """
    # channels=3 converts every layout the decoders know, BMP and GIF included (which
    # refuse channels=1 outright).
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False, dtype=tf.uint8)
    if channels == 1:
        image = tf.image.rgb_to_grayscale(image)
    return resize(image, size, channels)


@tf.autograph.experimental.do_not_convert
def resize(image: tf.Tensor, size: tuple[int, int], channels: int) -> tf.Tensor:
    """`image` (H, W, channels) uint8 at `size`: bilinear with antialiasing (a photo made
    small keeps its detail instead of aliasing), rounded back to uint8; an image already
    at `size` is returned as it is."""
    height, width = int(size[0]), int(size[1])

    def resized() -> tf.Tensor:
        scaled = tf.image.resize(image, (height, width), method="bilinear", antialias=True)
        return tf.saturate_cast(tf.round(scaled), tf.uint8)

    same = tf.logical_and(tf.shape(image)[0] == height, tf.shape(image)[1] == width)
    image = tf.cond(same, lambda: image, resized)
    return tf.ensure_shape(image, (height, width, channels))


def image_size_of(path: str | Path) -> tuple[int, int] | None:
    """(height, width) from the file's header (Pillow reads no pixels), or None when
    Pillow cannot identify the file: the decoder then decides whether it is readable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return height, width
