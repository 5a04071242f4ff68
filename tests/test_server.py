"""Training against a real `mlflow server` (`mlflow=server`), read back over the REST API
with `requests` alone, as any client of the server would; and a server that is down
stops a run in one line before any training."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import run_module
from mlflow_server import ServerRun, artifact_paths, rest


def params_of(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def metrics_of(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def tags_of(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@pytest.mark.slow
def test_run_finished_with_params_metrics_and_tags(server_run: ServerRun) -> None:
    run = server_run.run
    assert run["info"]["status"] == "FINISHED"
    assert re.fullmatch(r"mlp-digits-float32-[0-9a-f]{6}", run["info"]["run_name"])
    # Artifacts are proxied by the server, not written to the trainer's disk.
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:/")
    params = params_of(run)
    assert params["optimizer.lr"] == "0.001"
    assert params["trainer.epochs"] == "2"
    assert params["architecture._target_"] == "architectures.mlp.build"
    # conf/mlflow/server.yaml resolved $MLFLOW_TRACKING_URI, the server this run went to.
    assert params["mlflow.tracking_uri"] == server_run.url
    metrics = metrics_of(run)
    assert {"train_loss", "val_accuracy", "test_loss", "final_val_accuracy"} <= metrics.keys()
    assert metrics["test_accuracy"] >= 0.8, "2 epochs of the mlp already separate digits"
    tags = tags_of(run)
    assert tags["registered_model"] == "digits-mlp/1"
    assert tags["champion_promoted"] == "true"
    assert "mlflow=server" in tags["overrides"]


@pytest.mark.slow
def test_per_epoch_history(server_run: ServerRun) -> None:
    history = rest(server_run.url, "GET", "metrics/get-history", run_id=server_run.run_id,
                   metric_key="val_accuracy")["metrics"]
    assert sorted(m["step"] for m in history) == [0, 1]


@pytest.mark.slow
def test_run_artifacts_and_config(server_run: ServerRun) -> None:
    listed = artifact_paths(server_run.url, server_run.run_id)
    assert {"config.yaml", "model_summary.txt", "train.log"} <= listed.keys(), listed
    # The same download the UI's artifact viewer makes.
    response = requests.get(f"{server_run.url}/get-artifact", timeout=30,
                            params={"path": "config.yaml", "run_uuid": server_run.run_id})
    assert response.ok, response.text[:500]
    config = yaml.safe_load(response.text)
    assert config["trainer"]["epochs"] == 2
    assert config["mlflow"]["tracking_uri"] == server_run.url


@pytest.mark.slow
def test_logged_model_artifacts(server_run: ServerRun) -> None:
    # MLflow 3 keeps a model's files with the LoggedModel, not among the run's artifacts.
    (output,) = server_run.run["outputs"]["model_outputs"]
    model = rest(server_run.url, "GET", f"logged-models/{output['model_id']}")["model"]["info"]
    assert model["status"] == "LOGGED_MODEL_READY"
    assert model["source_run_id"] == server_run.run_id
    endpoint = f"logged-models/{output['model_id']}/artifacts/directories"
    root = {f["path"] for f in rest(server_run.url, "GET", endpoint)["files"]}
    assert {"MLmodel", "requirements.txt", "data"} <= root, root
    saved_model = {f["path"] for f in rest(server_run.url, "GET", endpoint,
                                           artifact_directory_path="data/model")["files"]}
    assert {"data/model/saved_model.pb", "data/model/variables"} <= saved_model, saved_model


@pytest.mark.slow
def test_registered_version_with_champion_alias(server_run: ServerRun) -> None:
    registered = rest(server_run.url, "GET", "registered-models/get", name="digits-mlp")["registered_model"]
    assert {a["alias"]: a["version"] for a in registered["aliases"]} == {"champion": "1"}
    version = rest(server_run.url, "GET", "registered-models/alias", name="digits-mlp",
                   alias="champion")["model_version"]
    assert version["version"] == "1" and version["status"] == "READY"
    assert version["run_id"] == server_run.run_id
    (output,) = server_run.run["outputs"]["model_outputs"]
    assert version["source"] == f"models:/{output['model_id']}"
    test_accuracy = metrics_of(server_run.run)["test_accuracy"]
    assert float({t["key"]: t["value"] for t in version["tags"]}["test_accuracy"]) == pytest.approx(test_accuracy)


def test_unreachable_server_fails_in_one_line(tfds_dir: str, tmp_path: Path) -> None:
    start = time.monotonic()
    result = run_module("pipeline.train", "mlflow=server", "mlflow.tracking_uri=http://127.0.0.1:1",
                        f"dataset.data_dir={tfds_dir}", cwd=tmp_path, timeout=300)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: mlflow.tracking_uri: cannot reach the tracking server at http://127.0.0.1:1"), (
        result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert "Epoch 1/" not in result.stdout + result.stderr, "nothing may train before the store is reachable"
    assert not (tmp_path / "mlflow.db").exists(), "no silent fallback to the local store"
    # MLflow's own HTTP retries would take minutes; the health probe gives up in seconds
    # (most of this is importing TensorFlow).
    assert elapsed < 120, f"took {elapsed:.0f} s"
