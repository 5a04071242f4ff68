"""Trainings started at the same moment in a new directory share one new sqlite store:
its schema is created once, under a lock, and every run finishes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient


@pytest.mark.slow
def test_three_trainings_started_together_on_a_fresh_directory_all_finish(tfds_dir: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TF_CPP_MIN_LOG_LEVEL": "2"}
    processes = [subprocess.Popen([sys.executable, "-m", "pipeline.train", "debug=smoke", f"seed={seed}",
                                   f"dataset.data_dir={tfds_dir}"], cwd=tmp_path, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for seed in range(3)]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert sorted(run.data.params["seed"] for run in runs) == ["0", "1", "2"]
    assert {run.info.status for run in runs} == {"FINISHED"}
