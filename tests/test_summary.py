"""The terminal's closing block after a training run (`pipeline.summary`), and early
stopping saying what it did: a user who only reads the terminal must find the run in
the UI and paste the next commands as printed (issue 20)."""

from __future__ import annotations

import json
import logging
import re
import shlex
from pathlib import Path

import pytest
from conftest import TrainedRun, compose_plan, run_module
from mlflow.tracking import MlflowClient

from pipeline import summary
from pipeline.tracking.sweep import SweepRecorder
from pipeline.train import train


def block_rows(block: str) -> dict[str, str]:
    """`label  value` lines -> {label: value}."""
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in block.splitlines())


def test_closing_block_of_a_real_run(in_default_run_store: TrainedRun, tfds_dir: str) -> None:
    run = in_default_run_store.run
    rows = block_rows(summary.closing_block(MlflowClient(in_default_run_store.uri), run.info.run_id))
    assert rows["run"] == f"{run.info.run_name} ({run.info.run_id})"
    assert rows["status"] == "FINISHED"
    assert rows["validation"].startswith("accuracy ") and rows["test"].startswith("accuracy ")
    assert rows["registered"] == "digits-mlp/1 @champion moved to it"
    assert rows["checkpoints"] == run.data.tags["checkpoint_dir"]
    assert rows["ui"] == f"mlflow ui --backend-store-uri {in_default_run_store.uri} --host 127.0.0.1"
    assert rows["run page"] == f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    # The launch directory's own store needs no mlflow.tracking_uri; the test's TFDS dir must be named.
    assert rows["evaluate"] == f"python -m pipeline.evaluate model=models:/digits-mlp/1 dataset.data_dir={tfds_dir}"
    assert rows["inspect"] == (f"python -m pipeline.inspect model=runs:/{run.info.run_id} "
                               f"'layers=[dense_1,dense_2]' dataset.data_dir={tfds_dir}")


def test_commands_name_another_store(default_run: TrainedRun, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # launched elsewhere: the store is not ./mlflow.db
    client = MlflowClient(default_run.uri)
    rows = dict(summary.commands(client, client.get_run(default_run.run.info.run_id)))
    assert f"mlflow.tracking_uri={default_run.uri}" in rows["inspect"]


@pytest.mark.slow
def test_printed_inspect_command_works_as_pasted(in_default_run_store: TrainedRun) -> None:
    run_id = in_default_run_store.run.info.run_id
    rows = dict(summary.commands(MlflowClient(in_default_run_store.uri), in_default_run_store.run))
    python, dash_m, module, *args = shlex.split(rows["inspect"])
    assert (python, dash_m, module) == ("python", "-m", "pipeline.inspect")
    result = run_module(module, *args, "examples=16", cwd=in_default_run_store.directory)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dense_1" in result.stdout + result.stderr and "dense_2" in result.stdout + result.stderr, run_id
    python, dash_m, module, *args = shlex.split(rows["evaluate"])
    result = run_module(module, *args, "log_run=false", cwd=in_default_run_store.directory)  # adds no run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "models:/digits-mlp/1 on digits[test]" in result.stdout


def test_early_stopping_says_where_it_stopped_and_what_it_restored(
        mlflow_store: str, tfds_dir: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    # min_delta=10: no epoch after the first improves val_loss by that much, so patience=1
    # stops at epoch 2 and restores epoch 1, whatever the data and the seed.
    plan = compose_plan(["trainer.epochs=4", "callbacks.early_stopping.patience=1",
                         "+callbacks.early_stopping.min_delta=10", "mlflow.log_model=false",
                         f"dataset.data_dir={tfds_dir}"])
    with caplog.at_level(logging.INFO, logger="callbacks.early_stopping"):
        train(plan)
    assert "early stopping: stopped at epoch 2 (val_loss did not improve for 1 epochs), " \
           "restored the weights of epoch 1" in caplog.text
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert {k: v for k, v in run.data.tags.items() if k.startswith("early_stopping.")} == {
        "early_stopping.best_epoch": "1", "early_stopping.stopped_epoch": "2", "early_stopping.restored_epoch": "1"}
    printed = capsys.readouterr().out
    assert f"run {run.info.run_name} ({run.info.run_id}) started" in printed
    assert re.search(r"^best epoch +1 \(weights restored; stopped early at epoch 2\)$", printed, re.MULTILINE)


def test_a_sweep_ends_with_the_block_of_its_parent_run(mlflow_store: str, capsys: pytest.CaptureFixture) -> None:
    # What a sweep leaves in the store (pipeline.tracking.sweep): a parent run and a nested
    # child per job, here one failed. Each job printed one line; the sweep's end prints
    # the parent's block, about its best job, before it exits non-zero for the failure.
    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment("digits")
    parent = client.create_run(experiment, run_name="sweep optimizer.lr=1e-3,1e-2,1e12",
                               tags={"sweep.optimized_metric": "final_val_accuracy (maximize)"}).info.run_id
    jobs = {}
    for job, (lr, accuracy) in enumerate([("0.001", 0.91), ("0.01", 0.95), ("1e12", None)]):
        child = client.create_run(experiment, run_name=f"optimizer.lr={lr}", tags={
            "mlflow.parentRunId": parent, "sweep.job": str(job), "sweep.params": json.dumps({"optimizer.lr": lr})})
        jobs[lr] = child.info.run_id
        if accuracy is None:
            client.set_tag(child.info.run_id, "failure_reason", "DivergenceError: non-finite loss")
            client.set_terminated(child.info.run_id, "FAILED")
            continue
        for key, value in {"final_val_accuracy": accuracy, "final_val_loss": 0.2, "test_accuracy": 0.9}.items():
            client.log_metric(child.info.run_id, key, value)
        client.set_terminated(child.info.run_id, "FINISHED")
    recorder = SweepRecorder(best_alias=None, register="none")
    recorder.parent_run_id, recorder.tracking_uri = parent, mlflow_store
    recorder.optimized_metric, recorder.direction = "final_val_accuracy", "maximize"

    with pytest.raises(SystemExit):
        recorder.on_multirun_end(config=None)
    printed = capsys.readouterr()
    rows = block_rows(printed.out)
    assert rows["sweep"] == f"sweep optimizer.lr=1e-3,1e-2,1e12 ({parent})"
    assert rows["status"] == "FINISHED"
    assert rows["jobs"] == "3 jobs, 2 finished, 1 failed"
    assert rows["best job"] == f"optimizer.lr=0.01 ({jobs['0.01']}): final_val_accuracy 0.9500 (maximize)"
    assert rows["validation"] == "accuracy 0.9500  loss 0.2000" and rows["test"] == "accuracy 0.9000"
    assert rows["run page"] == f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{parent}"
    assert rows["inspect"] == f"python -m pipeline.inspect model=runs:/{jobs['0.01']}"
    assert "registered" not in rows and "evaluate" not in rows  # register=none
    assert "error: 1 of 3 sweep jobs failed" in printed.err

    # With the best job registered (register=best), the block says where, and which aliases moved.
    client.set_tag(jobs["0.01"], "registered_model", "digits-mlp/3")
    client.set_tag(jobs["0.01"], "champion_promoted", "false")
    client.set_tag(parent, "sweep.best_model", "models:/digits-mlp@sweep-best")
    rows = block_rows(summary.sweep_closing_block(client, parent))
    assert rows["registered"] == "digits-mlp/3 @champion not moved @sweep-best moved to it"
    assert rows["evaluate"] == "python -m pipeline.evaluate model=models:/digits-mlp/3"
