"""kill -9 at every step of a run, then `resume=last`: the run ends exactly as an
uninterrupted one, with every metric once per step, one logged model and one
registered version.

`python -m pipeline.train` runs in a real process, is SIGKILLed at one point (a
checkpoint on disk, or a line it prints), resumed in a new process that is killed at the
next point, and so on; the finished run is compared with one never interrupted. Both
train with `augment=flip_crop`: every batch is augmented by a seed of (seed, epoch,
batch), so a resumed run must see the very batches the interrupted one would have.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import run_module
from mlflow.tracking import MlflowClient

EPOCHS = 4
# digits: 1293 training examples in batches of 32, so 41 steps an epoch.
STEPS_PER_EPOCH = 41
COMMON = [f"trainer.epochs={EPOCHS}", "trainer.verbose=0", "trainer.steps_per_execution=1", "augment=flip_crop",
          "augment.pad=1"]  # digits are 8x8: a 1-pixel crop
EPOCH_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
MODEL = "digits-mlp"


def _checkpoint_numbers(directory: Path) -> list[int]:
    """Steps of the checkpoints the index lists: complete ones only (TensorFlow moves the
    index to a checkpoint once its files are written)."""
    index = directory / "checkpoint"
    if not index.exists():
        return []
    return [int(line.rsplit("-", 1)[1].rstrip('"')) for line in index.read_text().splitlines()
            if line.startswith("all_model_checkpoint_paths")]


# Where to kill, in the order one run meets them: a predicate over (checkpoint steps on
# disk, lines printed so far). Checkpoints every 10 steps and at each epoch's end (41, 82, ...).
KILL_POINTS: list[tuple[str, Callable[[list[int], list[str]], bool]]] = [
    ("after the first epoch", lambda steps, lines: STEPS_PER_EPOCH in steps),
    ("mid-epoch", lambda steps, lines: STEPS_PER_EPOCH + 9 in steps),
    ("right after a later epoch's end", lambda steps, lines: 2 * STEPS_PER_EPOCH in steps),
    ("during export", lambda steps, lines: any("final: {" in line for line in lines)),
    ("after registration", lambda steps, lines: any(f"registered models:/{MODEL}/1" in line for line in lines)),
]


def _train_and_kill(cwd: Path, overrides: list[str], kill_when) -> None:
    """Start a training run and SIGKILL it as soon as `kill_when` holds: checked at every
    line it prints (so a kill lands right after that line) and every 10 ms."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {
        "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}  # each line as it is printed
    process = subprocess.Popen([sys.executable, "-m", "pipeline.train", *overrides], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []  # what it prints: Hydra's log lines on stdout, MLflow's on stderr
    killed = threading.Event()

    def kill_if_due() -> None:
        if not killed.is_set() and kill_when(_checkpoint_numbers(cwd / "checkpoints"), list(lines)):
            process.send_signal(signal.SIGKILL)
            killed.set()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            kill_if_due()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not killed.is_set():
        kill_if_due()
        if process.poll() is not None and not killed.is_set():
            reader.join(5)
            kill_if_due()
            assert killed.is_set(), "the run ended before its kill point:\n" + "".join(lines)[-3000:]
        time.sleep(0.01)
    process.wait()
    assert killed.is_set(), "the kill point never came:\n" + "".join(lines)[-3000:]


def _histories(client: MlflowClient, run_id: str, keys) -> dict[str, list[tuple[int, float]]]:
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def _only_run(client: MlflowClient):
    (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    return run


@pytest.fixture(scope="module")
def reference(tfds_dir: str, tmp_path_factory: pytest.TempPathFactory):
    """The same training, never interrupted: (client, run)."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    done = run_module("pipeline.train", f"dataset.data_dir={tfds_dir}", *COMMON, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    return client, _only_run(client)


@pytest.mark.slow
def test_kill_9_at_every_point_then_resume_records_everything_exactly_once(reference, tfds_dir: str,
                                                                          tmp_path: Path) -> None:
    """One run killed at each point in turn, each time resumed with `resume=last` (which
    is then killed at the next point), and finally resumed to its end."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = [f"dataset.data_dir={tfds_dir}", *COMMON, "callbacks.checkpoint.every_n_steps=10",
             f"callbacks.checkpoint.directory={tmp_path / 'checkpoints'}"]
    for number, (point, kill_when) in enumerate(KILL_POINTS):
        _train_and_kill(tmp_path, first if number == 0 else ["resume=last"], kill_when)
        assert _only_run(client).info.status == "RUNNING", f"killed {point}: nothing closed the run"
    resumed = run_module("pipeline.train", "resume=last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    run = _only_run(client)
    assert run.info.status == "FINISHED"
    reference_client, reference_run = reference
    want = _histories(reference_client, reference_run.info.run_id, EPOCH_KEYS)
    got = _histories(client, run.info.run_id, EPOCH_KEYS)
    for key in EPOCH_KEYS:
        assert [step for step, _ in got[key]] == list(range(EPOCHS)), f"{key}: every epoch exactly once"
        np.testing.assert_allclose([v for _, v in got[key]], [v for _, v in want[key]], rtol=1e-6, err_msg=key)
    final_keys = [k for k in reference_run.data.metrics if k.startswith(("final_val_", "test_"))]
    assert final_keys, "the reference logged its final scores"
    for key, history in _histories(client, run.info.run_id, final_keys).items():
        assert [step for step, _ in history] == [EPOCHS], f"{key}: logged once, at the last epoch"
        assert history[0][1] == pytest.approx(reference_run.data.metrics[key], abs=1e-6), key

    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert [v.run_id for v in versions] == [run.info.run_id], "exactly one registered version"
    assert client.get_registered_model(MODEL).aliases == {"champion": versions[0].version}
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in logged] == [run.info.run_id], "exactly one logged model"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/learning_curves.png" in artifacts
