"""The full pipeline against two bare `model.fit` scripts: the tutorial's, and one tuned as the pipeline is.

    python -m benchmarks.overhead                 # from the repository root: mlp and resnet, 5 rounds each (~30 min)
    python -m benchmarks.overhead --pairs 7 mlp   # one architecture

Candidate: `pipeline.train.train` with the default config (every default callback:
gradient-norm and finite checks, checkpoints, early stopping, per-epoch MLflow logging
to a temporary sqlite store) on `synthetic_mnist` (28x28x1, 10.8k training examples,
batch 128). Baselines, same model and data:

- bare: the tutorial's script, `model.fit` with Keras defaults over
  `from_tensor_slices -> shuffle -> batch -> prefetch` of the same arrays;
- tuned: `model.fit` set up as the pipeline sets up its own, with none of its
  machinery: the same `steps_per_execution` (16), the same optimizer (the fused Adam
  kernel, `pipeline.training.optim`) and the same input pipeline (`pipeline.data.load`:
  cached, a seeded permutation gathered a batch at a time, prefetched, one iterator over
  consecutive epochs for the whole fit), validating every 80 steps (the pipeline: every
  85, one data epoch); no guard, no callbacks, no MLflow. pipeline/tuned is what the
  pipeline's machinery costs.

Each round runs bare, tuned and pipeline, the order turning by one each round.
Throughput is training examples per second of steady-state epoch time (the first,
compiling epoch excluded), validation and all per-epoch work included, counted from
the optimizer steps each epoch took: each run's fastest steady epoch, because this
host runs the VM at full or about half speed for seconds at a time (see `common.py`);
the ratio from median epochs, and each ratio's lowest and highest round, are printed too.

The last line reads `pipeline/bare_fit throughput ratio: mlp X, resnet Y; pipeline/tuned_fit:
mlp X2, resnet Y2 (median of 5 interleaved rounds)`. With `--docs`, the figures go into docs/performance.md.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from benchmarks.common import (
    TRAIN_EXAMPLES,
    EpochTimer,
    Ratio,
    Throughput,
    host_steadiness,
    interleaved_runs,
    measured_on,
    update_docs,
)

# The first epoch compiles and is not timed; mlp: more of its 0.4 s epochs, more chances of an unslowed one.
EPOCHS = {"mlp": 12, "resnet": 4}
TARGETS = {"bare": {"mlp": 1.3, "resnet": 0.97}, "tuned": {"mlp": 0.97, "resnet": 0.97}}
STEPS_PER_EPOCH = math.ceil(TRAIN_EXAMPLES / 128)
EXAMPLES_PER_STEP = TRAIN_EXAMPLES / STEPS_PER_EPOCH


def overrides(architecture: str, data_dir: str) -> list[str]:
    return [f"architecture={architecture}", "dataset=synthetic_mnist", f"dataset.data_dir={data_dir}",
            f"trainer.epochs={EPOCHS[architecture]}", "trainer.verbose=0"]


def pipeline_throughput(architecture: str, store: Path, data_dir: str) -> Throughput:
    from pipeline.plan import compose
    from pipeline.train import train

    train(compose([*overrides(architecture, data_dir), f"mlflow.tracking_uri=sqlite:///{store}",
                   f"callbacks.checkpoint.directory={store.parent / 'checkpoints'}",
                   "+callbacks.zz_timer._target_=benchmarks.common.EpochTimer"]))
    return Throughput.of_steps(EXAMPLES_PER_STEP)


def tuned_fit_throughput(architecture: str, data_dir: str) -> Throughput:
    """`model.fit` with the pipeline's settings and input pipeline, and nothing else of it."""
    import keras

    from pipeline import data
    from pipeline.plan import compose
    from pipeline.train import build_model, build_optimizer, compile_args

    keras.backend.clear_session(free_memory=True)
    cfg = compose(overrides(architecture, data_dir)).cfg
    keras.utils.set_random_seed(cfg.seed)
    splits = data.load(cfg.dataset, seed=cfg.seed)
    model = build_model(cfg, splits.input_spec, architecture)
    per_execution = cfg.trainer.steps_per_execution
    model.compile(optimizer=build_optimizer(cfg, splits.steps_per_epoch), **compile_args(cfg.architecture),
                  steps_per_execution=per_execution)
    # One iterator for the whole fit, as the pipeline reads its data: `splits.train` is
    # the epochs back to back, without end, and a `steps_per_epoch` keeps Keras on the same
    # iterator. (A finite dataset costs Keras a new iterator and a cold prefetch every
    # epoch, 30-40 ms here: 8% of an `mlp` epoch.) Keras's own train function runs whole
    # executions, so its epoch is 80 steps, 5 x 16, where the pipeline's is the data's 85
    # (85 would run 6 x 16 = 96): the tuned fit validates a little more often per step.
    model.fit(splits.train, steps_per_epoch=splits.steps_per_epoch // per_execution * per_execution,
              validation_data=splits.val, epochs=cfg.trainer.epochs, verbose=0, callbacks=[EpochTimer()])
    return Throughput.of_steps(EXAMPLES_PER_STEP)


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
    return Throughput.of_steps(EXAMPLES_PER_STEP)


