"""The model card of a registered model version: its description (Markdown, rendered on
the version's page in the MLflow UI) and its tags, written from what the training run
recorded, so a colleague who opens `digits-mlp` v7 sees what it is, what it was trained
on, how good it is and how to call it without opening the run.

Everything comes from the store (the run's params, tags and metrics, the logged model's
signature, the sweep's parent run), so a version registered by a sweep's launching
process gets the same card as one registered by its own training run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence

import mlflow
from mlflow.entities import Run
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient

# MLflow's sqlite and SQL stores keep at most 5000 characters of a version's description.
MAX_DESCRIPTION = 5000
# Run params copied onto the version as tags (with the `architecture.*` hyperparameters).
HYPERPARAMETER_PARAMS = ("optimizer._target_", "optimizer.lr", "optimizer.schedule", "dataset.batch_size",
                         "trainer.epochs", "seed", "precision.resolved_policy", "model.parameters", "data.version")
# What MLflow calls a run's git commit (pipeline.tracking.provenance sets it).
GIT_COMMIT_TAG = "mlflow.source.git.commit"


def describe(client: MlflowClient, name: str, version: str) -> str:
    """Write the card of version `version` of `name`: its description and tags.

    Returns:
        The description, Markdown.
    """
    model_version = client.get_model_version(name, version)
    run = client.get_run(model_version.run_id)
    parent_id = run.data.tags.get("mlflow.parentRunId")
    sweep = client.get_run(parent_id) if parent_id else None
    text = card(name, version, run, logged_signature(client, model_version.source),
                epochs_run(client, run), sweep)
    client.update_model_version(name, version, description=text[:MAX_DESCRIPTION])
    for key, value in version_tags(run, sweep).items():
        client.set_model_version_tag(name, version, key, value)
    return text


def card(name: str, version: str, run: Run, signature: ModelSignature | None, epochs: int | None,
         sweep: Run | None = None) -> str:
    """The Markdown card of `name` version `version`, trained by `run` (a child of `sweep`)."""
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    architecture = tags.get("architecture") or params.get("architecture._target_", "?")
    dataset = params.get("data.version") or tags.get("dataset", "?")
    ran = f"{epochs} epoch{'s' if epochs != 1 else ''}" if epochs is not None else "? epochs"
    lines = [
        f"### {name} v{version}",
        "",
        f"**{architecture}** ({_count(params.get('model.parameters'))} parameters, "
        f"{params.get('precision.resolved_policy') or tags.get('precision', '?')}) trained on **{dataset}** "
        f"for {ran} (at most {params.get('trainer.epochs', '?')}), {_optimizer(params)}, "
        f"seed {params.get('seed', '?')}.",
        "",
        f"Run: [{run.info.run_name}]({_run_link(run)}) (`{run.info.run_id}`)"
        + (f", git commit `{tags[GIT_COMMIT_TAG][:12]}`" if GIT_COMMIT_TAG in tags else "") + ".",
    ]
    if sweep is not None:
        lines += ["", f"Sweep: [{sweep.info.run_name}]({_run_link(sweep)}) (`{sweep.info.run_id}`), "
                      f"job {tags.get('sweep.job', '?')}: the sweep's best job by "
                      f"{sweep.data.tags.get('sweep.optimized_metric', 'its optimized metric')}."]
    sizes = [(role, params.get(f"data.{role}_examples")) for role in ("train", "val", "test")]
    lines += ["", "| split | examples |", "|---|---|"]
    lines += [f"| {'validation' if role == 'val' else role} | {n} |" for role, n in sizes if n is not None]
    lines += ["", "| metric | validation | test |", "|---|---|---|"]
    scored = sorted({key.removeprefix(prefix) for key in metrics for prefix in ("final_val_", "test_")
                     if key.startswith(prefix)})
    lines += [f"| {metric} | {_value(metrics.get(f'final_val_{metric}'))} | {_value(metrics.get(f'test_{metric}'))} |"
              for metric in scored]
    champion_metric = params.get("mlflow.champion_metric", "final_val_accuracy")
    lines += ["", f"The champion is chosen on validation (`{champion_metric}`, by more than "
                  f"{params.get('mlflow.champion_min_delta', '?')}); test figures are reported, never used to choose."]
    if signature is not None:
        table = signature.inputs.is_tensor_spec() is False
        raw = ("the table's columns by name, raw: the model standardizes and one-hot encodes them itself" if table
               else "raw: the model casts and rescales itself")
        lines += ["", "**Input**: " + _specs(signature.inputs.inputs) + f" ({raw}).",
                  "", "**Output**: " + _specs(signature.outputs.inputs) + " (probabilities)."]
    if params.get("dataset.classes"):
        lines += ["", f"**Classes**, in the order of the output columns: {params['dataset.classes']}."]
    uri = f"models:/{name}/{version}"
    lines += [
        "",
        "**Use it** (`serving_input_example.json` in the model's files is a request body):",
        "",
        "```",
        f'mlflow.pyfunc.load_model("{uri}").predict(inputs)',
        f"mlflow models serve -m {uri} --env-manager local --host 127.0.0.1 --port 5001",
        f"python -m pipeline.evaluate model={uri}",
        f"python -m pipeline.predict model={uri} inputs=PATH",
        "```",
    ]
    return "\n".join(lines)


def version_tags(run: Run, sweep: Run | None = None) -> dict[str, str]:
    """The run's main hyperparameters, its scores, its git commit and its sweep, as version tags."""
    params = run.data.params
    tags = {key: params[key] for key in HYPERPARAMETER_PARAMS if key in params}
    tags |= {key: value for key, value in params.items() if key.startswith("architecture.")
             and key.count(".") == 1 and key not in ("architecture._partial_", "architecture._target_")}
    tags["architecture"] = run.data.tags.get("architecture", params.get("architecture._target_", ""))
    # The exported model's scores: on validation (what chooses) and test (reported only).
    tags |= {key: repr(value) for key, value in run.data.metrics.items() if key.startswith(("final_val_", "test_"))}
    if GIT_COMMIT_TAG in run.data.tags:
        tags["git_commit"] = run.data.tags[GIT_COMMIT_TAG]
    if sweep is not None:
        tags["sweep_run_id"] = sweep.info.run_id
    return {key: str(value)[:5000] for key, value in tags.items()}


