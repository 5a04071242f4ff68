"""No secret is recorded or printed: a password planted in the tracking URI and a token
planted as an override appear in no param, tag, artifact, logged model, registered
version or line of output, while the rest of each value stays useful."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from conftest import run_module
from mlflow.tracking import MlflowClient
from mlflow_server import free_port

from pipeline import redact

PASSWORD = "pl4nted-Passw0rd"
TOKEN = "pl4nted-t0ken"


def test_redaction_rules() -> None:
    assert redact.strip_credentials("https://user:tok@host/repo.git") == "https://host/repo.git"
    assert redact.redact(f"at http://alice:{PASSWORD}@127.0.0.1:5000/#/x, then") == "at http://127.0.0.1:5000/#/x, then"
    assert redact.redact_override(f"+vault.api_token={TOKEN}") == "+vault.api_token=***"
    assert redact.redact_override("optimizer.lr=0.1") == "optimizer.lr=0.1", "an ordinary override stays"
    assert redact.redact_config({"mlflow": {"tracking_uri": f"http://a:{PASSWORD}@h:1"}, "db": {"password": 3}}) == {
        "mlflow": {"tracking_uri": "http://h:1"}, "db": {"password": "***"}}


def _texts_of_run(client: MlflowClient, run, tmp_path: Path) -> dict[str, str]:
    """Every param, tag and artifact of `run`, its logged models and registered versions."""
    texts = {"params": json.dumps(run.data.params), "tags": json.dumps(run.data.tags)}
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "artifacts"),
                                                     tracking_uri=client.tracking_uri))
    for path in local.rglob("*"):
        if path.is_file():
            texts[f"artifact {path.relative_to(local)}"] = path.read_bytes().decode("utf-8", "replace")
    mlflow.set_tracking_uri(client.tracking_uri)
    for model in mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list"):
        texts[f"logged model {model.model_id}"] = json.dumps({"params": model.params, "tags": model.tags})
    for version in client.search_model_versions(f"run_id = '{run.info.run_id}'"):
        texts[f"version {version.name}/{version.version}"] = json.dumps(
            {"tags": version.tags, "description": version.description, "source": version.source})
    return texts


@pytest.mark.slow
def test_no_planted_secret_is_recorded_or_printed(mlflow_server: str, tfds_dir: str, tmp_path: Path) -> None:
    host = mlflow_server.removeprefix("http://")
    result = run_module("pipeline.train", f"mlflow.tracking_uri=http://alice:{PASSWORD}@{host}",
                        # Its own experiment and model: the session's server is shared with other tests.
                        "mlflow.experiment_name=secrets", "mlflow.registered_model_name=secrets-mlp",
                        "trainer.epochs=1", f"dataset.data_dir={tfds_dir}",
                        f"+vault.api_token={TOKEN}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    texts = _texts_of_run(client, run, tmp_path) | {"stdout": result.stdout, "stderr": result.stderr}
    assert any(name.startswith("artifact ") for name in texts) and any(name.startswith("version ") for name in texts)
    for secret in (PASSWORD, TOKEN):
        leaks = {name: text[max(0, text.index(secret) - 120):text.index(secret) + 40]
                 for name, text in texts.items() if secret in text}
        assert not leaks, f"{secret} leaked: {leaks}"
    # What is left still says where the run went and what was overridden.
    assert run.data.params["mlflow.tracking_uri"] == mlflow_server
    assert run.data.params["vault.api_token"] == "***"
    assert "+vault.api_token=***" in run.data.tags["overrides"]
    assert f"mlflow.tracking_uri={mlflow_server}" in run.data.tags["command"]


def test_unreachable_server_error_names_it_without_the_password(tmp_path: Path) -> None:
    result = run_module("pipeline.train", f"mlflow.tracking_uri=http://alice:{PASSWORD}@127.0.0.1:{free_port()}",
                        cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: mlflow.tracking_uri: cannot reach the tracking server at http://127.0.0.1:"), last
    assert PASSWORD not in result.stdout + result.stderr
