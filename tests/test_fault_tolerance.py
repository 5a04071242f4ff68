"""Divergence, checkpoints, resume, rollback and signals, with real triggers and real processes."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import mlflow
import numpy as np
import pytest
import tensorflow as tf
from conftest import compose_plan, new_mlflow_store, run_module
from mlflow.tracking import MlflowClient

from pipeline.errors import DivergenceError, PipelineError
from pipeline.train import train
from pipeline.training import checkpoint_store

FAST = ["trainer.epochs=3", "callbacks.checkpoint.every_n_steps=20", "trainer.verbose=0",
        "trainer.steps_per_execution=1"]  # one step per execution, so checkpoint steps are exact
EPOCH_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "train_grad_norm_max")


def only_run(client: MlflowClient, experiment: str = "digits"):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def histories(client: MlflowClient, run_id: str, keys=EPOCH_KEYS) -> dict[str, list[tuple[int, float]]]:
    return {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
            for key in keys}


def test_absurd_learning_rate_fails_naming_layer_and_step(tfds_dir: str, tmp_path: Path,
                                                         empty_mlflow_db: Path) -> None:
    new_mlflow_store(tmp_path, empty_mlflow_db)
    result = run_module("pipeline.train", "optimizer=sgd", "optimizer.lr=1e12", "trainer.epochs=2",
                        f"dataset.data_dir={tfds_dir}", cwd=tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    pattern = r"error: non-finite (output|gradient|weights) in layer '[\w/]+' at step \d+ \(epoch 0\)"
    assert re.fullmatch(pattern, last), last
    assert "Traceback" not in result.stderr
    run = only_run(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "DivergenceError: " + last.removeprefix("error: ")


@pytest.mark.parametrize("steps_per_execution", [1, 8])
def test_injected_nan_is_caught_at_its_step_and_never_applied(
    tfds_dir: str, mlflow_store: str, tmp_path: Path, steps_per_execution: int
) -> None:
    # Step 50 is batch 9 of epoch 1 (41 batches per epoch); with 8 steps per execution
    # it sits mid-execution, and must still be the step that is named.
    with pytest.raises(DivergenceError) as error:
        train(compose_plan([f"dataset.data_dir={tfds_dir}", *FAST, "dataset.inject_nan_at_step=50",
                              f"trainer.steps_per_execution={steps_per_execution}"]))
    assert str(error.value) == ("non-finite output in layer 'rescale' at step 50 (epoch 1): "
                                "the input batch holds 1 non-finite value(s)")
    client = MlflowClient()
    run = only_run(client)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == f"DivergenceError: {error.value}"
    assert [step for step, _ in histories(client, run.info.run_id)["train_loss"]] == [0], "epoch 0 was logged"
    events = [json.loads(line) for line in
              mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/events.jsonl").splitlines()]
    assert [(e["event"], e["step"], e["epoch"]) for e in events] == [("stop", 50, 1)]
    # The last checkpoint precedes the bad step and holds finite weights.
    directory = Path(run.data.tags["checkpoint_dir"])
    latest = tf.train.latest_checkpoint(str(directory))
    assert int(latest.rpartition("-")[2]) <= 50
    reader = tf.train.load_checkpoint(latest)
    assert all(np.isfinite(reader.get_tensor(name)).all() for name, dtype in
               reader.get_variable_to_dtype_map().items() if dtype.is_floating)


def test_skip_drops_the_bad_step_counts_it_and_finishes(tfds_dir: str, mlflow_store: str) -> None:
    metrics = train(compose_plan([f"dataset.data_dir={tfds_dir}", *FAST, "dataset.inject_nan_at_step=50",
                                    "callbacks.grad_norm.action=skip"]))
    client = MlflowClient()
    run = only_run(client)
    assert run.info.status == "FINISHED"
    skipped = histories(client, run.info.run_id, ["train_skipped_steps"])["train_skipped_steps"]
    assert skipped == [(0, 0.0), (1, 1.0), (2, 0.0)]
    assert all(np.isfinite(v) for _, v in histories(client, run.info.run_id)["train_loss"])
    assert metrics["test_accuracy"] > 0.8


def test_callbacks_between_executions_read_what_the_execution_returned(
        tfds_dir: str, mlflow_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between executions, the guard and the checkpoints read the train state that the
    execution returned, not the variables (each eager read is an op dispatch), and it is
    what the variables hold, through a skipped bad step and each epoch's reset."""
    from tensorflow.python.ops.resource_variable_ops import BaseResourceVariable

    from callbacks.grad_norm import GradNormGuard
    from pipeline.training.train_state import TrainState

    states, reads, polls, counting = [], [], [], [True]
    real_init, real_numpy, real_poll = TrainState.__init__, BaseResourceVariable.numpy, GradNormGuard._poll

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        states.append(self)

    def numpy(self):
        if counting[0] and any(self is v for s in states for v in (s.global_batch, s.stats)):
            reads.append("".join(traceback.format_stack(limit=6)[:-1]))
        return real_numpy(self)

    def poll(self):
        state = self._state
        steps, snapshot = state.steps_done(), state.snapshot()
        counting[0] = False
        observed, state._observed = state._observed, None  # the same questions, asked of the variables
        assert observed is not None
        assert steps == int(state.global_batch.numpy())
        np.testing.assert_equal(dataclasses.astuple(snapshot), dataclasses.astuple(state.snapshot()))
        state._observed, counting[0] = observed, True
        polls.append(steps)
        real_poll(self)

    monkeypatch.setattr(TrainState, "__init__", init)
    monkeypatch.setattr(BaseResourceVariable, "numpy", numpy)
    monkeypatch.setattr(GradNormGuard, "_poll", poll)
    train(compose_plan([f"dataset.data_dir={tfds_dir}", *FAST, "dataset.inject_nan_at_step=50",
                        "callbacks.grad_norm.action=skip", "callbacks.grad_norm.log_every_n_steps=1",
                        "callbacks.checkpoint.every_n_steps=1"]))
    assert len(polls) == 3 * 41 + 3  # before each execution but the first, and at each epoch's end
    # Before the first execution (the guard's start, the initial checkpoint), and once after
    # the skipped step's report wrote the state, at epoch 1's end. Before: 3 an execution.
    assert len(reads) <= 3, "\n".join(reads)


