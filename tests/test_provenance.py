"""pipeline.tracking.provenance and the run naming in pipeline.tracking, against real git
repositories, a real MLflow store and MLflow's own system-metrics monitor."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import hydra
import keras
import mlflow
import pytest
import tensorflow as tf
from conftest import REPO, compose_config
from mlflow.tracking import MlflowClient

from pipeline import redact, tracking
from pipeline.tracking import provenance

HEX40 = re.compile(r"[0-9a-f]{40}")
SAMPLING_VARIABLES = ("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING",
                      "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with one commit of `pkg/module.py`."""
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "module.py").write_text("x = 1\n")
    git(root, "init", "-q", "-b", "trunk")
    git(root, "add", "pkg/module.py")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    return root


def new_experiment(name: str) -> str:
    """An experiment in the current store, without making it MLflow's process-wide
    active experiment (which would outlive this test's store)."""
    return MlflowClient().create_experiment(name)


@pytest.fixture
def sampling_env():
    """Restore MLflow's system-metrics variables and the module's bookkeeping afterwards:
    `enable_system_metrics` sets process-wide variables, as MLflow 3.17 requires."""
    saved = {name: os.environ.get(name) for name in SAMPLING_VARIABLES}
    for name in SAMPLING_VARIABLES:
        os.environ.pop(name, None)
    provenance._set_by_us.clear()
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    provenance._set_by_us.clear()


# -- git and versions -----------------------------------------------------------------
@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_provenance_tags_in_this_checkout() -> None:
    tags = provenance.provenance_tags(["trainer.epochs=2", "seed=1"])
    commit = tags["mlflow.source.git.commit"]
    assert HEX40.fullmatch(commit) and commit == git(REPO, "rev-parse", "HEAD")
    branch = git(REPO, "rev-parse", "--abbrev-ref", "HEAD")  # "HEAD" when detached, as CI checks out
    # A detached HEAD records no branch (test_git_remote_url_without_credentials_and_detached_head).
    assert tags.get("mlflow.source.git.branch") == (None if branch == "HEAD" else branch)
    # Other people edit this checkout while the tests run: compare with git's own answer.
    dirty = bool(git(REPO, "status", "--porcelain", "--untracked-files=no"))
    assert tags["git_dirty"] == tags["mlflow.source.git.dirty"] == str(dirty).lower()
    assert tags["overrides"] == "trainer.epochs=2 seed=1"
    assert tags["command"] == " ".join([os.path.basename(sys.executable), *sys.argv])
    assert tags["version.tensorflow"] == tf.__version__
    assert tags["version.keras"] == keras.__version__
    assert tags["version.mlflow"] == mlflow.__version__
    assert tags["version.hydra"] == hydra.__version__
    assert tags["version.python"] == ".".join(map(str, sys.version_info[:3]))
    assert provenance.provenance_tags([])["overrides"] == "(defaults)"


def test_git_tags_clean_dirty_and_untracked(repo: Path) -> None:
    module = repo / "pkg" / "module.py"
    tags = provenance.git_tags(module)
    assert tags == {
        "mlflow.source.git.commit": git(repo, "rev-parse", "HEAD"),
        "mlflow.source.git.branch": "trunk",
        "git_dirty": "false",
        "mlflow.source.git.dirty": "false",
    }, "no remote: no repoURL"
    (repo / "pkg" / "new.py").write_text("y = 2\n")
    (repo / "outputs").mkdir()
    (repo / "outputs" / "run.log").write_text("a run's output\n")
    assert provenance.git_tags(module)["git_dirty"] == "false", "untracked files do not count"
    module.write_text("x = 2\n")
    assert provenance.git_tags(module)["git_dirty"] == "true"
    git(repo, "add", "pkg/module.py")
    assert provenance.git_tags(module)["git_dirty"] == "true", "staged changes count"


def test_git_remote_url_without_credentials_and_detached_head(repo: Path) -> None:
    git(repo, "remote", "add", "origin", "https://alice:s3cret@example.com/org/project.git")
    git(repo, "checkout", "-q", "--detach")
    tags = provenance.git_tags(repo / "pkg" / "module.py")
    assert tags["mlflow.source.git.repoURL"] == "https://example.com/org/project.git"
    assert "mlflow.source.git.branch" not in tags, "a detached HEAD has no branch"
    assert HEX40.fullmatch(tags["mlflow.source.git.commit"])
    assert redact.strip_credentials("git@example.com:org/project.git") == "git@example.com:org/project.git"