def logged_signature(client: MlflowClient, source: str) -> ModelSignature | None:
    """The signature in the MLmodel of a version's source (`models:/<model id>`)."""
    if not source.startswith("models:/m-"):
        return None
    location = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{location.rstrip('/')}/MLmodel", dst_path=tmp,
                                                   tracking_uri=client.tracking_uri)
        return Model.load(path).signature


def epochs_run(client: MlflowClient, run: Run) -> int | None:
    """How many epochs the run trained: its final scores are logged at the step after the last epoch."""
    final = next((key for key in sorted(run.data.metrics) if key.startswith(("final_val_", "test_"))), None)
    history = client.get_metric_history(run.info.run_id, final) if final else []
    return max(metric.step for metric in history) if history else None


def _run_link(run: Run) -> str:
    # Relative to the UI's own address, so the link works from `mlflow ui` and any server.
    return f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def _optimizer(params: Mapping[str, str]) -> str:
    optimizer = params.get("optimizer._target_", "?").rsplit(".", 1)[-1]
    return f"{optimizer} lr {params.get('optimizer.lr', '?')} ({params.get('optimizer.schedule', 'constant')}), " \
           f"batch {params.get('dataset.batch_size', '?')}"


# A table's input lists this many columns; the signature in the model's files has them all.
MAX_SPECS_LISTED = 12


def _specs(specs: Sequence) -> str:
    """Tensor specs as `name: dtype (shape)`, columns as `name: type`."""
    listed = [f"`{spec.name + ': ' if spec.name else ''}{spec.type}"
              + (f" {tuple(spec.shape)}`" if hasattr(spec, "shape") else "`") for spec in specs[:MAX_SPECS_LISTED]]
    if len(specs) > MAX_SPECS_LISTED:
        listed.append(f"... ({len(specs)} columns)")
    return ", ".join(listed)


def _count(value: str | None) -> str:
    return f"{int(value):,}" if value and value.isdigit() else "?"


def _value(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
