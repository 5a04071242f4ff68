"""Shared fixtures: the real `conf/`, a real TFDS data dir and a real MLflow store in tmp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import pytest

from pipeline.config import compose as compose_config  # noqa: F401  (the real conf/, as the entry points compose it)
from pipeline.plan import compose as compose_plan  # noqa: F401  (a run's plan, as python -m pipeline.train resolves it)

REPO = Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m module args...` in a fresh interpreter, as a user would run it."""
    # Only what the test passes decides where runs go, never the caller's environment.
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A TFDS data dir with `digits` prepared once for the whole session."""
    import tensorflow_datasets as tfds

    import pipeline.datasets  # noqa: F401  (registers digits)

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder("digits", data_dir=data_dir).download_and_prepare()
    return data_dir


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite tracking store; artifacts land in tmp_path/mlruns."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    # An earlier test's active experiment id means nothing in this store.
    mlflow.set_experiment(experiment_id="0")
    return uri


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
