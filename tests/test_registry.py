"""The model registry as a team ships from it: the champion is chosen on validation with a
margin, every version carries a model card, every logged model an input example that
`mlflow models predict` takes, and MLflow's own REST serving (`mlflow models serve`)
answers the test split, for a single-input model and a multi-input, multi-output one.

Three real trainings into one store are shared by the module; each model is served once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from conftest import compose_plan
from mlflow.tracking import MlflowClient
from mlflow_server import free_port, stop_process_group, wait_until_answers

from pipeline.tracking.registry import promote_if_better
from pipeline.train import train

# One xdist worker runs the module (`--dist loadgroup`), so its trainings and servers are made once.
pytestmark = pytest.mark.xdist_group("registry")

MLP, MULTI_IO = "digits-mlp", "synthetic_multimodal-multi_io"
# `mlflow models serve` answers /ping after about 40 s on a loaded 2-core machine (FACTS.md).
SERVE_TIMEOUT = 180.0


@dataclass
class Store:
    uri: str
    tmp: Path
    good: dict[str, float]  # metrics of the first mlp training (8 epochs)
    worse: dict[str, float]  # the second: 1 epoch at a tenth of the rate, worse on validation
    multi_io: dict[str, float]


@pytest.fixture(scope="module")
def store(tfds_dir: str, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.chdir(tmp)
    common = [f"dataset.data_dir={tfds_dir}", "trainer.verbose=0"]
    try:
        good = train(compose_plan(["trainer.epochs=8", *common]))
        worse = train(compose_plan(["trainer.epochs=1", "optimizer.lr=1e-4", *common]))
        multi_io = train(compose_plan(["architecture=multi_io", "dataset=synthetic_multimodal", "trainer.epochs=3",
                                       *common]))
        mlflow.set_tracking_uri(uri)
        yield Store(uri, tmp, good, worse, multi_io)
    finally:
        mp.undo()


def cli_env(uri: str) -> dict[str, str]:
    # `mlflow models serve` shells out to uvicorn: the interpreter's bin/ must be on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path, "TF_CPP_MIN_LOG_LEVEL": "2"}


# -- promotion on validation -------------------------------------------------------------


def test_promotion_needs_a_validation_margin_and_ignores_test(mlflow_store: str) -> None:
    client = MlflowClient()
    client.create_registered_model("m")
    v1, v2, v3, v4, v5 = (str(client.create_model_version("m", source=f"/tmp/v{i}").version) for i in range(5))
    # (validation, test) accuracy of each version; only validation and the margin decide.
    scores = {v1: (0.950, 0.90), v2: (0.955, 0.99), v3: (0.940, 0.99), v4: (0.965, 0.80), v5: (float("nan"), 1.0)}
    for version, (_val, test) in scores.items():
        client.set_model_version_tag("m", version, "test_accuracy", repr(test))
    promote = [promote_if_better(client, "m", v, "champion", "final_val_accuracy", scores[v][0], min_delta=0.01)
               for v in (v1, v2, v3, v4, v5)]
    assert promote == [(True, None),
                       (False, v1),  # better on test, better on validation by 0.005 only: noise
                       (False, v1),  # better on test, worse on validation
                       (True, v1),  # better on validation by 0.015
                       (False, v4)]  # not finite: never champion
    assert str(client.get_model_version_by_alias("m", "champion").version) == v4
    assert "final_val_accuracy" not in client.get_model_version("m", v5).tags


@pytest.mark.slow
def test_a_second_training_worse_on_validation_leaves_the_champion(store: Store) -> None:
    client = MlflowClient(store.uri)
    assert store.worse["final_val_accuracy"] < store.good["final_val_accuracy"]
    first, second = (client.get_model_version(MLP, v) for v in ("1", "2"))
    assert str(client.get_model_version_by_alias(MLP, "champion").version) == "1"
    assert client.get_run(second.run_id).data.tags["champion_promoted"] == "false"
    assert float(first.tags["final_val_accuracy"]) == pytest.approx(store.good["final_val_accuracy"])
    assert float(second.tags["test_accuracy"]) == pytest.approx(store.worse["test_accuracy"]), "test is shown"


@pytest.mark.slow
def test_multi_output_models_are_chosen_on_their_heads_mean_validation_accuracy(store: Store) -> None:
    heads = [store.multi_io[f"final_val_{head}_accuracy"] for head in ("binary", "category")]
    assert store.multi_io["final_val_accuracy"] == pytest.approx(np.mean(heads))
    client = MlflowClient(store.uri)
    champion = client.get_model_version_by_alias(MULTI_IO, "champion")
    assert client.get_run(champion.run_id).data.tags["champion_promoted"] == "true"
    assert float(champion.tags["final_val_accuracy"]) == pytest.approx(store.multi_io["final_val_accuracy"])


# -- the model card ------------------------------------------------------------------------


@pytest.mark.slow
def test_every_version_has_a_model_card(store: Store) -> None:
    client = MlflowClient(store.uri)
    version = client.get_model_version(MLP, "1")
    run = client.get_run(version.run_id)
    card = version.description
    assert card.startswith(f"### {MLP} v1\n")
    assert "**mlp** (167,178 parameters, float32) trained on **digits:1.0.0** for 8 epochs (at most 8)" in card
    assert "| train | 1293 |" in card and "| validation | 144 |" in card and "| test | 360 |" in card
    good = store.good
    assert f"| accuracy | {good['final_val_accuracy']:.4f} | {good['test_accuracy']:.4f} |" in card
    assert "**Input**: `uint8 (-1, 8, 8, 1)`" in card and "**Output**: `float32 (-1, 10)`" in card
    for line in (f'mlflow.pyfunc.load_model("models:/{MLP}/1")', f"mlflow models serve -m models:/{MLP}/1",
                 f"python -m pipeline.evaluate model=models:/{MLP}/1"):
        assert line in card
    assert f"[{run.info.run_name}](#/experiments/{run.info.experiment_id}/runs/{run.info.run_id})" in card
    tags = version.tags
    assert (tags["architecture"], tags["optimizer.lr"], tags["trainer.epochs"], tags["seed"]) == ("mlp", "0.001",
                                                                                                 "8", "42")
    assert tags["architecture.hidden_units"] == "[512, 256]" and tags["model.parameters"] == "167178"
    assert tags["git_commit"] == run.data.tags["mlflow.source.git.commit"]

    multi = client.get_model_version(MULTI_IO, "1").description
    assert "**Input**: `image: uint8 (-1, 32, 32, 3)`, `features: float32 (-1, 10)`" in multi
    assert "**Output**: `binary: float32 (-1, 1)`, `category: float32 (-1, 3)`" in multi
    assert "| category_accuracy |" in multi


# -- input example and MLflow's own serving --------------------------------------------


@pytest.mark.slow
def test_mlflow_models_predict_takes_the_input_example(store: Store, servers: dict[str, Served]) -> None:
    # `servers` only starts `mlflow models serve` of both champions, to load while this runs.
    env = cli_env(store.uri)
    # As a user would: fetch the champion's example request, then predict with it.
    download = subprocess.run(["mlflow", "artifacts", "download", "-u",
                               f"models:/{MLP}@champion/serving_input_example.json", "-d", str(store.tmp / "ex")],
                              env=env, capture_output=True, text=True, timeout=120)
    assert download.returncode == 0, download.stderr[-2000:]
    example = store.tmp / "ex" / "serving_input_example.json"
    images = np.asarray(json.loads(example.read_text())["inputs"])
    assert images.shape == (3, 8, 8, 1) and images.min() >= 0 and images.max() <= 255, "3 raw uint8 test images"
    predicted = subprocess.run(["mlflow", "models", "predict", "-m", f"models:/{MLP}@champion", "-i", str(example),
                                "--env-manager", "local", "-o", str(store.tmp / "predictions.json")],
                               env=env, capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    probabilities = np.asarray(json.loads((store.tmp / "predictions.json").read_text())["predictions"])
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)

    # The multi-input model's example is a dict of a few raw inputs.
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MULTI_IO}@champion/serving_input_example.json",
                                                     dst_path=str(store.tmp / "ex_multi")))
    inputs = json.loads(local.read_text())["inputs"]
    assert np.asarray(inputs["image"]).shape == (3, 32, 32, 3) and np.asarray(inputs["features"]).shape == (3, 10)


@dataclass
class Served:
    url: str
    process: subprocess.Popen
    log: Path


def serve(name: str, uri: str, root: Path) -> Served:
    """Start `mlflow models serve` of `models:/NAME@champion` on a free port."""
    port = free_port()
    log = root / f"serve-{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(["mlflow", "models", "serve", "-m", f"models:/{name}@champion",
                                    "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                                   env=cli_env(uri), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)  # its own group: stopping it reaches uvicorn too
    return Served(f"http://127.0.0.1:{port}", process, log)


@pytest.fixture(scope="module")
def servers(store: Store):
    """`mlflow models serve` of both champions, started together and once: each takes
    ~40 s to load on a busy machine. Stopped after the module."""
    servers = {name: serve(name, store.uri, store.tmp) for name in (MLP, MULTI_IO)}
    try:
        yield servers
    finally:
        for server in servers.values():
            stop_process_group(server.process)


@pytest.fixture(scope="module")
def served(servers: dict[str, Served]) -> dict[str, str]:
    """The URL of each champion's server, once it answers `/ping`."""
    deadline = time.monotonic() + SERVE_TIMEOUT  # started together: one deadline for both
    for server in servers.values():
        wait_until_answers(f"{server.url}/ping", server.process, max(deadline - time.monotonic(), 1.0),
                           lambda log=server.log: log.read_text()[-3000:])
    return {name: server.url for name, server in servers.items()}


