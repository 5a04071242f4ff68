"""Train every architecture with its defaults and measure what it reaches (docs/architectures.md's table).

    python -m benchmarks.architecture_table --docs            # from the repository root: all families, ~10 min
    python -m benchmarks.architecture_table --docs mlp resnet # a subset (the table keeps the rest)

Each family trains exactly as `python -m pipeline.train architecture=NAME` would (on
`digits`; `multi_io` on `synthetic_multimodal`), logging to a throwaway MLflow store.
With `--docs`, the table between the `architecture-table` markers of docs/architectures.md
is rewritten from the measurements; no number in it is typed by hand.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import mlflow

from benchmarks.common import REPO, measured_on, update_docs
from pipeline.plan import compose
from pipeline.train import train

DOCS = REPO / "docs" / "architectures.md"
MARKER = "architecture-table"
DATASET = {"multi_io": "synthetic_multimodal"}


def measure(name: str, store: Path) -> dict[str, str]:
    dataset = DATASET.get(name, "digits")
    overrides = [f"architecture={name}", f"dataset={dataset}", f"mlflow.tracking_uri=sqlite:///{store}",
                 f"callbacks.checkpoint.directory={store.parent / 'checkpoints'}"]
    run_plan = compose([*overrides, "trainer.verbose=0"])
    started = time.perf_counter()
    metrics = train(run_plan)
    seconds = time.perf_counter() - started
    run = mlflow.search_runs(experiment_names=[dataset], order_by=["start_time DESC"], max_results=1,
                             output_format="list")[0]
    epochs = len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss"))
    accuracy = (f"binary {metrics['test_binary_accuracy']:.3f}, category {metrics['test_category_accuracy']:.3f}"
                if name == "multi_io" else f"{metrics['test_accuracy']:.3f}")
    return {"architecture": f"`{name}`", "dataset": dataset, "test accuracy": accuracy,
            "parameters": f"{int(run.data.params['model.parameters']):,}", "epochs run": str(epochs),
            "run time (s)": f"{seconds:.0f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architectures", nargs="*", help="families to measure (default: every one in conf/)")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/architectures.md")
    args = parser.parse_args()
    names = args.architectures or sorted(p.stem for p in (REPO / "conf" / "architecture").glob("*.yaml"))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        # One untimed epoch first, so no row pays for TensorFlow's one-time start-up.
        train(compose(["trainer.epochs=1", "trainer.verbose=0", "mlflow.log_model=false",
                       f"mlflow.tracking_uri=sqlite:///{Path(tmp) / 'warmup.db'}",
                       f"callbacks.checkpoint.directory={Path(tmp) / 'checkpoints'}"]))
        for name in names:
            rows[name] = measure(name, Path(tmp) / "mlflow.db")
            print(" | ".join(rows[name].values()), flush=True)
    if not args.docs:
        return
    # Keep the rows of families not measured this time.
    old_table = DOCS.read_text().partition(f"<!-- {MARKER}:start -->")[2].partition(f"<!-- {MARKER}:end -->")[0]
    for line in old_table.strip().splitlines():
        match = re.match(r"\| `(\w+)` \|", line)
        if match and match.group(1) not in rows:
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[match.group(1)] = dict(zip(next(iter(rows.values())).keys(), cells))
    header = list(next(iter(rows.values())).keys())
    table = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    table += ["| " + " | ".join(rows[name].values()) + " |" for name in sorted(rows)]
    update_docs(MARKER, "\n".join([
        *table, "", measured_on(),
        "", "Default config (early stopping on), by `python -m benchmarks.architecture_table`. Run time is the "
            "whole run: data, fit, test, SavedModel export and registration; rows of families not measured in the "
            "same run keep their earlier figures."]), DOCS)


if __name__ == "__main__":
    main()
