"""TFDS builders this project ships, so that training works with no network.

Importing this package registers them with TFDS (`tfds.builder("digits")`).
"""

from pipeline.datasets.digits import digits_dataset_builder  # noqa: F401  (registers "digits")
from pipeline.datasets.synthetic_mnist import (  # noqa: F401  (registers "synthetic_mnist")
    synthetic_mnist_dataset_builder,
)
from pipeline.datasets.synthetic_multimodal import (  # noqa: F401  (registers "synthetic_multimodal")
    synthetic_multimodal_dataset_builder,
)
