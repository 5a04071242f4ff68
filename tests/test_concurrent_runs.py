"""Trainings started at the same moment in a new directory share one new sqlite store:
its schema is created once, under a lock, and every run finishes, each in a job
directory of its own although Hydra names them to the second."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import hydra.core.utils
import pytest
from conftest import run_module
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline import cli
from pipeline.config import compose_with_hydra


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
    assert len({run.data.tags["checkpoint_dir"] for run in runs}) == 3, "each run checkpoints in its own directory"


@pytest.mark.parametrize(("key", "base"), [("run", "outputs"), ("sweep", "multirun")])
def test_jobs_composed_in_the_same_second_claim_directories_of_their_own(
        key: str, base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Frozen(datetime):  # Hydra's `now` resolver, stopped within one second
        @classmethod
        def now(cls, tz=None) -> datetime:
            return datetime(2026, 12, 2, 11, 51, 8)

    monkeypatch.setattr(hydra.core.utils, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    claimed = [OmegaConf.select(compose_with_hydra()[1], f"{key}.dir") for _ in range(3)]
    assert claimed == [f"{base}/2026-12-02/11-51-08", f"{base}/2026-12-02/11-51-08_2",
                       f"{base}/2026-12-02/11-51-08_3"]
    assert all((tmp_path / directory).is_dir() for directory in claimed)


def test_an_unwritable_parent_is_left_for_hydra_to_report(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    assert cli.unclaimed_dir(str(tmp_path / "file" / "run")) == str(tmp_path / "file" / "run")


def test_printing_the_resolved_hydra_config_leaves_no_directory_behind(tmp_path: Path) -> None:
    (tmp_path / "outputs").mkdir()  # a parent that was there before stays
    printed = run_module("pipeline.train", "--cfg", "hydra", "--resolve", cwd=tmp_path, timeout=120)
    assert printed.returncode == 0, printed.stderr[-2000:]
    claimed = [line.split()[-1] for line in printed.stdout.splitlines() if line.strip().startswith("dir: ")]
    assert [directory.split("/")[0] for directory in claimed] == ["outputs", "multirun"], printed.stdout[:500]
    assert [path.name for path in tmp_path.iterdir()] == ["outputs"]
    assert not any((tmp_path / "outputs").iterdir())