def load_arrays(data_dir: str):
    """The exact train/validation examples the pipeline uses (TFDS train split, last 10% validates)."""
    import numpy as np
    import tensorflow_datasets as tfds

    from pipeline.config import compose
    from pipeline.data import reader

    builder = reader(compose(["dataset=synthetic_mnist", f"dataset.data_dir={data_dir}"]).dataset).builder()
    images, labels = tfds.as_numpy(builder.as_dataset(split="train", as_supervised=True, batch_size=-1))
    cut = len(images) - round(len(images) * 0.1)
    return (images[:cut], labels[:cut].astype(np.int64)), (images[cut:], labels[cut:].astype(np.int64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architectures", nargs="*", default=["mlp", "resnet"])
    parser.add_argument("--pairs", type=int, default=5, help="interleaved rounds of bare, tuned, pipeline")
    parser.add_argument("--docs", action="store_true", help="write the figures into docs/performance.md")
    args = parser.parse_args()
    ratios: dict[str, dict[str, Ratio]] = {"bare": {}, "tuned": {}}  # baseline -> architecture -> pipeline/baseline
    steadiness = host_steadiness()
    print(steadiness, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(Path(tmp) / "tfds")
        arrays = load_arrays(data_dir)
        for architecture in args.architectures:
            print(f"{architecture}: {args.pairs} interleaved rounds (bare fit, tuned fit, pipeline)", flush=True)
            rounds = interleaved_runs(args.pairs, {
                "bare": lambda a=architecture: bare_fit_throughput(a, arrays),
                "tuned": lambda a=architecture: tuned_fit_throughput(a, data_dir),
                "pipeline": lambda a=architecture: pipeline_throughput(a, Path(tmp) / "mlflow.db", data_dir),
            })
            for baseline, by_architecture in ratios.items():
                by_architecture[architecture] = Ratio.of(rounds, "pipeline", baseline)

    def figures(baseline: str, by_median_epochs: bool = False) -> str:
        return ", ".join(f"{name} {ratio.by_median_epochs if by_median_epochs else ratio.median:.2f}"
                         for name, ratio in ratios[baseline].items())

    if args.docs:
        update_docs("overhead", "\n".join([
            "| architecture | pipeline / bare `model.fit` | target | pipeline / tuned `model.fit` | target |",
            "| --- | --- | --- | --- | --- |",
            *[f"| `{name}` | {ratios['bare'][name].cell('rounds')} | ≥ {TARGETS['bare'].get(name, 1.0):.2f}× "
              f"| {ratios['tuned'][name].cell('rounds')} | ≥ {TARGETS['tuned'].get(name, 0.97):.2f}× |"
              for name in args.architectures],
            "", measured_on(),
            "", f"Throughput ratios, median of {args.pairs} interleaved rounds, each run's fastest steady epoch; "
                f"with median epochs instead: bare {figures('bare', True)}, tuned {figures('tuned', True)}; "
                f"{steadiness}.",
        ]))
    print("rounds' lowest-highest pipeline/tuned_fit: " + ", ".join(
        f"{name} {ratio.low:.2f}-{ratio.high:.2f}" for name, ratio in ratios["tuned"].items()))
    print(f"with each run's median epoch instead of its fastest: pipeline/bare_fit {figures('bare', True)}; "
          f"pipeline/tuned_fit {figures('tuned', True)}")
    print(f"pipeline/bare_fit throughput ratio: {figures('bare')}; pipeline/tuned_fit: "
          f"{figures('tuned')} (median of {args.pairs} interleaved rounds)")


if __name__ == "__main__":
    main()
