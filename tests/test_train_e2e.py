"""End to end: real training into a real MLflow store, read back with MLflow's own client,
and the registered SavedModel reloaded in a fresh process that cannot import this project.
The run read back is the session's `default_run` (tests/conftest.py): the default mlp,
2 epochs, trained in this process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from conftest import SCORE_DIGITS, TrainedRun, compose_plan, reload_without_project
from mlflow.tracking import MlflowClient

from pipeline.tracking.registry import promote_if_better
from pipeline.train import train


def test_run_finished_with_params_and_tags(default_run: TrainedRun) -> None:
    run, model = default_run.run, default_run.model
    assert run.info.status == "FINISHED"
    assert re.fullmatch(r"mlp-digits-float32-[0-9a-f]{6}", run.info.run_name)
    params = run.data.params
    assert params["optimizer.lr"] == "0.001"
    assert params["trainer.epochs"] == "2"
    assert params["architecture.hidden_units"] == "[512, 256]"
    assert params["dataset.name"] == "digits"
    assert params["data.train_examples"] == "1293" and params["data.val_examples"] == "144"
    assert params["model.parameters"] == str(model.count_params())
    tags = run.data.tags
    assert tags["architecture"] == "mlp" and tags["dataset"] == "digits" and tags["precision"] == "float32"
    assert "trainer.epochs=2" in tags["overrides"]
    assert tags["registered_model"] == "digits-mlp/1"
    assert tags["champion_promoted"] == "true"


def test_per_epoch_and_test_metrics(default_run: TrainedRun) -> None:
    metrics, run = default_run.metrics, default_run.run
    client = MlflowClient(default_run.uri)
    for key in ["train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"]:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [0, 1], key
        assert all(np.isfinite(m.value) for m in history)
    for key in ["test_accuracy", "test_loss", "final_val_accuracy", "final_val_loss"]:
        (logged,) = client.get_metric_history(run.info.run_id, key)
        assert logged.step == 2, "final scores are logged after the last epoch"
        assert logged.value == pytest.approx(metrics[key])
    assert metrics["test_accuracy"] > 0.8, "2 epochs of the mlp already separate digits"


def test_config_and_summary_artifacts(default_run: TrainedRun) -> None:
    run = default_run.run
    client = MlflowClient(default_run.uri)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "model_summary.txt"}
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml")).read_text())
    assert config["trainer"]["epochs"] == 2
    assert config["architecture"]["_target_"] == "architectures.mlp.build"
    summary = Path(client.download_artifacts(run.info.run_id, "model_summary.txt")).read_text()
    assert "dense_1" in summary and "probabilities" in summary


def test_registered_version_and_champion_alias(default_run: TrainedRun) -> None:
    metrics, run = default_run.metrics, default_run.run
    client = MlflowClient(default_run.uri)
    version = client.get_model_version_by_alias("digits-mlp", "champion")
    assert str(version.version) == "1"
    assert version.run_id == run.info.run_id
    assert float(version.tags["test_accuracy"]) == pytest.approx(metrics["test_accuracy"])


def test_saved_model_signature(default_run: TrainedRun, tmp_path: Path) -> None:
    mlflow.set_tracking_uri(default_run.uri)
    local = Path(mlflow.artifacts.download_artifacts("models:/digits-mlp@champion", dst_path=str(tmp_path)))
    saved_model = local / "data" / "model"
    assert (saved_model / "saved_model.pb").exists()
    shown = subprocess.run(
        [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--dir", str(saved_model),
         "--tag_set", "serve", "--signature_def", "serving_default"],
        capture_output=True, text=True, timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert "DT_UINT8" in shown.stdout and "(-1, 8, 8, 1)" in shown.stdout
    assert "DT_FLOAT" in shown.stdout and "(-1, 10)" in shown.stdout


def test_registered_model_reloads_without_project_code(default_run: TrainedRun, tmp_path: Path) -> None:
    metrics, model = default_run.metrics, default_run.model
    out = tmp_path / "probabilities.npy"
    report = reload_without_project(tmp_path, SCORE_DIGITS, default_run.uri, "models:/digits-mlp@champion", str(out))
    assert report["dtype"] == "float32" and report["shape"] == [360, 10]
    # The same 360 images the pipeline tested on, so the same accuracy to the example.
    assert report["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)

    from sklearn.datasets import load_digits

    digits = load_digits()
    test = np.arange(len(digits.target)) % 5 == 0
    images = np.round(digits.images[test] * 255 / 16).astype(np.uint8)[..., None]
    np.testing.assert_allclose(np.load(out), model.predict(images, verbose=0), rtol=1e-5, atol=1e-6)


def test_failed_training_marks_the_run_failed_with_reason(tfds_dir: str, mlflow_store: str) -> None:
    run_plan = compose_plan([
        "trainer.epochs=2",
        f"dataset.data_dir={tfds_dir}",
        "+callbacks.crash._target_=conftest.FailAtEpochEnd",
    ])
    with pytest.raises(RuntimeError, match="injected failure after epoch 0"):
        train(run_plan)
    assert mlflow.active_run() is None, "no run may stay active for the next job"
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("digits").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "RuntimeError: injected failure after epoch 0"
    assert MlflowClient().search_registered_models() == [], "a failed run registers nothing"


def test_champion_alias_moves_only_to_better_versions(mlflow_store: str) -> None:
    client = MlflowClient()
    client.create_registered_model("m")
    versions = [str(client.create_model_version("m", source=f"/tmp/v{i}").version) for i in range(4)]

    assert promote_if_better(client, "m", versions[0], "champion", "test_accuracy", 0.90) == (True, None)
    assert promote_if_better(client, "m", versions[1], "champion", "test_accuracy", 0.85) == (False, versions[0])
    assert promote_if_better(client, "m", versions[2], "champion", "test_accuracy", 0.90) == (False, versions[0])
    assert promote_if_better(client, "m", versions[3], "champion", "test_accuracy", 0.95) == (True, versions[0])
    assert str(client.get_model_version_by_alias("m", "champion").version) == versions[3]
    assert client.get_model_version("m", versions[1]).tags["test_accuracy"] == "0.85"


def test_champion_mode_min_prefers_lower(mlflow_store: str) -> None:
    client = MlflowClient()
    client.create_registered_model("m")
    v1, v2 = (str(client.create_model_version("m", source=f"/tmp/v{i}").version) for i in range(2))
    promote_if_better(client, "m", v1, "best", "test_loss", 0.3, greater_is_better=False)
    assert promote_if_better(client, "m", v2, "best", "test_loss", 0.2, greater_is_better=False) == (True, v1)


def test_mixed_float16_trains_with_loss_scaling_and_exports_float32(tfds_dir: str, mlflow_store: str) -> None:
    metrics = train(compose_plan(["precision=mixed_fp16", "trainer.epochs=1", f"dataset.data_dir={tfds_dir}"]))
    assert all(np.isfinite(v) for v in metrics.values())
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("digits").experiment_id])
    assert run.data.tags["precision"] == "mixed_float16"
    assert run.data.metrics["loss_scale"] > 0  # Keras wrapped the optimizer in a LossScaleOptimizer
    model = mlflow.pyfunc.load_model("models:/digits-mlp@champion")
    probabilities = model.predict(np.zeros((2, 8, 8, 1), dtype=np.uint8))
    assert probabilities.dtype == np.float32 and probabilities.shape == (2, 10)
