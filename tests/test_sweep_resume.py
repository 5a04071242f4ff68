"""A grid sweep resumed with `+sweep.resume=PARENT_RUN_ID`: only the jobs without a
FINISHED child run again, and their children join the same parent run."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_module
from mlflow.tracking import MlflowClient

from pipeline.errors import ConfigError
from pipeline.tracking import sweep_resume

GRID = ("-m", "optimizer.lr=1e-3,1e-2", "trainer.epochs=1", "trainer.verbose=0", "mlflow.log_model=false")


def test_resuming_a_run_that_is_no_sweep_parent_is_refused(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ConfigError, match=r"\+sweep.resume: no run 0123 in the tracking store"):
        sweep_resume.reopen(client, "0123", "final_val_accuracy")
    single = client.create_run(client.create_experiment("e"))
    with pytest.raises(ConfigError, match="is not a sweep's parent run"):
        sweep_resume.reopen(client, single.info.run_id, "final_val_accuracy")


@pytest.mark.slow
def test_a_resumed_grid_reruns_only_its_unfinished_jobs(tfds_dir: str, tmp_path: Path) -> None:
    first = run_module("pipeline.train", *GRID, f"dataset.data_dir={tfds_dir}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    done, lost = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.run_name)
    assert (done.info.run_name, lost.info.run_name) == ("optimizer.lr=0.001", "optimizer.lr=0.01")
    client.set_terminated(lost.info.run_id, "FAILED")  # as if that job had died

    again = run_module("pipeline.train", *GRID, f"dataset.data_dir={tfds_dir}", f"+sweep.resume={parent.info.run_id}",
                       cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]

    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags] == [parent.info.run_id]
    children = {r.info.run_id: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(children) == 3, "one new child: the finished job did not run again"
    assert children[done.info.run_id].info.status == "FINISHED"
    assert children[lost.info.run_id].data.tags["sweep.superseded"] == "true"
    (rerun,) = [r for r in children.values() if r.info.run_id not in (done.info.run_id, lost.info.run_id)]
    assert (rerun.info.run_name, rerun.info.status) == ("optimizer.lr=0.01", "FINISHED")
    assert rerun.data.tags["mlflow.parentRunId"] == parent.info.run_id

    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert (parent.data.tags["sweep.jobs"], parent.data.tags["sweep.failed"]) == ("2", "0"), \
        "the summary counts each job once: the superseded child is left out"
