"""Shared fixtures: the real `conf/`, a real TFDS data dir and a real MLflow store in tmp."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import keras
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pipeline.config import compose as compose_config  # noqa: F401  (the real conf/, as the entry points compose it)
from pipeline.plan import compose as compose_plan  # noqa: F401  (a run's plan, as python -m pipeline.train resolves it)

REPO = Path(__file__).resolve().parents[1]


def under_ci() -> bool:
    """`$CI` is set, as `.ci/run` sets it."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_program(name: str, install: str) -> str:
    """The path of the system program `name` a test needs. Missing, it skips the test
    with how to install it, except under CI, where it fails: `.ci/run` installs it."""
    path = shutil.which(name)
    if path is None:
        reason = f"`{name}` is missing: {install}"
        if under_ci():
            pytest.fail(f"{reason}; CI must run this test (.ci/run installs it)")
        pytest.skip(reason)
    return path


def run_module(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m module args...` in a fresh interpreter, as a user would run it."""
    # Only what the test passes decides where runs go, never the caller's environment.
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_in_process(module: str, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`python -m module argv...` (an entry point: pipeline.train, evaluate, inspect) in
    this process, through the same `cli_main` the command runs: (exit code, stdout, stderr).
    The caller restores `sys.argv` (`monkeypatch.setattr(sys, "argv", sys.argv)`)."""
    import importlib

    from hydra.core.global_hydra import GlobalHydra

    # Hydra's logging setup would bind handlers to pytest's capture streams, which close.
    sys.argv = [module, *argv, "hydra/job_logging=none", "hydra/hydra_logging=none"]
    GlobalHydra.instance().clear()
    code = 0
    try:
        importlib.import_module(module).cli_main()
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        GlobalHydra.instance().clear()
    out, err = capsys.readouterr()
    return code, out, err


# Every job of the tests' sweeps trains one epoch, silently (test_sweeps.py, test_scale_sweeps.py).
SWEEP_JOB = ("trainer.epochs=1", "trainer.verbose=0")


def sweep_runs(client: MlflowClient, experiment: str = "digits"):
    """(parent, children sorted by job number) of the one sweep in `experiment`."""
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    (parent,) = parents
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: int(r.data.tags["sweep.job"]))
    assert len(children) == len(runs) - 1, "every other run is a child of the sweep"
    return parent, children


# Tests sharing an expensive session fixture run on one xdist worker (`--dist loadgroup`
# in pyproject.toml), which builds it once: {fixture, direct or not: xdist group}.
SHARED_FIXTURE_GROUPS = {"default_run": "default_run", "mlflow_server": "mlflow_server"}


@pytest.hookimpl(tryfirst=True)  # before xdist appends each test's group to its id
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group the users of each shared session fixture, and the tests of a module with a
    module-scoped fixture (built once per worker too), unless a module picked its own
    group; start the longest work first: the shared session fixtures' groups, then
    `slow` tests, then the rest (`--no-loadscope-reorder` hands them out in this order)."""
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        group = next((group for fixture, group in SHARED_FIXTURE_GROUPS.items() if fixture in item.fixturenames), None)
        if group is None and any(definitions[-1].scope == "module"
                                 for definitions in item._fixtureinfo.name2fixturedefs.values()):
            group = item.module.__name__
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))

    def rank(item: pytest.Item) -> int:
        group = item.get_closest_marker("xdist_group")
        if group is not None and group.args[0] in SHARED_FIXTURE_GROUPS.values():
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)


def pytest_collection_finish(session: pytest.Session) -> None:
    """What collection imported (TensorFlow, Keras, MLflow: ~500k objects) lives as long as
    the session: frozen out of every later garbage collection, as `pipeline.heavy_imports`
    does in a training process, so that the collections in each test scan what it made."""
    gc.freeze()


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A TFDS data dir with `digits` prepared once for the whole session."""
    import tensorflow_datasets as tfds

    import pipeline.datasets  # noqa: F401  (registers digits)

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder("digits", data_dir=data_dir).download_and_prepare()
    return data_dir


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite database with MLflow's tables and no experiment: creating a store
    runs MLflow's schema migrations (5-10 s on this machine), copying this file takes
    milliseconds. At a copy's first use MLflow adds the Default experiment, with its
    artifacts under the working directory, as it does in a new store."""
    from mlflow.tracking import MlflowClient

    database = tmp_path_factory.mktemp("mlflow_db") / "mlflow.db"
    MlflowClient(f"sqlite:///{database}").search_experiments()  # the tables, and the Default experiment
    with contextlib.closing(sqlite3.connect(database)) as connection, connection:
        connection.execute("DELETE FROM experiments")  # ... which each copy creates for itself
    return database


def new_mlflow_store(directory: Path, empty_mlflow_db: Path) -> str:
    """A new sqlite store `directory/mlflow.db`, a copy of `empty_mlflow_db`; its URI."""
    shutil.copyfile(empty_mlflow_db, directory / "mlflow.db")
    return f"sqlite:///{directory / 'mlflow.db'}"


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_db: Path) -> str:
    """A fresh sqlite tracking store; artifacts land in tmp_path/mlruns."""
    import mlflow

    uri = new_mlflow_store(tmp_path, empty_mlflow_db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    # An earlier test's active experiment id means nothing in this store.
    mlflow.set_experiment(experiment_id="0")
    return uri


@dataclass(frozen=True)
class TrainedRun:
    """A finished training run in a store of its own, and what training handed back."""

    uri: str  # the store's tracking URI: sqlite in `directory`
    directory: Path  # the launch directory: mlflow.db, mlruns/, outputs/ (Hydra's run dir, checkpoints)
    metrics: dict[str, float]  # what train() returned
    run: Run  # the run as MLflow's client read it right after training
    model: keras.Model  # the trained GuardedModel (ModelCapture)


# The default digits/mlp, 2 epochs; gradient norms every 10 of its 82 steps, so that its
# grad_norm history has enough points to plot.
DEFAULT_RUN_OVERRIDES = ("trainer.epochs=2", "callbacks.grad_norm.log_every_n_steps=10")


@pytest.fixture(scope="session")
def default_run(tfds_dir: str, tmp_path_factory: pytest.TempPathFactory, empty_mlflow_db: Path) -> TrainedRun:
    """The default mlp trained on digits in this process, once per session (per xdist
    worker: `pytest_collection_modifyitems` below keeps its users on one worker), and
    registered as digits-mlp/1 @champion in a store of its own.

    Its users read it back; one that must change it (e.g. corrupt its checkpoints) puts
    it back as it found it. New runs (an evaluation) may be added to its store."""
    from mlflow.tracking import MlflowClient

    from pipeline.train import train

    directory = tmp_path_factory.mktemp("default_run")
    uri = new_mlflow_store(directory, empty_mlflow_db)
    overrides = [*DEFAULT_RUN_OVERRIDES, f"dataset.data_dir={tfds_dir}",
                 "+callbacks.capture._target_=conftest.ModelCapture"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(directory)
        ModelCapture.models.clear()
        metrics = train(compose_plan(overrides))
        (model,) = ModelCapture.models
        ModelCapture.models.clear()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    return TrainedRun(uri=uri, directory=directory, metrics=metrics, run=run, model=model)


@pytest.fixture
def in_default_run_store(default_run: TrainedRun, monkeypatch: pytest.MonkeyPatch) -> TrainedRun:
    """`default_run`, with MLflow (this process's and subprocesses') pointed at its store
    and the working directory in it, as for a test that continues in that store."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", default_run.uri)
    monkeypatch.chdir(default_run.directory)
    mlflow.set_tracking_uri(default_run.uri)
    return default_run


class ModelCapture(keras.callbacks.Callback):
    """Test callback (selected by `_target_`): keeps the trained model for inspection."""

    models: list[keras.Model] = []

    def on_train_end(self, logs=None) -> None:
        ModelCapture.models.append(self.model)


class FailAtEpochEnd(keras.callbacks.Callback):
    """Test callback (selected by `_target_`): fails the run like a crash mid-training."""

    def on_epoch_end(self, epoch, logs=None) -> None:
        raise RuntimeError(f"injected failure after epoch {epoch}")


def reload_without_project(tmp_path: Path, script: str, *args: str) -> dict:
    """Run `script` in a fresh interpreter that refuses to import this project's
    packages, after `REFUSE_PROJECT` has loaded the MLflow model `args[1]` from the
    tracking URI `args[0]`; return the JSON the script prints last."""
    result = subprocess.run([sys.executable, "-c", REFUSE_PROJECT + script, *args],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# Reloading needs only TensorFlow, MLflow (and here NumPy, scikit-learn or TFDS for the
# data): any import of this project's packages fails.
REFUSE_PROJECT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class RefuseProject(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"pipeline", "architectures", "callbacks", "conf"}:
                raise ImportError(f"project module {name} imported")
            return None

    sys.meta_path.insert(0, RefuseProject())
    import mlflow
    import numpy as np
    mlflow.set_tracking_uri(sys.argv[1])
    model = mlflow.pyfunc.load_model(sys.argv[2])
    """
)

# The digits test split by its contract: every fifth scikit-learn digit, pixels * 255 / 16;
# argv[3], if given, receives the probabilities (.npy).
SCORE_DIGITS = textwrap.dedent(
    """
    from sklearn.datasets import load_digits
    digits = load_digits()
    test = np.arange(len(digits.target)) % 5 == 0
    probabilities = np.asarray(model.predict(np.round(digits.images[test] * 255 / 16).astype(np.uint8)[..., None]))
    if len(sys.argv) > 3:
        np.save(sys.argv[3], probabilities)
    print(json.dumps({"accuracy": float(np.mean(probabilities.argmax(1) == digits.target[test])),
                      "dtype": str(probabilities.dtype), "shape": list(probabilities.shape)}))
    """
)

# The prepared synthetic test split, read with TFDS alone (no builder code needed).
SCORE_MULTIMODAL = textwrap.dedent(
    """
    import tensorflow_datasets as tfds
    test = tfds.builder_from_directory(sys.argv[3]).as_dataset(split="test", as_supervised=True)
    inputs, labels = next(iter(tfds.as_numpy(test.batch(100_000))))
    outputs = model.predict(inputs)
    print(json.dumps({
        "shapes": {k: list(v.shape) for k, v in outputs.items()},
        "dtypes": {k: str(v.dtype) for k, v in outputs.items()},
        "binary_accuracy": float(np.mean((outputs["binary"][:, 0] > 0.5) == labels["binary"])),
        "category_accuracy": float(np.mean(outputs["category"].argmax(1) == labels["category"])),
    }))
    """
)


# A real `mlflow server` for the session (tests/mlflow_server.py), and one run trained against it.
from mlflow_server import mlflow_server, server_run  # noqa: E402, F401
