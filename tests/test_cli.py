"""The commands a user types, run as separate processes in an empty directory."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest
from conftest import compose_plan, run_module
from mlflow.tracking import MlflowClient

from pipeline.train import train


@pytest.mark.slow
def test_train_then_evaluate_from_the_command_line(tfds_dir: str, tmp_path: Path) -> None:
    # No MLFLOW_TRACKING_URI: the embedded store in the launch directory is the default.
    trained = run_module("pipeline.train", "trainer.epochs=2", f"dataset.data_dir={tfds_dir}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "mlruns").is_dir()
    assert list((tmp_path / "outputs").glob("*/*/.hydra/config.yaml")), "Hydra's run dir is in the launch dir"

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["overrides"] == f"trainer.epochs=2 dataset.data_dir={tfds_dir}"
    assert run.data.tags["command"].endswith(f"trainer.epochs=2 dataset.data_dir={tfds_dir}")
    assert "train.log" in {a.path for a in client.list_artifacts(run.info.run_id)}

    evaluated = run_module("pipeline.evaluate", "model=models:/digits-mlp@champion",
                           f"dataset.data_dir={tfds_dir}", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    match = re.search(r"models:/digits-mlp@champion on digits\[test\] \(360 examples\): accuracy ([0-9.]+)",
                      evaluated.stdout)
    assert match, evaluated.stdout
    assert float(match.group(1)) == pytest.approx(run.data.metrics["test_accuracy"], abs=5e-5)


def test_progress_bar_counts_to_the_epochs_steps_with_the_run_line_apart(tfds_dir: str, tmp_path: Path) -> None:
    # debug=limit: 5-step epochs, one execution each (16 steps per execution at most).
    trained = run_module("pipeline.train", "trainer.epochs=2", "trainer.verbose=1", "debug=limit",
                         f"dataset.data_dir={tfds_dir}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    # The bar rewrites its line with \b and \r; the run opens while it is mid-line.
    text = re.sub(r"\x1b\[[0-9;]*m", "", trained.stdout).replace("\b", "")
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    (started,) = [line for line in lines if "started in experiment" in line]
    assert started.startswith("run "), started
    counts = [tuple(map(int, m.groups())) for line in lines if (m := re.match(r"(\d+)/(\d+) ", line))]
    assert counts and all(seen <= steps == 5 for seen, steps in counts), counts  # Keras's own count says 16/5


def test_evaluate_refuses_unknown_model_in_one_line(tmp_path: Path) -> None:
    result = run_module("pipeline.evaluate", "model=models:/no-such-model@champion", cwd=tmp_path,
                        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: model: cannot load 'models:/no-such-model@champion': "
        "Registered Model with name=no-such-model not found"
    )


def test_evaluate_without_model_says_what_to_pass(tmp_path: Path) -> None:
    result = run_module("pipeline.evaluate", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: model is missing: give an MLflow model URI, e.g. model=models:/digits-mlp@champion"
    ]


@pytest.mark.slow
def test_default_config_reaches_target_accuracy(tfds_dir: str, mlflow_store: str) -> None:
    metrics = train(compose_plan([f"dataset.data_dir={tfds_dir}"]))
    assert metrics["test_accuracy"] >= 0.95
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("digits").experiment_id])
    assert run.data.tags["champion_promoted"] == "true"


def test_unreachable_tracking_server_fails_before_training(tmp_path: Path) -> None:
    # Port 9 (discard) on loopback: nothing listens there.
    result = run_module("pipeline.train", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
                        timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: mlflow.tracking_uri: cannot reach the tracking server at http://127.0.0.1:9 (ConnectionError). "
        "Start it, or unset MLFLOW_TRACKING_URI to use the local sqlite store"
    )
    assert "Epoch 1/" not in result.stdout, "no training may start without a place to log it"


def test_unopenable_store_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "not_a_dir").write_text("")
    uri = f"sqlite:///{tmp_path / 'not_a_dir' / 'mlflow.db'}"
    result = run_module("pipeline.train", f"mlflow.tracking_uri={uri}", cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: mlflow.tracking_uri: cannot open the MLflow store at {uri}: ")


def test_architecture_dataset_mismatch_is_one_line(tfds_dir: str, tmp_path: Path) -> None:
    result = run_module("pipeline.train", "architecture=multi_io", f"dataset.data_dir={tfds_dir}", cwd=tmp_path,
                        timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: architecture=multi_io with dataset=digits: multi_io needs a dataset with image and numeric")
    assert not (tmp_path / "mlflow.db").exists(), "a refused config must not touch the store"
