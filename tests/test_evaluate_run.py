"""Evaluation runs: a real training run registers a model, `evaluate` scores it, and
MLflow's own client reads back the evaluation run and its link to the LoggedModel. The
training run is the session's `default_run` (tests/conftest.py), registered as
digits-mlp/1 @champion."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import TrainedRun, compose_config
from mlflow.tracking import MlflowClient

from pipeline.evaluate import evaluate, log_evaluation_run, model_reference

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def evaluation_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("digits")
    return client.search_runs([experiment.experiment_id], "tags.evaluation = 'true'")


def test_evaluation_run_records_metrics_plot_and_model_link(in_default_run_store: TrainedRun, tfds_dir: str,
                                                            tmp_path: Path) -> None:
    client = MlflowClient(in_default_run_store.uri)
    champion = client.get_model_version_by_alias("digits-mlp", "champion")
    # The LoggedModel the training run produced (MLflow 3) and registered as the champion.
    (trained_model,) = client.get_run(champion.run_id).outputs.model_outputs
    model_id = trained_model.model_id
    assert champion.source == f"models:/{model_id}"

    metrics = evaluate(compose_config(["model=models:/digits-mlp@champion", f"dataset.data_dir={tfds_dir}"],
                                      config_name="evaluate"))
    assert mlflow.active_run() is None, "the evaluation run is closed"

    (found,) = evaluation_runs(client)
    # get_run, not the search result: MLflow 3.17's search_runs leaves inputs.model_inputs empty.
    run = client.get_run(found.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "eval-digits-mlp@champion-test"
    assert run.data.tags["model_uri"] == "models:/digits-mlp@champion"
    assert run.data.tags["registered_model"] == f"digits-mlp/{champion.version}"
    assert run.data.tags["model_id"] == model_id
    assert run.data.params == {"dataset": "digits", "split": "test"}
    assert set(metrics) == {"accuracy", "loss", "examples"} and metrics["examples"] == 360
    assert run.data.metrics == pytest.approx(metrics)

    # The score is the training run's own test score of the same model on the same split.
    training_run = client.get_run(champion.run_id)
    assert metrics["accuracy"] == pytest.approx(training_run.data.metrics["test_accuracy"], abs=1e-6)

    # The link, both ways: the model is an input of the run, the metrics are on the model.
    assert [model_input.model_id for model_input in run.inputs.model_inputs] == [model_id]
    logged_model = client.get_logged_model(model_id)
    on_model = {m.key: m for m in logged_model.metrics if m.run_id == run.info.run_id}
    assert {key: m.value for key, m in on_model.items()} == pytest.approx(metrics)
    assert all(m.model_id == model_id for m in on_model.values())

    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["confusion_matrix.png"]
    png = Path(client.download_artifacts(run.info.run_id, "confusion_matrix.png", str(tmp_path)))
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000


def test_log_run_false_logs_nothing(in_default_run_store: TrainedRun, tfds_dir: str) -> None:
    client = MlflowClient(in_default_run_store.uri)
    before = {r.info.run_id for r in evaluation_runs(client)}
    metrics = evaluate(compose_config(["model=models:/digits-mlp/1", "split='train[:50]'", "log_run=false",
                                       f"dataset.data_dir={tfds_dir}"], config_name="evaluate"))
    assert metrics["examples"] == 50
    assert {r.info.run_id for r in evaluation_runs(client)} == before


def test_multi_head_evaluation_logs_one_confusion_matrix_per_head(mlflow_store: str, tmp_path: Path) -> None:
    cfg = compose_config(["model=models:/synthetic-multi_io@champion", "dataset=synthetic_multimodal"],
                         config_name="evaluate")
    rng = np.random.default_rng(0)
    confusions = {"binary": (rng.integers(0, 2, 40), rng.integers(0, 2, 40), 2),
                  "category": (rng.integers(0, 3, 40), rng.integers(0, 3, 40), 3)}
    metrics = {"binary_accuracy": 0.5, "binary_loss": 0.7, "category_accuracy": 0.4, "category_loss": 1.1,
               "examples": 40.0}
    run_id = log_evaluation_run(cfg, None, metrics, confusions)

    run = MlflowClient().get_run(run_id)
    assert run.info.experiment_id == mlflow.get_experiment_by_name("synthetic_multimodal").experiment_id
    assert run.info.run_name == "eval-synthetic-multi_io@champion-test"
    assert run.data.metrics == metrics
    assert "model_id" not in run.data.tags and not run.inputs.model_inputs, "no model, no link"
    artifacts = sorted(a.path for a in MlflowClient().list_artifacts(run_id))
    assert artifacts == ["confusion_matrix_binary.png", "confusion_matrix_category.png"]


@pytest.mark.parametrize("uri, reference", [
    ("models:/digits-mlp@champion", "digits-mlp@champion"),
    ("models:/digits-mlp/3", "digits-mlp/3"),
    ("runs:/0123abc/model", "0123abc/model"),
    ("/tmp/exported/model/", "model"),
])
def test_model_reference(uri: str, reference: str) -> None:
    assert model_reference(uri) == reference