def test_no_git_tags_outside_a_checkout_or_without_git(repo: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    loose = tmp_path / "loose" / "module.py"
    loose.parent.mkdir()
    loose.write_text("x = 1\n")
    assert provenance.git_tags(loose) == {}
    # A folder inside a repository that does not track it (a venv, site-packages).
    venv = repo / "venv" / "site-packages" / "pipeline" / "provenance.py"
    venv.parent.mkdir(parents=True)
    venv.write_text("x = 1\n")
    assert provenance.git_tags(venv) == {}
    monkeypatch.setenv("PATH", str(tmp_path / "no-binaries-here"))
    tags = provenance.provenance_tags([])
    assert not [key for key in tags if "git" in key]
    assert tags["version.mlflow"] == mlflow.__version__


# -- run names ------------------------------------------------------------------------
def test_default_run_name_is_unique_and_description_says_what_ran() -> None:
    cfg = compose_config(["optimizer=sgd", "optimizer.lr=0.05", "optimizer.schedule=cosine",
                          "optimizer.warmup_epochs=1", "trainer.epochs=7"])
    choices = {"architecture": "mlp", "optimizer": "sgd"}
    first = tracking.RunNames.from_config(cfg, choices, "float32")
    second = tracking.RunNames.from_config(cfg, choices, "float32")
    assert re.fullmatch(r"mlp-digits-float32-[0-9a-f]{6}", first.run)
    assert first.run != second.run, "two runs of a sweep get different names"
    assert first.model == "digits-mlp"
    assert {k: first.tags[k] for k in ("architecture", "dataset", "precision")} == {
        "architecture": "mlp", "dataset": "digits", "precision": "float32"}
    assert first.tags["mlflow.note.content"] == (
        f"mlp trained on digits (batch {cfg.dataset.batch_size}) in float32.\n\n"
        f"sgd, lr 0.05 (cosine schedule, 1 warmup epoch), up to 7 epochs, seed {cfg.seed}.")
    # Without Hydra's choices, the builder's module and the optimizer class name them.
    bare = tracking.RunNames.from_config(compose_config([]), {}, "mixed_bfloat16")
    assert re.fullmatch(r"mlp-digits-mixed_bfloat16-[0-9a-f]{6}", bare.run)
    assert bare.tags["mlflow.note.content"].splitlines()[-1].startswith("Adam, lr 0.001 (constant schedule)")
    named = tracking.RunNames.from_config(compose_config(["mlflow.run_name=baseline"]), choices, "float32")
    assert named.run == "baseline"


def test_run_carries_name_description_and_provenance(mlflow_store: str) -> None:
    cfg = compose_config([])
    names = tracking.RunNames.from_config(cfg, {"architecture": "mlp", "optimizer": "adam"}, "float32")
    experiment_id = new_experiment("provenance")
    with tracking.start_run(experiment_id, names.run, names.tags | provenance.provenance_tags(["seed=3"])) as run:
        pass
    logged = MlflowClient().get_run(run.info.run_id)
    assert logged.info.run_name == names.run
    tags = logged.data.tags
    assert tags["mlflow.note.content"] == names.tags["mlflow.note.content"]
    assert tags["overrides"] == "seed=3" and tags["version.tensorflow"] == tf.__version__
    # The checkout the code runs from, or no git tags where there is none (an installed copy, no git).
    in_checkout = shutil.which("git") is not None and (REPO / ".git").exists()
    assert tags.get("mlflow.source.git.commit") == (git(REPO, "rev-parse", "HEAD") if in_checkout else None)
    assert tags.get("git_dirty") in (("true", "false") if in_checkout else (None,))


# -- datasets -------------------------------------------------------------------------
def test_dataset_inputs_read_back(mlflow_store: str, tfds_dir: str) -> None:
    sizes = {"train": 1293, "val": 144, "test": 360}
    data_dir = f"{tfds_dir}/digits/1.0.0"  # what the pipeline records: TFDS's info.data_dir
    with mlflow.start_run(experiment_id=new_experiment("datasets")) as run:
        logged = provenance.log_dataset_input("digits", "1.0.0", sizes, data_dir=data_dir)
    inputs = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert len(inputs) == 3
    by_split = {}
    for dataset_input in inputs:
        tags = {tag.key: tag.value for tag in dataset_input.tags}
        by_split[tags["split"]] = (dataset_input.dataset, tags)
    assert set(by_split) == set(sizes)
    contexts = {split: tags["mlflow.data.context"] for split, (_, tags) in by_split.items()}
    assert contexts == {"train": "training", "val": "validation", "test": "test"}
    for split, (dataset, tags) in by_split.items():
        assert dataset.name == "digits:1.0.0"
        assert re.fullmatch(r"[0-9a-f]{8}", dataset.digest)
        assert dataset.source_type == "tfds"
        assert json.loads(dataset.source) == {"name": "digits", "version": "1.0.0", "data_dir": data_dir}
        assert json.loads(dataset.profile) == {"split": split, "num_examples": sizes[split]}
        assert tags["examples"] == str(sizes[split])
    assert len({dataset.digest for dataset, _ in by_split.values()}) == 3, "one digest per split"
    assert [d.digest for d in logged] == [by_split[split][0].digest for split in sizes]
    # The recorded source leads back to the data.
    source = mlflow.data.get_source(inputs[0])
    assert isinstance(source, provenance.TFDSSource) and source.data_dir == data_dir
    builder = source.load()
    assert builder.info.version == "1.0.0" and builder.info.splits["test"].num_examples == 360


def test_dataset_digest_identifies_the_data_not_its_location() -> None:
    def digests(version="1.0.0", data_dir="/a", train=1293):
        source = provenance.TFDSSource("digits", version, data_dir)
        return provenance.SplitDataset(source, "digits", version, "train", train).digest

    assert digests() == digests(data_dir="/somewhere/else")
    assert len({digests(), digests(version="1.0.1"), digests(train=1294)}) == 3


# -- system metrics -------------------------------------------------------------------
def monitor_threads() -> list[threading.Thread]:
    """MLflow's system-metrics monitors running in this process (mlflow.system_metrics.SystemMetricsMonitor)."""
    return [thread for thread in threading.enumerate() if thread.name == "SystemMetricsMonitor" and thread.is_alive()]


def test_system_metrics_appear_in_a_short_run(mlflow_store: str, sampling_env) -> None:
    assert provenance.enable_system_metrics(sampling_interval=0.5, samples_before_logging=2) is True
    assert os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] == "0.5"
    experiment_id = new_experiment("system")
    client = MlflowClient()
    memory = "system/system_memory_usage_megabytes"
    with tracking.start_run(experiment_id, "with", {}, log_system_metrics=True) as run:
        # A point every 2 samples of 0.5 s: two points take ~2 s, longer on a loaded machine.
        deadline = time.monotonic() + 30
        while len(points := client.get_metric_history(run.info.run_id, memory)) < 2:
            assert time.monotonic() < deadline, (
                f"MLflow's system-metrics monitor logged {len(points)} point(s) of {memory} within 30 s of the "
                "run's start; expected 2 (a point every 2 samples of 0.5 s)")
            time.sleep(0.1)
        assert monitor_threads(), "MLflow samples on a thread of its own while the run is open"
    with tracking.start_run(experiment_id, "without", {}) as quiet:  # default: MLflow's variable, unset
        assert not monitor_threads(), "no monitor samples for this run: it can log no system metric"
    metrics = client.get_run(run.info.run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    assert all(key.startswith("system/") for key in metrics)
    history = client.get_metric_history(run.info.run_id, memory)
    assert len(history) >= 2 and all(point.value > 0 for point in history)
    assert client.get_run(quiet.info.run_id).data.metrics == {}


def test_system_metrics_respect_the_users_settings(sampling_env) -> None:
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "7"
    assert provenance.enable_system_metrics(sampling_interval=1.0) is True
    assert os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] == "7", "the user's value stays"
    assert os.environ["MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING"] == "3"
    assert provenance.enable_system_metrics(samples_before_logging=5) is True
    assert os.environ["MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING"] == "5", "ours may change"
    os.environ["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"] = "false"
    assert provenance.enable_system_metrics() is False
    with pytest.raises(ValueError, match="sampling_interval must be > 0 seconds. Received: 0"):
        provenance.enable_system_metrics(sampling_interval=0)
