"""Where the guarded train step's time goes: the compiled step alone, with its update gated
four ways, against Keras's plain step.

    python -m benchmarks.guard_step                    # from the repository root: mlp, 10 rounds
    python -m benchmarks.guard_step --rounds 8 resnet

Each variant is `GuardedModel`'s own train function (16 steps per execution) on the same
model, optimizer and in-memory batches, run for `--executions` executions a round, the
order turning each round:

- unchecked: no guard, Keras's step (the baseline);
- guarded: the pipeline's step: the update applied only once the step is known good
  (`cross_replica.cond` on the loss and global norm);
- ungated: every norm and statistic computed, the update applied whatever they say;
- ordered: the update applied after the check (a control dependency), with no `cond`;
- copy_restore: the update applied at once, and the weights and optimizer slots put back
  from a copy, taken every step, when the step is bad.

Only `guarded` keeps "a bad step is never applied"; the others say what that costs and
why. Printed per variant: throughput against `unchecked` (median of the paired rounds,
and best against best) and CPU time against `unchecked`. A check that adds waiting
rather than work shows as a throughput ratio below its CPU-time ratio's inverse.

Last line: `guarded step / unchecked step: mlp 0.91 (median of 12 rounds); ungated 0.97, ordered 0.94,
copy_restore 0.90`.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import numpy as np

VARIANTS = ("unchecked", "guarded", "ungated", "ordered", "copy_restore")


@contextlib.contextmanager
def gated_by(kind: str):
    """While the step is traced, take its apply/skip decision the `kind` way."""
    import tensorflow as tf

    from pipeline.training import cross_replica

    real = cross_replica.cond

    def cond(pred, true_fn, false_fn, args=()):
        if kind == "ungated":
            true_fn(*args)
            return pred
        if kind == "ordered":
            with tf.control_dependencies([pred]):
                true_fn(*args)
            return pred
        raise AssertionError(kind)

    cross_replica.cond = cond
    try:
        yield
    finally:
        cross_replica.cond = real


def variant(kind: str, architecture: str, cfg, batches):
    """A compiled `GuardedModel` train function for `kind`, traced and warmed up."""
    import keras
    import tensorflow as tf

    from architectures import InputSpec
    from pipeline.train import build_model, build_optimizer, compile_args
    from pipeline.training.guarded import GuardedModel
    from pipeline.training.train_state import StepGuard

    class Variant(GuardedModel):
        copies = None

        def _guarded_step(self, data, state):
            if kind in ("ungated", "ordered"):
                with gated_by(kind):
                    return super()._guarded_step(data, state)
            if kind != "copy_restore":
                return super()._guarded_step(data, state)
            changed = [*self.model.trainable_variables, *self.optimizer.variables]
            if self.copies is None:  # once: the step is traced more than once
                with tf.init_scope():
                    self.copies = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False) for v in changed]
            copies = self.copies
            for copy, variable in zip(copies, changed):
                copy.assign(variable)
            with gated_by("ungated"):
                ok = super()._guarded_step(data, state)

            def restore():
                for copy, variable in zip(copies, changed):
                    variable.assign(copy)
                return tf.constant(False)

            return tf.cond(ok, lambda: tf.constant(True), restore)

    keras.utils.set_random_seed(0)
    model = build_model(cfg, InputSpec(shape=(28, 28, 1), dtype="uint8", num_classes=10), architecture)
    guarded = Variant(model, None if kind == "unchecked" else StepGuard(), epoch=tf.Variable(0, dtype=tf.int64),
                      steps_per_epoch=10**9)
    guarded.compile(optimizer=build_optimizer(cfg, 100), **compile_args(cfg.architecture), steps_per_execution=16)
    guarded.optimizer.build(model.trainable_variables)
    guarded.build_metrics(next(iter(batches.take(1))))
    guarded.build_train_state()
    train_function = guarded.make_train_function()
    iterator = iter(batches)
    train_function(iterator)  # traced and compiled
    return train_function, iterator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architecture", nargs="?", default="mlp")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--executions", type=int, default=30, help="executions of 16 steps per variant and round")
    args = parser.parse_args()
    import tensorflow as tf

    from benchmarks.common import host_steadiness
    from pipeline.plan import compose

    print(host_steadiness(), flush=True)
    cfg = compose([f"architecture={args.architecture}", "dataset=synthetic_mnist"]).cfg
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (128 * 64, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 128 * 64)
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(128, drop_remainder=True).cache().repeat()
    batches = batches.prefetch(4)
    functions = {kind: variant(kind, args.architecture, cfg, batches) for kind in VARIANTS}

    seconds = {kind: [] for kind in VARIANTS}
    cpu = {kind: [] for kind in VARIANTS}
    for index in range(args.rounds):
        for kind in VARIANTS[index % len(VARIANTS):] + VARIANTS[:index % len(VARIANTS)]:
            train_function, iterator = functions[kind]
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.executions):
                logs = train_function(iterator)
            float(logs["loss"])  # the last execution has finished
            seconds[kind].append(time.perf_counter() - start)
            cpu[kind].append(time.process_time() - start_cpu)
        print(f"  round {index + 1}: " + ", ".join(f"{kind} {seconds[kind][-1]:.2f} s" for kind in VARIANTS),
              flush=True)

    base = seconds["unchecked"]
    paired = {kind: statistics.median(b / s for b, s in zip(base, seconds[kind])) for kind in VARIANTS}
    base_cpu = statistics.median(cpu["unchecked"])
    for kind in VARIANTS[1:]:
        print(f"{kind:>12}: throughput {paired[kind]:.3f}x of unchecked (paired median; best/best "
              f"{min(base) / min(seconds[kind]):.3f}x), CPU time {statistics.median(cpu[kind]) / base_cpu:.3f}x")
    print(f"guarded step / unchecked step: {args.architecture} {paired['guarded']:.2f} (median of {args.rounds} "
          f"rounds); " + ", ".join(f"{kind} {paired[kind]:.2f}" for kind in VARIANTS[2:]))


if __name__ == "__main__":
    main()
