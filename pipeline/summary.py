"""What the terminal says about a training run: one line when it opens (to find it in
the MLflow UI while it trains), and a short aligned block once it is closed, built only
from what the run recorded in MLflow (status, tags, metrics, `model_summary.txt`), with
the commands to look further, filled in with this run's ids and layer names. A sweep's
job prints one line, and the sweep the same block for its parent run, about its best job.

    summary.print_closing_block(run_id)
    summary.print_sweep_closing_block(parent_run_id, tracking_uri)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pipeline.errors import one_line
from pipeline.redact import redact

log = logging.getLogger(__name__)

UI_PORT = 5000  # `mlflow ui`'s default port
# A layer row of `model.summary()`: "│ dense_1 (Dense)   │ (None, 128) │ ..." -> (dense_1, Dense)
LAYER_ROW = re.compile(r"^[│|]\s*(\w+) \((\w+)\)")


def started_line(run: Run) -> str:
    """`run <name> (<id>) started`, for the start of training."""
    return f"run {run.info.run_name} ({run.info.run_id}) started in experiment {run.info.experiment_id}"


def print_closing_block(run_id: str, brief: bool = False) -> None:
    """Print the closing block (`brief`: its first two rows in one line, for a sweep's
    job); a store that no longer answers costs a warning, never the run."""
    try:
        block = closing_block(MlflowClient(), run_id)
        print(" ".join(" ".join(line.split()) for line in block.splitlines()[:2]) if brief else block, flush=True)
    except Exception as error:
        log.warning("run %s: no closing block, the MLflow store did not answer (%s)", run_id, one_line(error))


def print_sweep_closing_block(parent_run_id: str, tracking_uri: str | None = None) -> None:
    """Print the closing block of a sweep whose parent run has ended; a store that no
    longer answers costs a warning."""
    try:
        print(sweep_closing_block(MlflowClient(tracking_uri), parent_run_id), flush=True)
    except Exception as error:
        log.warning("sweep %s: no closing block, the MLflow store did not answer (%s)", parent_run_id, one_line(error))


def closing_block(client: MlflowClient, run_id: str) -> str:
    """The closing block of run `run_id`, from what its store holds."""
    run = client.get_run(run_id)
    tags = run.data.tags
    rows = [("run", f"{run.info.run_name} ({run_id})"), ("status", run.info.status), *result_rows(run)]
    if "checkpoint_dir" in tags:
        rows.append(("checkpoints", tags["checkpoint_dir"]))
    if "profile_dir" in tags:  # debug=profile: the ops by self time are in artifact profile/top_ops.txt
        tensorboard = shell("tensorboard", "--logdir", tags["profile_dir"])
        rows.append(("profile", f"{tensorboard}  # pip install -e '.[profile]'"))
    return aligned(rows + commands(client, run))


def sweep_closing_block(client: MlflowClient, parent_run_id: str) -> str:
    """The closing block of a sweep, from what its parent run (`pipeline.tracking.sweep`)
    and its best job's run hold: the jobs, the best job's scores and registered version,
    the parent's page, and the commands for the best job's model."""
    parent = client.get_run(parent_run_id)
    tags = parent.data.tags
    metric, _, direction = tags.get("sweep.optimized_metric", "").partition(" ")  # "final_val_accuracy (maximize)"
    rows = [("sweep", f"{parent.info.run_name} ({parent_run_id})"), ("status", parent.info.status),
            ("jobs", f"{tags.get('sweep.jobs', '?')} jobs, {tags.get('sweep.finished', '?')} finished, "
                     f"{tags.get('sweep.failed', '?')} failed")]
    if "sweep.best_run_id" not in tags:
        return aligned([*rows, *search_rows(tags), ("best job", f"none: no job finished with a finite {metric}"),
                        *links(client, parent)])
    rows += search_rows(tags)
    best = client.get_run(tags["sweep.best_run_id"])
    score = best.data.metrics.get(metric)
    rows.append(("best job", f"{best.info.run_name} ({best.info.run_id})"
                 + (f": {metric} {score:.4f} {direction}".rstrip() if score is not None else "")))
    alias = tags.get("sweep.best_model", "").rpartition("@")[2]  # models:/NAME@sweep-best
    return aligned(rows + result_rows(best, [alias] if alias else []) + links(client, parent)
                   + model_commands(client, best))


def search_rows(tags: dict[str, str]) -> list[tuple[str, str]]:
    """An Optuna search's: why it stopped, and optuna-dashboard on its study's storage
    (a journal file is opened by its path)."""
    rows = [("stopped", tags["sweep.stopped"])] if "sweep.stopped" in tags else []
    if "optuna.storage" in tags:
        storage = tags["optuna.storage"].removeprefix("journal://")
        rows.append(("dashboard", f"{shell('optuna-dashboard', storage)}  # pip install -e '.[dashboard]'"))
    return rows


def result_rows(run: Run, aliases: list[str] | None = None) -> list[tuple[str, str]]:
    """What the run's model scored (best epoch, validation, test) and where it was
    registered, with the aliases moved (`aliases`: also moved to it, e.g. by its sweep)."""
    tags, metrics = run.data.tags, run.data.metrics
    rows = []
    if "early_stopping.best_epoch" in tags:
        restored = tags.get("early_stopping.restored_epoch")
        stopped = tags.get("early_stopping.stopped_epoch")
        rows.append(("best epoch", tags["early_stopping.best_epoch"]
                     + (f" (weights restored; stopped early at epoch {stopped})" if restored and stopped
                        else " (weights restored)" if restored else " (last epoch's weights kept)")))
    for prefix, label in (("final_val_", "validation"), ("test_", "test")):
        scores = {k.removeprefix(prefix): v for k, v in sorted(metrics.items()) if k.startswith(prefix)}
        if scores:
            rows.append((label, "  ".join(f"{k} {v:.4f}" for k, v in scores.items())))
    if "registered_model" in tags:
        # `<alias>_promoted`: true, false, or "skipped: <why>" (`registry.register`)
        moved = [f"@{key.removesuffix('_promoted')} " + {"true": "moved to it", "false": "not moved"}.get(value, value)
                 for key, value in sorted(tags.items()) if key.endswith("_promoted")]
        moved += [f"@{alias} moved to it" for alias in aliases or []]
        rows.append(("registered", " ".join([tags["registered_model"], *moved])))
    return rows


def aligned(rows: list[tuple[str, str]]) -> str:
    """`label  value` lines, the values in one column."""
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def commands(client: MlflowClient, run: Run) -> list[tuple[str, str]]:
    """The UI command, this run's page, and `pipeline.evaluate` and `pipeline.inspect`
    filled in, as they can be pasted in the launch directory."""
    return links(client, run) + model_commands(client, run)


def links(client: MlflowClient, run: Run) -> list[tuple[str, str]]:
    """The UI command (for a local store) and the run's page."""
    uri = client.tracking_uri
    if uri.startswith(("http://", "https://")):
        base, ui = redact(uri).rstrip("/"), None
    else:
        base, ui = f"http://127.0.0.1:{UI_PORT}", f"mlflow ui --backend-store-uri {redact(uri)} --host 127.0.0.1"
    rows = [("ui", ui)] if ui else []
    return rows + [("run page", f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}")]


def model_commands(client: MlflowClient, run: Run) -> list[tuple[str, str]]:
    """`pipeline.evaluate` on the run's registered version (if any) and `pipeline.inspect`
    on its logged model, with two of its layers."""
    uri, run_id = client.tracking_uri, run.info.run_id
    extra = store_and_data_overrides(uri, run)
    registered = run.data.tags.get("registered_model")
    rows = []
    if registered:
        rows.append(("evaluate", shell("python -m pipeline.evaluate", f"model=models:/{registered}", *extra)))
    layers = layer_names(client, run_id)
    inspect = [f"model=runs:/{run_id}", *([f"layers=[{','.join(layers)}]"] if layers else []), *extra]
    rows.append(("inspect", shell("python -m pipeline.inspect", *inspect)))
    return rows


def store_and_data_overrides(uri: str, run: Run) -> list[str]:
    """Overrides the commands need to find this run's store and data when they are not
    the defaults (`sqlite:///<cwd>/mlflow.db`, `digits` in TFDS's own data dir)."""
    if "data_overrides" in run.data.tags:  # recorded as the run opened (pipeline.data.command_overrides)
        extra = list(json.loads(run.data.tags["data_overrides"]))
    else:  # a run recorded before that tag: a TFDS dataset by name
        extra = []
        if run.data.params.get("dataset.name", "digits") != "digits":
            extra.append(f"dataset={run.data.params['dataset.name']}")
        if run.data.params.get("dataset.data_dir") not in (None, "None", ""):
            extra.append(f"dataset.data_dir={run.data.params['dataset.data_dir']}")
    if uri != f"sqlite:///{os.path.abspath('mlflow.db')}":
        extra.append(f"mlflow.tracking_uri={redact(uri)}")
    return extra


def layer_names(client: MlflowClient, run_id: str, count: int = 2) -> list[str]:
    """`count` layer names from the run's `model_summary.txt`: Dense layers first, else
    any layer but the inputs; none if the run has no summary."""
    try:
        text = client.download_artifacts(run_id, "model_summary.txt")
        with open(text, encoding="utf-8") as file:
            rows = [m.groups() for m in map(LAYER_ROW.match, file.read().splitlines()) if m]
    except Exception:  # a run without its summary still gets the rest of the block
        return []
    layers = [(name, kind) for name, kind in rows if kind != "InputLayer"]
    dense = [name for name, kind in layers if kind == "Dense"]
    return (dense if len(dense) >= count else [name for name, _ in layers])[:count]


def shell(command: str, *args: str) -> str:
    """`command` with `args` quoted for a POSIX shell (`layers=[...]` quoted: bash globs brackets)."""
    return " ".join([command, *(arg if re.fullmatch(r"[\w.,=:/@+-]+", arg) else shlex.quote(arg)
                                for arg in args)])