def invoke(url: str, inputs) -> object:
    response = requests.post(f"{url}/invocations", json={"inputs": inputs}, timeout=120)
    assert response.ok, response.text[:2000]
    return response.json()["predictions"]


def as_float32(values) -> np.ndarray:
    """The predictions as an array, checking each JSON number is a float32 value."""
    array = np.asarray(values, dtype=np.float64)
    np.testing.assert_array_equal(array.astype(np.float32).astype(np.float64), array)
    return array.astype(np.float32)


@pytest.mark.slow
def test_mlflow_models_serve_answers_the_digits_test_split(store: Store, served: dict[str, str]) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    test = np.arange(len(digits.target)) % 5 == 0  # the digits test split by its contract
    images = np.round(digits.images[test] * 255 / 16).astype(np.uint8)[..., None]
    probabilities = as_float32(invoke(served[MLP], images.tolist()))
    assert probabilities.shape == (360, 10)
    accuracy = float(np.mean(probabilities.argmax(axis=1) == digits.target[test]))
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(store.good["test_accuracy"], abs=1e-6), "the champion is the first training"


@pytest.mark.slow
def test_mlflow_models_serve_answers_the_multi_io_test_split(store: Store, served: dict[str, str],
                                                             tfds_dir: str) -> None:
    import tensorflow_datasets as tfds

    split = tfds.builder_from_directory(f"{tfds_dir}/synthetic_multimodal/1.0.0").as_dataset(
        split="test", as_supervised=True)
    inputs, labels = next(iter(tfds.as_numpy(split.batch(10_000))))
    predictions = invoke(served[MULTI_IO], {"image": inputs["image"].tolist(), "features": inputs["features"].tolist()})
    binary, category = as_float32(predictions["binary"]), as_float32(predictions["category"])
    assert binary.shape == (1000, 1) and category.shape == (1000, 3)
    accuracies = {"binary": float(np.mean((binary[:, 0] > 0.5) == labels["binary"])),
                  "category": float(np.mean(category.argmax(axis=1) == labels["category"]))}
    for head, accuracy in accuracies.items():
        assert accuracy == pytest.approx(store.multi_io[f"test_{head}_accuracy"], abs=1e-6), head
    assert np.mean(list(accuracies.values())) >= 0.95
