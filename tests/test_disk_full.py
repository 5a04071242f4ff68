"""The disk fills up after training: one line says what happened and where the work is,
the run ends FAILED (at once, or at the next start once the disk has room), and the
checkpoints stay readable. Runs on a real, small tmpfs (needs root to mount it)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import tensorflow as tf
from conftest import run_module, under_ci
from mlflow.tracking import MlflowClient

from pipeline.training.checkpoint_store import latest_readable


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 MB tmpfs mounted at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        if under_ci():
            pytest.fail(f"cannot mount a tmpfs under CI: {mounted.stderr.strip()}")
        pytest.skip(f"mounting a tmpfs needs root: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb") as file:
        try:
            while True:
                file.write(b"\0" * (1 << 20))
                file.flush()
        except OSError:  # ENOSPC: the disk is full
            pass
    return filler


@pytest.mark.slow
def test_disk_full_after_training_is_one_line_a_failed_run_and_intact_checkpoints(small_disk: Path,
                                                                                 tfds_dir: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {
        "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "pipeline.train", "trainer.epochs=2",
                                f"dataset.data_dir={tfds_dir}"], cwd=small_disk, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    filled = threading.Event()
    fillers: list[Path] = []

    def watch() -> None:  # the disk fills the moment training is over
        for line in process.stdout:
            if "final: {" in line and not filled.is_set():
                fillers.append(_fill(small_disk))
                filled.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stderr = process.stderr.read()
    process.wait(timeout=600)
    watcher.join(10)
    assert filled.is_set(), "training never finished:\n" + stderr[-3000:]
    assert process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-5000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: training finished but MLflow could not record it"), last
    assert "/checkpoints/ckpt-82" in last, f"names the last complete checkpoint: {last}"

    fillers[0].unlink()  # room again: the next start closes the run the full disk left open
    again = run_module("pipeline.train", "debug=smoke", f"dataset.data_dir={tfds_dir}", cwd=small_disk)
    assert again.returncode == 0, again.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{small_disk / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id],
                              order_by=["attributes.start_time ASC"])
    first = runs[0]
    assert first.info.status == "FAILED", first.info.status
    assert first.data.tags.get("failure_reason"), "the reason is recorded"
    checkpoints = first.data.tags["checkpoint_dir"]
    latest = latest_readable(checkpoints)
    assert latest is not None and latest.endswith("ckpt-82"), latest  # both epochs of 41 steps
    tf.train.load_checkpoint(latest)  # every tensor reads back
