"""The full pipeline against the tutorial's bare `model.fit`, same model and data.

    python -m benchmarks.overhead                 # from the repository root: mlp and resnet, 5 pairs each (~20 min)
    python -m benchmarks.overhead --pairs 7 mlp   # one architecture

Candidate: `pipeline.train.train` with the default config (every default callback:
gradient-norm and finite checks, checkpoints, early stopping, per-epoch MLflow logging
to a temporary sqlite store) on `synthetic_mnist` (28x28x1, 10.8k training examples,
batch 128). Baseline: the tutorial's script, `model.fit` with Keras defaults over
`from_tensor_slices -> shuffle -> batch -> prefetch` of the same arrays, validating on
the same examples. Throughput is training examples per second of steady-state epoch
time (the first, compiling epoch excluded), validation and all per-epoch work included:
each run's fastest steady epoch, because this host runs the VM at full or about half
speed for seconds at a time (see `common.py`); the ratio from median epochs is printed too.

The last line reads: `pipeline/bare_fit throughput ratio: mlp 1.42, resnet 0.99 (median
of 7 interleaved pairs)`. With `--readme`, the figures go into the README.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import (
    TRAIN_EXAMPLES,
    EpochTimer,
    Throughput,
    host_steadiness,
    interleaved,
    machine,
    update_readme,
)

EPOCHS = {"mlp": 8, "resnet": 4}  # the first epoch compiles and is not timed
TARGETS = {"mlp": 1.3, "resnet": 0.97}


def pipeline_throughput(architecture: str, store: Path, data_dir: str) -> Throughput:
    from pipeline.plan import compose
    from pipeline.train import train

    train(compose([f"architecture={architecture}", "dataset=synthetic_mnist", f"dataset.data_dir={data_dir}",
                   f"trainer.epochs={EPOCHS[architecture]}", "trainer.verbose=0",
                   f"mlflow.tracking_uri=sqlite:///{store}",
                   "+callbacks.zz_timer._target_=benchmarks.common.EpochTimer"]))
    return Throughput.of_epochs(TRAIN_EXAMPLES)


def bare_fit_throughput(architecture: str, arrays) -> Throughput:
    """The tutorial: build, compile with defaults, fit a plain tf.data pipeline."""
    import keras
    import tensorflow as tf

    from architectures import InputSpec
    from pipeline.config import compose

    keras.backend.clear_session(free_memory=True)
    keras.utils.set_random_seed(42)
    (x_train, y_train), (x_val, y_val) = arrays
    cfg = compose([f"architecture={architecture}"])
    import hydra

    builder = hydra.utils.instantiate({k: v for k, v in cfg.architecture.items() if k != "compile"},
                                      _partial_=True, _convert_="all")
    model = builder(InputSpec(shape=(28, 28, 1), dtype="uint8", num_classes=10))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    train_ds = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(len(x_train)).batch(128).prefetch(
        tf.data.AUTOTUNE)
    val_ds = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(128).prefetch(tf.data.AUTOTUNE)
    model.fit(train_ds, validation_data=val_ds, epochs=EPOCHS[architecture], verbose=0, callbacks=[EpochTimer()])
    return Throughput.of_epochs(len(x_train))


def load_arrays(data_dir: str):
    """The exact train/validation examples the pipeline uses (TFDS train split, last 10% validates)."""
    import numpy as np
    import tensorflow_datasets as tfds

    from pipeline.config import compose
    from pipeline.data import prepared_builder

    builder = prepared_builder(compose(["dataset=synthetic_mnist", f"dataset.data_dir={data_dir}"]).dataset)
    images, labels = tfds.as_numpy(builder.as_dataset(split="train", as_supervised=True, batch_size=-1))
    cut = len(images) - round(len(images) * 0.1)
    return (images[:cut], labels[:cut].astype(np.int64)), (images[cut:], labels[cut:].astype(np.int64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architectures", nargs="*", default=["mlp", "resnet"])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--readme", action="store_true", help="write the figures into README.md")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    results, median_epochs = {}, {}
    print(host_steadiness(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(Path(tmp) / "tfds")
        arrays = load_arrays(data_dir)
        for architecture in args.architectures:
            print(f"{architecture}: {args.pairs} interleaved pairs (bare fit, then pipeline)", flush=True)
            ratios = interleaved(
                args.pairs,
                candidate=lambda a=architecture: pipeline_throughput(a, Path(tmp) / "mlflow.db", data_dir),
                baseline=lambda a=architecture: bare_fit_throughput(a, arrays),
            )
            results[architecture] = statistics.median(best for best, _ in ratios)
            median_epochs[architecture] = statistics.median(median for _, median in ratios)
    summary = ", ".join(f"{name} {ratio:.2f}" for name, ratio in results.items())
    if args.readme:
        update_readme("overhead", "\n".join([
            "| architecture | pipeline / bare `model.fit` throughput | target |", "| --- | --- | --- |",
            *[f"| `{name}` | {ratio:.2f}× | ≥ {TARGETS.get(name, 1.0):.2f}× |" for name, ratio in results.items()],
            "", f"Median of {args.pairs} interleaved pairs, each run's fastest steady epoch; with median epochs "
                f"instead: {', '.join(f'{name} {ratio:.2f}' for name, ratio in median_epochs.items())}. "
                f"On {machine()}.",
        ]))
    print(f"with each run's median epoch instead of its fastest: "
          f"{', '.join(f'{name} {ratio:.2f}' for name, ratio in median_epochs.items())}")
    print(f"pipeline/bare_fit throughput ratio: {summary} (median of {args.pairs} interleaved pairs)")


if __name__ == "__main__":
    main()
