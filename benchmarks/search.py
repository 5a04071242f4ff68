"""A search with our sweeper against a hand-written tuner loop: KerasTuner's `RandomSearch`.

    python -m benchmarks.search                      # from the repository root: 24 trials of 10 epochs, each arm once
    python -m benchmarks.search --rounds 2 --docs    # twice, in turning order; the table into docs/performance.md
    python -m benchmarks.search --trials 6 --epochs 3   # a quick look

Three arms, each a fresh process in a fresh directory, on the same space (`optimizer.lr`
log-uniform in 1e-4..3e-2, `architecture.dropout` in 0..0.5), the default `mlp` on
`digits`, early stopping off:

- `keras-tuner`: KerasTuner 1.4.8's `RandomSearch` building the same model
  (`architectures.mlp.build`) on the same splits (`pipeline.data.load`), compiled as a
  KerasTuner user would (Adam, `model.fit` with Keras's defaults), objective `val_accuracy`
  (KerasTuner scores a trial by its best epoch). KerasTuner imports TensorBoard in every
  `search()` (`Tuner._configure_tensorboard_dir`) and TensorFlow 2.21 no longer installs
  it: the `dev` extra installs `tensorboard` beside `keras-tuner`; without it this arm
  stops with the `pip install` line.
- `unpruned`: `python -m pipeline.train hparams_search=optuna ... hydra.sweeper.pruner=none`,
  everything a search records in MLflow included (its best trial's plots and SavedModel).
- `pruned`: the same with the default median pruner.

The arms run in turning order (round 1: keras-tuner, unpruned, pruned; round 2 starts
with unpruned, ...), and the ratios are medians over rounds. Wall time is the whole
command, interpreter start and imports included, for all three. Targets: unpruned <= 1.1x
KerasTuner's wall time; pruned <= 0.6x unpruned, with its best within 0.01.

Last line: `search 24x10: pipeline/keras-tuner wall X.XX (unpruned), pruned/unpruned wall Y.YY,
best val accuracy A vs B vs C` (KerasTuner, unpruned, pruned).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, host_steadiness, measured_on, update_docs

ARMS = ("keras-tuner", "unpruned", "pruned")
LR_RANGE, DROPOUT_RANGE = (1e-4, 3e-2), (0.0, 0.5)  # conf/hparams_search/optuna.yaml's space
SEED = 42


def environment() -> dict[str, str]:
    # The repository first on the path (also in a worktree whose package is installed from another).
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {
        "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def run_arm(arm: str, trials: int, epochs: int, directory: Path, data_dir: str) -> dict:
    """One search in a fresh process in `directory`: {seconds, best, pruned}."""
    directory.mkdir(parents=True)
    if arm == "keras-tuner":
        command = [sys.executable, "-m", "benchmarks.search", "--keras-tuner-arm", str(directory),
                   "--trials", str(trials), "--epochs", str(epochs), "--data-dir", data_dir]
    else:
        command = [sys.executable, "-m", "pipeline.train", "hparams_search=optuna", f"hydra.sweeper.n_trials={trials}",
                   f"hydra.sweeper.pruner={'none' if arm == 'unpruned' else 'median'}", f"trainer.epochs={epochs}",
                   "trainer.verbose=0", "callbacks.early_stopping=null", f"dataset.data_dir={data_dir}",
                   f"optimizer.lr=tag(log,interval({LR_RANGE[0]},{LR_RANGE[1]}))",
                   f"architecture.dropout=interval({DROPOUT_RANGE[0]},{DROPOUT_RANGE[1]})"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=directory, env=environment(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (directory / "stdout.txt").write_text(result.stdout)
    (directory / "stderr.txt").write_text(result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"the {arm} arm failed:\n{result.stderr[-3000:]}")
    if arm == "keras-tuner":
        return {"seconds": seconds, **json.loads(result.stdout.strip().splitlines()[-1])}
    import optuna

    storage = f"sqlite:///{directory / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    return {"seconds": seconds, "best": study.best_value, "pruned": pruned}


def keras_tuner_arm(directory: Path, trials: int, epochs: int, data_dir: str) -> None:
    """KerasTuner's RandomSearch over the same model, data and space; prints {best} as JSON."""
    try:
        import tensorboard  # noqa: F401  (KerasTuner imports it in every search())
    except ImportError:
        raise SystemExit("KerasTuner's search() imports tensorboard, which TensorFlow 2.21 no longer installs: "
                         "pip install -e '.[dev]' (or pip install keras-tuner tensorboard)") from None
    import keras
    import keras_tuner

    from architectures import mlp
    from pipeline import data
    from pipeline.config import compose

    cfg = compose([f"dataset.data_dir={data_dir}"])
    splits = data.load(cfg.dataset, seed=SEED)

    def build(hp: keras_tuner.HyperParameters) -> keras.Model:
        model = mlp.build(splits.input_spec, hidden_units=list(cfg.architecture.hidden_units),
                          dropout=hp.Float("dropout", *DROPOUT_RANGE))
        model.compile(optimizer=keras.optimizers.Adam(hp.Float("lr", *LR_RANGE, sampling="log")),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    tuner = keras_tuner.RandomSearch(build, objective="val_accuracy", max_trials=trials, seed=SEED,
                                     directory=str(directory), project_name="search", overwrite=True)
    tuner.search(splits.train, steps_per_epoch=splits.steps_per_epoch, validation_data=splits.val, epochs=epochs,
                 verbose=0)
    print(json.dumps({"best": float(tuner.oracle.get_best_trials(1)[0].score), "pruned": 0}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="each arm this many times, in turning order")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/performance.md")
    parser.add_argument("--keep", type=Path, help="run in this new directory and keep it (studies, stores, logs)")
    parser.add_argument("--keras-tuner-arm", type=Path, help=argparse.SUPPRESS)  # the arm's own process
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.keras_tuner_arm:
        keras_tuner_arm(args.keras_tuner_arm, args.trials, args.epochs, args.data_dir)
        return
    print(host_steadiness(), f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with (contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory()) as tmp:
        data_dir = str(Path(tmp) / "tfds")
        for index in range(args.rounds):
            order = ARMS[index % len(ARMS):] + ARMS[:index % len(ARMS)]
            for arm in order:
                result = run_arm(arm, args.trials, args.epochs, Path(tmp) / f"{arm}-{index}", data_dir)
                results[arm].append(result)
                print(f"  round {index + 1} {arm}: {result['seconds']:.0f} s, best val accuracy {result['best']:.4f}, "
                      f"{result['pruned']} of {args.trials} pruned; load {os.getloadavg()[0]:.1f}", flush=True)

    def ratio(candidate: str, baseline: str) -> float:
        return statistics.median(c["seconds"] / b["seconds"] for c, b in zip(results[candidate], results[baseline]))

    vs_tuner, pruned = ratio("unpruned", "keras-tuner"), ratio("pruned", "unpruned")
    best = {arm: max(r["best"] for r in results[arm]) for arm in ARMS}
    line = (f"search {args.trials}x{args.epochs}: pipeline/keras-tuner wall {vs_tuner:.2f} (unpruned), "
            f"pruned/unpruned wall {pruned:.2f}, best val accuracy "
            + " vs ".join(f"{best[arm]:.4f}" for arm in ARMS))
    if args.docs:
        rows = [f"| {arm} | {statistics.median(r['seconds'] for r in results[arm]):.0f} | "
                f"{statistics.median(r['pruned'] for r in results[arm]):.0f} of {args.trials} | {best[arm]:.4f} |"
                for arm in ARMS]
        update_docs("search", "\n".join([
            "| search | wall time (s, median) | trials pruned | best val accuracy |", "| --- | --- | --- | --- |",
            *rows, "", f"`{line}`", "",
            f"`python -m benchmarks.search --trials {args.trials} --epochs {args.epochs} --rounds {args.rounds}` "
            f"(targets: unpruned <= 1.1x KerasTuner; pruned <= 0.6x unpruned, best within 0.01), "
            f"load average {os.getloadavg()[0]:.1f} at the end. {measured_on()}",
        ]))
    print(line)


if __name__ == "__main__":
    main()