def test_rollback_recovers_from_an_injected_spike(tfds_dir: str, mlflow_store: str) -> None:
    metrics = train(compose_plan([
        f"dataset.data_dir={tfds_dir}", *FAST, "dataset.inject_nan_at_step=50",
        "callbacks.grad_norm.action=rollback", "callbacks.grad_norm.rollback_skip_batches=5",
    ]))
    client = MlflowClient()
    run = only_run(client)
    assert run.info.status == "FINISHED"
    assert metrics["test_accuracy"] > 0.8
    assert histories(client, run.info.run_id, ["rollbacks"])["rollbacks"] == [(50, 1.0)]
    # Restored the checkpoint of epoch 0's end (step 41); the learning rate halves from epoch 1 on.
    assert [v for _, v in histories(client, run.info.run_id, ["lr"])["lr"]] == pytest.approx([1e-3, 5e-4, 5e-4])
    (event,) = [json.loads(line) for line in
                mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/events.jsonl").splitlines()]
    assert event["event"] == "rollback" and event["step"] == 50 and event["restored_step"] == 41
    assert event["skip_batches"] == 5 and event["lr_scale"] == 0.5
    assert event["message"].startswith("non-finite output in layer 'rescale' at step 50 (epoch 1)")


def test_rollback_gives_up_after_max_rollbacks(tfds_dir: str, mlflow_store: str) -> None:
    # Every step's norm is above a threshold of 1e-6: each rollback meets another spike.
    with pytest.raises(DivergenceError, match=r"gave up after 2 rollbacks within 1000 steps"):
        train(compose_plan([
            f"dataset.data_dir={tfds_dir}", *FAST, "callbacks.grad_norm.threshold=1e-6",
            "callbacks.grad_norm.action=rollback", "callbacks.grad_norm.max_rollbacks=2",
            "callbacks.grad_norm.rollback_skip_batches=1", "callbacks.checkpoint.every_n_steps=1",
        ]))
    run = only_run(MlflowClient())
    assert run.info.status == "FAILED"
    assert histories(MlflowClient(), run.info.run_id, ["rollbacks"])["rollbacks"][-1][1] == 2.0


def test_threshold_stop_names_the_largest_layer(tfds_dir: str, mlflow_store: str) -> None:
    with pytest.raises(DivergenceError) as error:
        train(compose_plan([f"dataset.data_dir={tfds_dir}", *FAST, "callbacks.grad_norm.threshold=1e-3"]))
    assert re.fullmatch(r"gradient norm [\d.e+-]+ above callbacks.grad_norm.threshold=0.001 at step 0 \(epoch 0\); "
                        r"largest in layer '\w+' \([\d.e+-]+\)", str(error.value)), str(error.value)


def test_warn_applies_spikes_and_logs_per_layer_norms(tfds_dir: str, mlflow_store: str) -> None:
    train(compose_plan([f"dataset.data_dir={tfds_dir}", *FAST, "callbacks.grad_norm.threshold=1e-3",
                          "callbacks.grad_norm.action=warn", "callbacks.grad_norm.log_every_n_steps=10"]))
    client = MlflowClient()
    run = only_run(client)
    assert run.info.status == "FINISHED"
    skipped = histories(client, run.info.run_id, ["train_skipped_steps"])["train_skipped_steps"]
    assert [v for _, v in skipped] == [0, 0, 0]
    norms = client.get_metric_history(run.info.run_id, "grad_norm")
    assert sorted(m.step for m in norms) == [9, 19, 29, 39, 49, 59, 69, 79, 89, 99, 109, 119]
    layer_keys = sorted(k for k in run.data.metrics if k.startswith("grad_norm/"))
    # One per trainable layer of the mlp: two hidden Dense layers and the softmax head.
    assert len(layer_keys) == 3 and "grad_norm/probabilities" in layer_keys
    assert all(k.startswith("grad_norm/dense") for k in layer_keys if k != "grad_norm/probabilities")
    # The global norm is the root of the per-layer squares, step by step.
    per_layer = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)} for k in layer_keys}
    for metric in norms:
        root_of_squares = np.sqrt(sum(per_layer[k][metric.step] ** 2 for k in layer_keys))
        assert metric.value == pytest.approx(root_of_squares, rel=1e-4)


