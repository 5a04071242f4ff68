"""Start-up: from process start to the end of the first training step.

    python benchmarks/startup.py            # 5 interleaved pairs

Candidate: `python -m pipeline.train` (defaults: digits, MLflow to a fresh sqlite store
in a temporary directory, the dataset already prepared). Baseline: the tutorial's
script in a fresh interpreter: import TensorFlow, build the same MLP, compile, and
fit on the same digits arrays (`tfds.load`, already prepared). Both report the moment
their first `train_function` call returns (a `FirstStep` callback), measured from the
interpreter's start. Target: the pipeline within 8 s on 2 cores.

Last line: `startup to first step: pipeline 7.1 s, bare script 6.0 s, ratio 1.18 (median of 5 pairs)`.
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

BENCHMARKS = Path(__file__).resolve().parent
MARK = "first step done at"


class FirstStep(keras.callbacks.Callback):
    """Prints the seconds since process start when the first execution returns, then stops."""

    def on_train_batch_end(self, batch, logs=None) -> None:
        import psutil

        elapsed = time.time() - psutil.Process().create_time()
        print(f"{MARK} {elapsed:.3f}", flush=True)
        os._exit(0)  # nothing after the first step is measured


BARE = """
import sys; sys.path.insert(0, {benchmarks!r})
import keras, tensorflow_datasets as tfds
from startup import FirstStep
import pipeline.datasets  # registers digits (the tutorial would use tfds.load("mnist"))
train = tfds.load("digits", split="train", as_supervised=True, data_dir={data_dir!r}, download=False)
model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                          keras.layers.Dense(256, activation="relu"), keras.layers.Dropout(0.2),
                          keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10, activation="softmax")])
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(train.shuffle(2048).batch(32), epochs=1, callbacks=[FirstStep()], verbose=0)
"""


def seconds(command: list[str], cwd: str) -> float:
    env = os.environ | {"PYTHONPATH": str(BENCHMARKS), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith(MARK)]
    if not lines:
        raise RuntimeError(f"{command[:3]} did not reach a first step:\n{result.stderr[-3000:]}")
    return float(lines[-1].split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(Path(tmp) / "tfds")
        pipeline = [sys.executable, "-m", "pipeline.train", f"dataset.data_dir={data_dir}",
                    "+callbacks.zz_first_step._target_=startup.FirstStep"]
        subprocess.run([*pipeline[:3], f"dataset.data_dir={data_dir}", "trainer.epochs=1", "trainer.verbose=0",
                        "mlflow.log_model=false"], cwd=tmp, capture_output=True, check=True)  # prepares digits
        bare = [sys.executable, "-c", BARE.format(benchmarks=str(BENCHMARKS), data_dir=data_dir)]
        pairs = []
        for index in range(args.pairs):
            with tempfile.TemporaryDirectory() as run_dir:  # a fresh MLflow store each time, as a new user has
                base, cand = seconds(bare, run_dir), seconds(pipeline, run_dir)
            pairs.append((cand, base))
            print(f"  pair {index + 1}: pipeline {cand:.2f} s, bare script {base:.2f} s", flush=True)
    cand, base = statistics.median(c for c, _ in pairs), statistics.median(b for _, b in pairs)
    ratio = statistics.median(c / b for c, b in pairs)
    print(f"startup to first step: pipeline {cand:.1f} s, bare script {base:.1f} s, ratio {ratio:.2f} "
          f"(median of {args.pairs} pairs)")


if __name__ == "__main__":
    main()
