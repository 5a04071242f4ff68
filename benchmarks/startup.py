"""Start-up: from process start to the end of the first training step.

    python -m benchmarks.startup            # from the repository root; 5 interleaved pairs

Candidate: `python -m pipeline.train` (defaults: digits, MLflow to the sqlite store in
the working directory, which an earlier run created, the dataset already prepared). Baseline: the tutorial's
script in a fresh interpreter: import TensorFlow, build the same MLP (the widths, dropout
and activation of conf/architecture/mlp.yaml), compile, and fit on the same digits
(`tfds.load`, already prepared) with the same batch size (conf/dataset/digits.yaml).
Both report the moment their first `train_function` call returns (a `FirstStep`
callback), measured from the interpreter's start. Targets: the pipeline within 1.25x of
the bare script, and within 8 s wherever the bare script takes 6 s or less.

Each pair also times the pipeline's very first run in a new directory, which creates
the sqlite store (MLflow's schema migrations, once per store), and reports it apart.

Last line: `startup to first step: pipeline X s (first run, creating the store: Y s),
bare script Z s, ratio X/Z (median of 5 pairs)`. With `--docs`, the figures go
into docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import keras
from omegaconf import OmegaConf

from benchmarks.common import REPO, measured_on, update_docs

MARK = "first step done at"


class FirstStep(keras.callbacks.Callback):
    """Prints the seconds since process start when the first execution returns, then stops."""

    def on_train_batch_end(self, batch, logs=None) -> None:
        import psutil

        elapsed = time.time() - psutil.Process().create_time()
        print(f"{MARK} {elapsed:.3f}", flush=True)
        os._exit(0)  # nothing after the first step is measured


# Self-contained: importing the `benchmarks` package would import TensorFlow through
# pipeline.quiet (benchmarks/__init__.py), which the tutorial's script does not do.
BARE = """
import os, time
import keras, psutil, tensorflow_datasets as tfds
import pipeline.datasets  # registers digits (the tutorial would use tfds.load("mnist"))


class FirstStep(keras.callbacks.Callback):  # as benchmarks.startup.FirstStep
    def on_train_batch_end(self, batch, logs=None):
        print(f"{mark} {{time.time() - psutil.Process().create_time():.3f}}", flush=True)
        os._exit(0)


train = tfds.load("digits", split="train", as_supervised=True, data_dir={data_dir!r}, download=False)
model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten()])
for units in {hidden_units!r}:
    model.add(keras.layers.Dense(units, activation={activation!r}))
    model.add(keras.layers.Dropout({dropout!r}))
model.add(keras.layers.Dense(10, activation="softmax"))
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(train.shuffle(2048).batch({batch_size!r}), epochs=1, callbacks=[FirstStep()], verbose=0)
"""


def bare_script(data_dir: str) -> str:
    """The tutorial's script with the MLP and batch size `python -m pipeline.train` trains by default."""
    mlp = OmegaConf.load(REPO / "conf" / "architecture" / "mlp.yaml")
    digits = OmegaConf.load(REPO / "conf" / "dataset" / "digits.yaml")
    return BARE.format(mark=MARK, data_dir=data_dir, hidden_units=[int(units) for units in mlp.hidden_units],
                       activation=mlp.activation, dropout=float(mlp.dropout), batch_size=int(digits.batch_size))


def seconds(command: list[str], cwd: str) -> float:
    # Both run in a temporary directory, with this checkout's packages importable.
    env = os.environ | {"PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith(MARK)]
    if not lines:
        raise RuntimeError(f"{command[:3]} did not reach a first step:\n{result.stderr[-3000:]}")
    return float(lines[-1].split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--docs", action="store_true", help="write the figures into docs/performance.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(Path(tmp) / "tfds")
        pipeline = [sys.executable, "-m", "pipeline.train", f"dataset.data_dir={data_dir}",
                    "+callbacks.zz_first_step._target_=benchmarks.startup.FirstStep"]
        subprocess.run([*pipeline[:3], f"dataset.data_dir={data_dir}", "trainer.epochs=1", "trainer.verbose=0",
                        "mlflow.log_model=false"], cwd=tmp, capture_output=True, check=True)  # prepares digits
        bare = [sys.executable, "-c", bare_script(data_dir)]
        pairs = []  # (pipeline with the store of earlier runs, pipeline creating its store, bare script)
        for index in range(args.pairs):
            with tempfile.TemporaryDirectory() as run_dir:
                base = seconds(bare, run_dir)
                fresh = seconds(pipeline, run_dir)  # creates ./mlflow.db: a new user's first run
                cand = seconds(pipeline, run_dir)  # every run after that
            pairs.append((cand, fresh, base))
            print(f"  pair {index + 1}: pipeline {cand:.2f} s (creating its store {fresh:.2f} s), "
                  f"bare script {base:.2f} s", flush=True)
    cand, fresh, base = (statistics.median(p[i] for p in pairs) for i in range(3))
    ratio = statistics.median(c / b for c, _, b in pairs)
    if args.docs:
        update_docs("startup", "\n".join([
            "| start-up to the end of the first training step | seconds |", "| --- | --- |",
            f"| `python -m pipeline.train` (MLflow store exists) | {cand:.1f} |",
            f"| `python -m pipeline.train` (first run: creates the sqlite store) | {fresh:.1f} |",
            f"| the tutorial's bare script | {base:.1f} |",
            f"| pipeline / bare script | {ratio:.2f}× (target ≤ 1.25×) |",
            "", measured_on(),
            "", f"Median of {args.pairs} interleaved runs; target ≤ 8 s where the bare script takes ≤ 6 s.",
        ]))
    print(f"startup to first step: pipeline {cand:.1f} s (first run, creating the store: {fresh:.1f} s), "
          f"bare script {base:.1f} s, ratio {ratio:.2f} (median of {args.pairs} pairs)")

if __name__ == "__main__":
    main()