def _start_training(tmp_path: Path, tfds_dir: str, *overrides: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", f"dataset.data_dir={tfds_dir}", *FAST, "trainer.epochs=4",
         f"callbacks.checkpoint.directory={tmp_path / 'checkpoints'}", *overrides],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for_checkpoints(directory: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = tf.train.get_checkpoint_state(str(directory)) if (directory / "checkpoint").exists() else None
        if state is not None and len(state.all_model_checkpoint_paths) >= count:
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.02)
    raise AssertionError(f"no {count} checkpoints in {directory}")


@pytest.mark.slow
def test_kill_9_then_resume_continues_the_same_run_exactly(tfds_dir: str, tmp_path: Path,
                                                           empty_mlflow_db: Path) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    new_mlflow_store(reference, empty_mlflow_db)
    done = run_module("pipeline.train", f"dataset.data_dir={tfds_dir}", *FAST, "trainer.epochs=4", cwd=reference)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = only_run(MlflowClient(f"sqlite:///{reference / 'mlflow.db'}"))

    killed = tmp_path / "killed"
    killed.mkdir()
    new_mlflow_store(killed, empty_mlflow_db)
    process = _start_training(killed, tfds_dir)
    _wait_for_checkpoints(killed / "checkpoints", 2, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    client = MlflowClient(f"sqlite:///{killed / 'mlflow.db'}")
    run = only_run(client)
    assert run.info.status == "RUNNING", "kill -9 leaves no chance to close the run"

    resumed = run_module("pipeline.train", f"resume={run.info.run_id}", cwd=killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1, "the same run continued"
    got = histories(client, run.info.run_id)
    want = histories(MlflowClient(f"sqlite:///{reference / 'mlflow.db'}"), expected.info.run_id)
    for key in EPOCH_KEYS:
        assert [s for s, _ in got[key]] == [0, 1, 2, 3], f"{key}: every epoch exactly once"
        np.testing.assert_allclose([v for _, v in got[key]], [v for _, v in want[key]], rtol=1e-5, err_msg=key)
    assert run.data.metrics["test_accuracy"] == pytest.approx(expected.data.metrics["test_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_sigterm_saves_marks_killed_and_resume_last_finishes(tfds_dir: str, tmp_path: Path,
                                                            empty_mlflow_db: Path) -> None:
    new_mlflow_store(tmp_path, empty_mlflow_db)
    process = _start_training(tmp_path, tfds_dir)
    _wait_for_checkpoints(tmp_path / "checkpoints", 1, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: stopped by SIGTERM at step \d+ \(epoch \d\); checkpoint \S+/ckpt-\d+; "
                        r"continue with: python -m pipeline.train resume=\w+", last), last
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = only_run(client)
    assert run.info.status == "KILLED"
    saved = int(re.search(r"ckpt-(\d+)", last).group(1))
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith(f"ckpt-{saved}")

    resumed = run_module("pipeline.train", "resume=last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and "failure_reason" not in run.data.tags
    assert [s for s, _ in histories(client, run.info.run_id)["val_loss"]] == [0, 1, 2, 3]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(
    tfds_dir: str, mlflow_store: str, caplog: pytest.LogCaptureFixture
) -> None:
    train(compose_plan([f"dataset.data_dir={tfds_dir}", *FAST, "trainer.epochs=2"]))
    client = MlflowClient()
    run = only_run(client)
    directory = Path(run.data.tags["checkpoint_dir"])
    latest = tf.train.latest_checkpoint(str(directory))
    # The shard holding the variables (a compiled save may write a second, small one).
    data_file = max(directory.glob(f"{Path(latest).name}.data-*"), key=lambda path: path.stat().st_size)
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])  # truncated mid-write

    train(compose_plan([f"resume={run.info.run_id}", "trainer.epochs=3"]))
    assert f"checkpoint {latest} is unreadable" in caplog.text
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    got = histories(client, run.info.run_id)
    for key in EPOCH_KEYS:
        assert [s for s, _ in got[key]] == [0, 1, 2], f"{key}: every epoch exactly once"
    assert run.data.tags["resumed_with_epochs"] == "3"


def test_a_run_still_training_is_not_resumed_by_a_second_process(tfds_dir: str, mlflow_store: str) -> None:
    """The directory's lock, held here as the training process would hold it (`flock` is
    per open file, so a second open in one process is refused as another process is)."""
    train(compose_plan([f"dataset.data_dir={tfds_dir}", *FAST, "trainer.epochs=2"]))
    client = MlflowClient()
    run = only_run(client)
    directory = Path(run.data.tags["checkpoint_dir"])
    before = histories(client, run.info.run_id)

    held = checkpoint_store.hold(directory, "let it end")
    try:
        with pytest.raises(PipelineError) as error:
            train(compose_plan([f"resume={run.info.run_id}", "trainer.epochs=3"]))
        with pytest.raises(PipelineError) as new_run_error:  # a new run given the same directory
            train(compose_plan([f"dataset.data_dir={tfds_dir}", *FAST, f"callbacks.checkpoint.directory={directory}"]))
    finally:
        held.close()
    assert str(error.value).startswith(f"checkpoints {directory} are in use by pid {os.getpid()} on ")
    assert str(error.value).endswith("Let that process end, or stop it (its checkpoints stay), then resume")
    assert str(new_run_error.value).startswith(f"checkpoints {directory} are in use by pid {os.getpid()} on ")
    assert str(new_run_error.value).endswith("Give this run a callbacks.checkpoint.directory of its own, or leave "
                                             "it unset: each job then checkpoints into its own output directory")
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and "resumed_with_epochs" not in after.data.tags, "the run was not touched"
    others = [r.info.status for r in client.search_runs([run.info.experiment_id]) if r.info.run_id != run.info.run_id]
    assert others == ["FAILED"], "the refused new run is closed, not left RUNNING"
    assert histories(client, run.info.run_id) == before

    train(compose_plan([f"resume={run.info.run_id}", "trainer.epochs=3"]))  # released: it resumes
    assert [s for s, _ in histories(client, run.info.run_id)["val_loss"]] == [0, 1, 2]


def test_the_lock_goes_with_its_process_even_after_kill_9(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from pipeline.training.checkpoint_store import hold; "
         "held = hold(Path(sys.argv[1]), 'let it end'); print('held', flush=True); time.sleep(600)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(PipelineError, match=f"in use by pid {holder.pid} on "):
            checkpoint_store.hold(tmp_path, "let it end")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    checkpoint_store.hold(tmp_path, "let it end").close()


def test_checkpoint_of_another_layout_fails_in_one_line_and_is_left_as_it_was(tmp_path: Path, caplog) -> None:
    """E.g. resuming a run whose checkpoints an earlier version wrote, when a train-state
    variable was float32 and is float64 now: a readable error, not a traceback and one
    TensorFlow warning per value the read did not restore."""
    import gc

    from pipeline.errors import PipelineError
    from pipeline.training.checkpoint_store import read_all

    # The earlier layout had more state, too: values this model has no place for.
    earlier = tf.train.Checkpoint(state=[tf.Variable(0.0, dtype=tf.float32), tf.Variable(1, dtype=tf.int64),
                                         tf.Variable([2.0, 3.0])], extra=[tf.Variable(4.0)])
    path = earlier.write(str(tmp_path / "ckpt-7"))
    written = {file.name: file.read_bytes() for file in tmp_path.iterdir()}
    now = tf.train.Checkpoint(state=[tf.Variable(0.0, dtype=tf.float64), tf.Variable(0, dtype=tf.int64)])
    expected = (r"^checkpoint .*ckpt-7 does not hold this model's training state: another model or another "
                r"version of the pipeline wrote it \(.*expected dtype double does not equal original dtype "
                r"float\)\. It is left as it was")
    with pytest.raises(PipelineError, match=expected):
        read_all(now, path)
    del now
    gc.collect()  # the failed read's restore state is freed: TensorFlow would list what it left unrestored
    assert not [r.getMessage() for r in caplog.records if r.name == "tensorflow" and r.levelname == "WARNING"]
    assert {file.name: file.read_bytes() for file in tmp_path.iterdir()} == written
