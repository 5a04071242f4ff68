"""What the default callbacks cost: the pipeline with them against the pipeline without.

    python -m benchmarks.callbacks_overhead               # from the repository root: mlp, 7 pairs
    python -m benchmarks.callbacks_overhead --pairs 5 resnet

Candidate: the default `callbacks` group (in-graph gradient-norm and finite checks with
per-layer norms logged every 50 steps, checkpoints every 500 steps and at each epoch's
end, early stopping). Baseline: `callbacks=none`, i.e. Keras' own train step with only the
per-epoch MLflow logging. Both run `pipeline.train.train` in this process, interleaved,
on `synthetic_mnist` (10.8k training examples, batch 128). Target: >= 0.97.

Last line: `callbacks on/off throughput ratio: mlp 0.99 (median of 7 interleaved pairs)`.
With `--docs`, the figures go into docs/performance.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import (
    TRAIN_EXAMPLES,
    Throughput,
    host_steadiness,
    interleaved,
    measured_on,
    update_docs,
)

EPOCHS = {"mlp": 6, "resnet": 3}


def throughput(architecture: str, callbacks: str, store: Path, data_dir: str) -> Throughput:
    from pipeline.plan import compose
    from pipeline.train import train

    train(compose([f"architecture={architecture}", "dataset=synthetic_mnist", f"dataset.data_dir={data_dir}",
                   f"callbacks={callbacks}", f"trainer.epochs={EPOCHS[architecture]}", "trainer.verbose=0",
                   "mlflow.log_model=false", f"mlflow.tracking_uri=sqlite:///{store}",
                   "+callbacks.zz_timer._target_=benchmarks.common.EpochTimer",
                   # not in the working directory: callbacks=none has no checkpoint node to set
                   *([f"callbacks.checkpoint.directory={store.parent / 'checkpoints'}"] if callbacks == "default"
                     else [])]))
    return Throughput.of_epochs(TRAIN_EXAMPLES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architectures", nargs="*", default=["mlp"])
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--docs", action="store_true", help="write the figures into docs/performance.md")
    args = parser.parse_args()
    results = {}
    steadiness = host_steadiness()
    print(steadiness, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        store, data_dir = Path(tmp) / "mlflow.db", str(Path(tmp) / "tfds")
        for architecture in args.architectures:
            print(f"{architecture}: {args.pairs} interleaved pairs (callbacks=none, then default)", flush=True)
            results[architecture] = interleaved(
                args.pairs, candidate=lambda a=architecture: throughput(a, "default", store, data_dir),
                baseline=lambda a=architecture: throughput(a, "none", store, data_dir))
    summary = ", ".join(f"{name} {ratio.median:.2f}" for name, ratio in results.items())
    if args.docs:
        update_docs("callbacks", "\n".join([
            "| architecture | default callbacks / `callbacks=none` throughput | target |", "| --- | --- | --- |",
            *[f"| `{name}` | {ratio.cell('pairs')} | ≥ 0.97× |" for name, ratio in results.items()],
            "", measured_on(),
            "", f"Median of {args.pairs} interleaved pairs, each run's fastest steady epoch; with median epochs "
            "instead: " + ", ".join(f"{name} {ratio.by_median_epochs:.2f}" for name, ratio in results.items())
            + f"; {steadiness}.",
        ]))
    print(f"callbacks on/off throughput ratio: {summary} (median of {args.pairs} interleaved pairs)")


if __name__ == "__main__":
    main()
