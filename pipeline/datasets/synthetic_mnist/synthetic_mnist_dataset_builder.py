"""`synthetic_mnist`: MNIST-shaped images generated here, for benchmarks and offline tries.

Deterministic from `SEED`; downloads nothing. Each example is a uint8 (28, 28, 1)
image of noise in [0, 40) with one bright 7x7 square whose cell in a 3x4 grid of
positions (cells 0..9 used) is the label. Splits: `train` 12000, `test` 2000.
"""

import numpy as np
import tensorflow_datasets as tfds

from pipeline.datasets.offline import OfflineBuilder

SEED = 20261127
SIDE, SQUARE = 28, 7
SPLIT_SIZES = {"train": 12000, "test": 2000}
# Top-left corner of the square for each label: a 3x4 grid of cells over the image.
CORNERS = [(row * 9 + 1, col * 7) for row in range(3) for col in range(4)][:10]


def generate(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28, 1) uint8, labels (N,) int64)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(num_examples, SIDE, SIDE, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, size=num_examples)
    jitter = rng.integers(0, 2, size=(num_examples, 2))
    brightness = rng.integers(150, 256, size=num_examples, dtype=np.uint8)
    for i, label in enumerate(labels):
        row, col = CORNERS[label]
        row, col = row + jitter[i, 0], col + jitter[i, 1]
        images[i, row:row + SQUARE, col:col + SQUARE, 0] = brightness[i]
    return images, labels.astype(np.int64)


class Builder(OfflineBuilder):
    """Synthetic 28x28x1 ten-class images."""

    SOURCE = "generated from a fixed seed"

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: train 12000, test 2000."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(SIDE, SIDE, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            description=__doc__,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # generated, nothing to download
        return {name: self._generate_examples(size, seed=SEED + offset)
                for offset, (name, size) in enumerate(SPLIT_SIZES.items())}

    def _generate_examples(self, num_examples: int, seed: int):
        images, labels = generate(num_examples, seed)
        for index in range(num_examples):
            yield index, {"image": images[index], "label": labels[index]}
