"""Input pipeline, MFU, precision and XLA, measured in one process; writes a table of docs/performance.md.

    python -m benchmarks.performance              # from the repository root; ~10 min on 2 cores
    python -m benchmarks.performance --docs       # also rewrite the table in docs/performance.md

All on `synthetic_mnist` (28x28x1, batch 128), models built by the pipeline's own
builders and trained by the pipeline's train step (`GuardedModel`, default checks on):

- input pipeline: batches/s of `pipeline.data`'s training pipeline alone against
  training batches/s (target >= 20x: input is never the bottleneck);
- MFU: achieved model FLOP/s in training (forward FLOPs from TensorFlow's profiler, x3
  for forward + backward) / this machine's dense float32 matmul peak, measured here
  with a large `tf.matmul`;
- precision: `precision=mixed` (resolved for this hardware, `pipeline.training.precision`)
  against float32 for resnet (target >= 0.95x), and forced `mixed_bfloat16` (reported);
- XLA: `jit_compile=True` against off, for mlp.
Ratios are medians of interleaved pairs, each run timed by its fastest steady epoch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import keras
import tensorflow as tf

from benchmarks.common import EpochTimer, Throughput, host_steadiness, interleaved, measured_on, update_docs
from pipeline import data
from pipeline.config import compose
from pipeline.train import build_model
from pipeline.training import precision
from pipeline.training.guarded import GuardedModel, TrainProgress
from pipeline.training.optim import Adam
from pipeline.training.train_state import StepGuard


def splits_for(data_dir: str):
    cfg = compose(["dataset=synthetic_mnist", f"dataset.data_dir={data_dir}"])
    return data.load(cfg.dataset, seed=42)


def training_rate(architecture: str, splits, policy: str = "float32", jit: bool = False,
                  epochs: int = 3) -> Throughput:
    """Training batches per second of the pipeline's train step (fastest and median
    steady epoch: common.py)."""
    cfg = compose([f"architecture={architecture}", "dataset=synthetic_mnist"])
    keras.backend.clear_session(free_memory=True)
    with precision.applied(policy):
        keras.utils.set_random_seed(42)
        splits.epoch.assign(0)
        model = GuardedModel(build_model(cfg, splits.input_spec), StepGuard(), epoch=splits.epoch,
                             steps_per_epoch=splits.steps_per_epoch)
        model.compile(optimizer=Adam(1e-3), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"], steps_per_execution=cfg.trainer.steps_per_execution, jit_compile=jit)
        model.fit(splits.train, steps_per_epoch=splits.steps_per_epoch, epochs=epochs, verbose=0,
                  callbacks=[TrainProgress(), EpochTimer()])
    return Throughput.of_epochs(splits.steps_per_epoch)


def input_rate(splits, epochs: int = 4) -> float:
    """Batches per second of the training pipeline alone, in its fastest epoch after the
    first (which fills the cache). One iterator serves every epoch, as in `fit`, and each
    epoch's batches are consumed by one compiled loop (traced once): a Python loop, or
    `Dataset.reduce` (which traces its reducer on every call), would time Python instead
    of the input."""

    @tf.function
    def consume(iterator, batches: tf.Tensor) -> tf.Tensor:
        examples = tf.constant(0)
        for _ in tf.range(batches):
            examples += tf.shape(tf.nest.flatten(next(iterator))[0])[0]
        return examples

    splits.epoch.assign(0)
    iterator = iter(splits.train)
    batches = tf.constant(splits.steps_per_epoch)
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        examples = int(consume(iterator, batches))
        seconds.append(time.perf_counter() - started)
    assert examples == splits.sizes["train"], (examples, splits.sizes)  # exactly one epoch per call
    return splits.steps_per_epoch / min(seconds[1:])


def forward_flops(architecture: str, splits) -> float:
    """FLOPs of one forward pass over one example, from TensorFlow's profiler."""
    cfg = compose([f"architecture={architecture}", "dataset=synthetic_mnist"])
    keras.backend.clear_session()
    model = build_model(cfg, splits.input_spec)
    spec = tf.TensorSpec((1, *splits.input_spec.shape), splits.input_spec.dtype)
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    tf.get_logger().setLevel("ERROR")  # the v1 profiler warns about its own deprecation at length
    return float(tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops)


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """Dense float32 matmul FLOP/s of this machine (the MFU denominator)."""
    a, b = tf.random.normal((size, size)), tf.random.normal((size, size))
    product = tf.function(lambda a, b: tf.matmul(a, b))
    product(a, b).numpy()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        product(a, b).numpy()
        times.append(time.perf_counter() - started)
    return 2 * size**3 / min(times)


