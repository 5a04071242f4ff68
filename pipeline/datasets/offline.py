"""The base of this project's TFDS builders: data that ships with the code or is generated.

TFDS narrates every preparation as a download, e.g. for `digits` on a first run:

    Downloading and preparing dataset Unknown size (download: Unknown size, generated: ...) to DIR...
    Generating splits...:   0%|          | 0/2 [00:00<?, ? splits/s]   (progress bars, on stderr)
    Dataset digits downloaded and prepared to DIR. Subsequent calls will reuse this data.

For a builder that downloads nothing, that reads like a network step that went wrong.
An `OfflineBuilder` says instead, at INFO, one line of its own:

    preparing dataset digits (offline, from scikit-learn's bundled data) in DIR

and shows no progress bar while it prepares (a second or two). Datasets TFDS downloads
(`mnist`, ...) keep TFDS's lines: there, size and progress matter.
"""

from __future__ import annotations

import logging

import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

log = logging.getLogger("pipeline.datasets")


class OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A `GeneratorBasedBuilder` that downloads nothing; set `SOURCE` to say where its
    examples come from (e.g. "from scikit-learn's bundled data")."""

    SOURCE = "generated locally"

    # TFDS's own hooks for its two printed lines (tensorflow_datasets/core/dataset_builder.py);
    # tests/test_datasets.py checks they are still the ones it calls.
    def _log_download_bytes(self) -> None:
        log.info("preparing dataset %s (offline, %s) in %s", self.name, self.SOURCE, self.data_dir)

    def _log_download_done(self) -> None:
        log.debug("dataset %s prepared in %s", self.name, self.data_dir)

    def _download_and_prepare(self, dl_manager, download_config):
        showing = getattr(tqdm_utils, "_active", True)  # the user's tfds.display_progress_bar choice
        tfds.display_progress_bar(False)
        try:
            return super()._download_and_prepare(dl_manager, download_config)
        finally:
            tfds.display_progress_bar(showing)
