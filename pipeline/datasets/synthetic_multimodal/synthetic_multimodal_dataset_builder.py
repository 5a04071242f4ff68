"""`synthetic_multimodal`: images plus numeric features with two labels, generated here.

Deterministic from `SEED`; downloads nothing. Each example:
  * `image`: uint8 (32, 32, 3): noise in [0, 60) with one bright 8x8 square in one
    colour channel (R, G or B), placed in the top or bottom half;
  * `features`: float32 (10,), standard normal;
  * `category`: 0..2, the square's colour channel (learnable from the image alone);
  * `binary`: 0/1, whether 0.8 * sum(features[:3]) + (1 if the square is in the top
    half else -1) > 0, so it needs both inputs.
Splits: `train` 4000 and `test` 1000, drawn from independent streams.
"""

import numpy as np
import tensorflow_datasets as tfds

from pipeline.datasets.offline import OfflineBuilder

SEED = 20261126
IMAGE_SIDE, SQUARE_SIDE, NUM_FEATURES = 32, 8, 10
SPLIT_SIZES = {"train": 4000, "test": 1000}


def generate(num_examples: int, seed: int) -> dict[str, np.ndarray]:
    """The whole split as arrays: image (N, 32, 32, 3) uint8, features (N, 10) float32,
    binary (N,) int64, category (N,) int64."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(num_examples, IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    features = rng.standard_normal((num_examples, NUM_FEATURES)).astype(np.float32)
    category = rng.integers(0, 3, size=num_examples)
    top = rng.random(num_examples) < 0.5
    half = IMAGE_SIDE // 2
    rows = np.where(top, rng.integers(0, half - SQUARE_SIDE + 1, num_examples),
                    rng.integers(half, IMAGE_SIDE - SQUARE_SIDE + 1, num_examples))
    cols = rng.integers(0, IMAGE_SIDE - SQUARE_SIDE + 1, num_examples)
    brightness = rng.integers(200, 256, size=num_examples, dtype=np.uint8)
    for i in range(num_examples):
        images[i, rows[i]:rows[i] + SQUARE_SIDE, cols[i]:cols[i] + SQUARE_SIDE, category[i]] = brightness[i]
    binary = (0.8 * features[:, :3].sum(axis=1) + np.where(top, 1.0, -1.0) > 0).astype(np.int64)
    return {"image": images, "features": features, "binary": binary, "category": category.astype(np.int64)}


class Builder(OfflineBuilder):
    """Synthetic image + feature dataset with a binary and a 3-class label."""

    SOURCE = "generated from a fixed seed"

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: train 4000, test 1000."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8),
                    "features": tfds.features.Tensor(shape=(NUM_FEATURES,), dtype=np.float32),
                    "binary": tfds.features.ClassLabel(num_classes=2),
                    "category": tfds.features.ClassLabel(names=["red", "green", "blue"]),
                }
            ),
            # as_supervised yields ({"image", "features"}, {"binary", "category"}).
            supervised_keys=(
                {"image": "image", "features": "features"},
                {"binary": "binary", "category": "category"},
            ),
            description=__doc__,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # generated, nothing to download
        return {
            name: self._generate_examples(size, seed=SEED + offset)
            for offset, (name, size) in enumerate(SPLIT_SIZES.items())
        }

    def _generate_examples(self, num_examples: int, seed: int):
        arrays = generate(num_examples, seed)
        for index in range(num_examples):
            yield index, {key: values[index] for key, values in arrays.items()}
