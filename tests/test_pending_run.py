"""The MLflow run opens while the first steps train (`pipeline.pending_run`): whatever
happens before it is open, the run records all of it, and ends with the outcome.

The store is held shut by a stand-in for `tracking.connect` until the test lets it open,
so the first steps certainly train before the run exists."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import keras
import mlflow
import pytest
from conftest import compose_plan
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.errors import DivergenceError, TrainingInterrupted
from pipeline.train import train

FAST = ["trainer.epochs=2", "trainer.verbose=0", "trainer.steps_per_execution=1"]


class StoreGate:
    """Holds `tracking.connect` until `opened` is set, or for at most `seconds`."""

    opened = threading.Event()
    seconds = 60.0


@pytest.fixture
def held_store(monkeypatch: pytest.MonkeyPatch, mlflow_store: str) -> type[StoreGate]:
    connect = tracking.connect

    def held(cfg):
        StoreGate.opened.wait(StoreGate.seconds)
        return connect(cfg)

    StoreGate.opened = threading.Event()
    StoreGate.seconds = 60.0
    monkeypatch.setattr(tracking, "connect", held)
    return StoreGate


class Watch(keras.callbacks.Callback):
    """Test callback (selected by `_target_`): records, at each step's end, whether the
    run is open and which checkpoints are on disk; opens the store after step 3."""

    seen: list[tuple[int, bool, list[str]]] = []
    directory: Path | None = None

    def on_train_batch_end(self, batch, logs=None) -> None:
        step = int(self.model.build_train_state().global_batch.numpy())
        on_disk = sorted(p.name for p in Watch.directory.glob("ckpt-*.index")) if Watch.directory else []
        Watch.seen.append((step, mlflow.active_run() is not None, on_disk))
        if step == 3:
            StoreGate.opened.set()


class SignalAtFirstStep(keras.callbacks.Callback):
    """Test callback (selected by `_target_`): SIGTERM to this process after step 1."""

    def on_train_batch_end(self, batch, logs=None) -> None:
        if int(self.model.build_train_state().global_batch.numpy()) == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def only_run(client: MlflowClient):
    (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    return run


def test_steps_before_the_run_opens_are_all_recorded(tfds_dir: str, held_store, tmp_path: Path) -> None:
    Watch.seen, Watch.directory = [], tmp_path / "checkpoints"
    metrics = train(compose_plan([f"dataset.data_dir={tfds_dir}", *FAST, "callbacks.checkpoint.every_n_steps=4",
                                  f"callbacks.checkpoint.directory={Watch.directory}",
                                  "+callbacks.watch._target_=test_pending_run.Watch"]))
    assert [(step, is_open) for step, is_open, _ in Watch.seen[:3]] == [(1, False), (2, False), (3, False)], (
        "the first steps trained while the store was held shut")
    assert all(is_open for _, is_open, _ in Watch.seen[4:]), "open by the save due after step 4, at the latest"
    # No checkpoint of trained steps before the run that can resume it is in the store.
    assert all(on_disk in ([], ["ckpt-0.index"]) for _, is_open, on_disk in Watch.seen if not is_open)

    client = MlflowClient()
    run = only_run(client)
    assert run.info.status == "FINISHED"
    assert run.data.params["precision.resolved_policy"] == "float32"
    assert run.data.tags["checkpoint_dir"] == str(Watch.directory)
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    for key in ("train_loss", "val_accuracy", "lr"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [0, 1], key
    assert metrics["test_accuracy"] > 0.8


def test_a_bad_first_step_fails_the_run_it_opens(tfds_dir: str, held_store) -> None:
    held_store.seconds = 3.0  # opens on its own: the guard's stop waits for it
    with pytest.raises(DivergenceError, match=r"at step 0 \(epoch 0\)"):
        train(compose_plan([f"dataset.data_dir={tfds_dir}", *FAST, "dataset.inject_nan_at_step=0",
                            "callbacks.checkpoint.directory=checkpoints"]))
    run = only_run(MlflowClient())
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"].startswith("DivergenceError: non-finite output in layer 'rescale' at step 0")
    events = [json.loads(line) for line in
              mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/events.jsonl").splitlines()]
    assert [(e["event"], e["step"]) for e in events] == [("stop", 0)]
    assert "config.yaml" in {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}


def test_a_signal_before_the_run_opens_names_it_for_resume(tfds_dir: str, held_store) -> None:
    held_store.seconds = 3.0
    with pytest.raises(TrainingInterrupted) as stopped:
        train(compose_plan([f"dataset.data_dir={tfds_dir}", *FAST, "callbacks.checkpoint.directory=checkpoints",
                            "+callbacks.signal._target_=test_pending_run.SignalAtFirstStep"]))
    run = only_run(MlflowClient())
    assert run.info.status == "KILLED"
    assert str(stopped.value).startswith("stopped by SIGTERM at step 1 (epoch 0); checkpoint ")
    assert str(stopped.value).endswith(f"; continue with: python -m pipeline.train resume={run.info.run_id}")
    assert Path(str(stopped.value).split("checkpoint ")[1].split(";")[0] + ".index").exists()