def paired(pairs: int, candidate, baseline) -> float:
    """The median over interleaved pairs of the fastest-epoch throughput ratio."""
    return interleaved(pairs, candidate, baseline).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--docs", action="store_true", help="write the figures into docs/performance.md")
    args = parser.parse_args()
    rows = []
    steadiness = host_steadiness()
    print(steadiness, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        splits = splits_for(str(Path(tmp) / "tfds"))
        peak = matmul_peak()
        print(f"dense float32 matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
        for architecture in ("mlp", "resnet"):
            train_rate = training_rate(architecture, splits).best
            ratio = statistics.median(input_rate(splits) / training_rate(architecture, splits).best
                                      for _ in range(max(1, args.pairs // 2)))
            flops = 3 * forward_flops(architecture, splits) * 128 * train_rate
            print(f"{architecture}: {train_rate * 128:,.0f} examples/s; input pipeline {ratio:.0f}x training; "
                  f"MFU {flops / peak:.1%} ({flops / 1e9:.2f} GFLOP/s)", flush=True)
            rows += [f"| input pipeline / training throughput, `{architecture}` | {ratio:.0f}× | ≥ 20× |",
                     f"| MFU, `{architecture}` (model FLOP/s ÷ matmul peak {peak / 1e9:.0f} GFLOP/s) | "
                     f"{flops / peak:.1%} | reported |"]
        mixed = precision.resolve("mixed")
        print(f"precision=mixed resolves to {mixed.policy} here: {mixed.reason}", flush=True)
        mixed_ratio = paired(args.pairs, lambda: training_rate("resnet", splits, "mixed", epochs=2),
                             lambda: training_rate("resnet", splits, "float32", epochs=2))
        print(f"resnet precision=mixed ({mixed.policy}) / float32 throughput: {mixed_ratio:.2f}", flush=True)
        bf16_pairs = max(1, args.pairs // 2)  # emulated bf16 is slow where AMX is missing
        bf16 = paired(bf16_pairs, lambda: training_rate("resnet", splits, "mixed_bfloat16", epochs=2),
                      lambda: training_rate("resnet", splits, "float32", epochs=2))
        print(f"resnet mixed_bfloat16 (forced) / float32 throughput: {bf16:.2f}", flush=True)
        xla = paired(args.pairs, lambda: training_rate("mlp", splits, jit=True),
                     lambda: training_rate("mlp", splits, jit=False))
        print(f"mlp jit_compile=True / False throughput: {xla:.2f}", flush=True)
        rows += [f"| `precision=mixed` ({mixed.policy} here) / fp32 throughput, `resnet` | {mixed_ratio:.2f}× "
                 "| ≥ 0.95× |",
                 f"| `precision=mixed_bf16` (forced) / fp32 throughput, `resnet`, {bf16_pairs} pair(s) | {bf16:.2f}× "
                 "| reported |",
                 f"| `trainer.jit_compile=true` / false throughput, `mlp` | {xla:.2f}× | reported |"]
    if args.docs:
        update_docs("performance", "\n".join([
            "| measure | value | target |", "| --- | --- | --- |", *rows, "",
            measured_on(), "", f"By `python -m benchmarks.performance`; {steadiness}."]))


if __name__ == "__main__":
    main()
