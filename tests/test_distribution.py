"""tf.distribute (`distribution=mirrored|multi_worker`, pipeline/training/distribute.py) with real
TensorFlow processes: logical CPUs must be configured before TensorFlow initialises its
devices and each multi-worker task is its own process, so those runs are subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, compose_config, compose_plan, new_mlflow_store
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline.cluster import free_ports, tf_config
from pipeline.errors import ConfigError
from pipeline.train import train
from pipeline.training import cross_replica, distribute, keras_multiworker_fix

TESTS = Path(__file__).resolve().parent
# Small and exact: no Dropout (its masks differ per replica), one step per execution,
# every step's gradient norm logged, 8 train batches.
COMPARED = ["architecture.dropout=0", "trainer.epochs=2", "trainer.steps_per_execution=1", "trainer.verbose=0",
            "callbacks.grad_norm.log_every_n_steps=1", "callbacks.early_stopping=null", "debug=limit",
            "+debug.limit_batches=8", "debug.limit_fraction=null",
            "optimizer.global_clipnorm=1.0"]  # norms are ~1-1.6: clipping acts, and must see the global gradient


class SaveWeightsAtTrainEnd(keras.callbacks.Callback):
    """Test callback (selected by `_target_`): each process saves the trained weights to
    `<directory>/<task>.npz`, so the workers' copies can be compared."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = directory

    def on_train_end(self, logs=None) -> None:
        task = json.loads(os.environ.get("TF_CONFIG", '{"task": {"index": "local"}}'))["task"]["index"]
        weights = {f"w{i}": w for i, w in enumerate(self.model.model.get_weights())}
        np.savez(Path(self.directory) / f"worker-{task}.npz", **weights)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "TF_CONFIG")}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")]), **extra}


def _grad_norms(run_id: str) -> list[float]:
    history = MlflowClient().get_metric_history(run_id, "grad_norm")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def _trained_weights(run_id: str) -> list[np.ndarray]:
    path = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/keras/model.keras")
    return keras.saving.load_model(path).get_weights()


# -- config and the pieces, in this process --------------------------------------------
def test_every_option_composes_and_none_is_the_default() -> None:
    assert compose_config([]).distribution.kind == "none"
    for option in ("none", "mirrored", "multi_worker"):
        assert compose_config([f"distribution={option}"]).distribution.kind == option


@pytest.mark.parametrize(("tf_config_value", "message"), [
    (None, "distribution=multi_worker needs TF_CONFIG"),
    ("not json", "TF_CONFIG for distribution=multi_worker is invalid"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}}',
     "TF_CONFIG for distribution=multi_worker is invalid (missing key 'task')"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}',
     "task index 3 is not in cluster['worker']"),
    ('{"cluster": {"worker": ["nowhere"]}, "task": {"type": "worker", "index": 0}}', "is not host:port"),
])
def test_bad_tf_config_is_a_config_error(tf_config_value, message, monkeypatch) -> None:
    if tf_config_value is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config_value)
    with pytest.raises(ConfigError, match=None) as error:
        distribute.validate(compose_config(["distribution=multi_worker"]).distribution)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_logical_cpus_after_tensorflow_started_is_a_config_error() -> None:
    tf.constant(0)  # TensorFlow has initialised its (one) CPU device in this process
    with pytest.raises(ConfigError, match="already initialised TensorFlow with 1 CPU device"):
        distribute.strategy_for(OmegaConf.create({"kind": "mirrored", "logical_cpus": 3, "timeout_seconds": 1}))


def test_nested_layers_reach_the_layers_of_nested_models() -> None:
    # synchronize_batch_norm walks them: an ensemble's member with BatchNormalization must be reached.
    member = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization()],
                              name="member")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(member(inputs)))
    names = [layer.name for layer in distribute.nested_layers(model)]
    assert "member" in names and member.layers[1].name in names, names


def test_one_device_changes_nothing() -> None:
    strategy = distribute.strategy_for(None)
    assert distribute.num_replicas(strategy) == 1 and distribute.is_chief(strategy)
    assert distribute.steps_per_execution(16, strategy) == 16
    gradients, loss = [tf.ones([2]), None], tf.constant(3.0)
    assert cross_replica.all_reduce_gradients(gradients, loss, keras.optimizers.SGD()) == (gradients, loss)


# -- mirrored over 2 logical CPUs --------------------------------------------------------
MIRRORED = textwrap.dedent(
    """
    import json, sys
    from pipeline.plan import compose
    from pipeline.train import train
    from pipeline.training import distribute
    metrics = train(compose(sys.argv[1:]))
    # The BatchNorm conversion, on the strategy the run used.
    import keras
    from architectures import mlp_bn
    from architectures.common import InputSpec
    strategy = distribute.strategy_for(compose(sys.argv[1:]).cfg.distribution)
    with strategy.scope():
        model = mlp_bn.build(InputSpec(shape=(8, 8, 1), dtype="uint8", num_classes=10))
    changed = distribute.synchronize_batch_norm(model, strategy)
    print(json.dumps({"metrics": metrics, "replicas": strategy.num_replicas_in_sync, "synchronized": changed,
                      "all_synchronized": all(l.synchronized for l in model.layers
                                              if isinstance(l, keras.layers.BatchNormalization))}))
    """
)


@pytest.mark.slow
def test_mirrored_over_two_logical_cpus_matches_one_device(tfds_dir: str, mlflow_store: str, tmp_path: Path) -> None:
    common = [f"dataset.data_dir={tfds_dir}", *COMPARED]
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED, *common, "distribution=mirrored", "distribution.logical_cpus=2",
         "mlflow.run_name=mirrored"],
        cwd=tmp_path, env=_env(MLFLOW_TRACKING_URI=mlflow_store), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    mirrored = json.loads(result.stdout.strip().splitlines()[-1])
    assert mirrored["replicas"] == 2
    assert mirrored["synchronized"] and mirrored["all_synchronized"]
    single = train(compose_plan([*common, "mlflow.run_name=single"]))

    client = MlflowClient()
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("digits").experiment_id])}
    assert runs["mirrored"].data.params["distribution.kind"] == "mirrored"
    # The gradient norm is the global one (all-reduced), step by step, not a replica's.
    norms_mirrored, norms_single = _grad_norms(runs["mirrored"].info.run_id), _grad_norms(runs["single"].info.run_id)
    assert len(norms_mirrored) == len(norms_single) == 16
    np.testing.assert_allclose(norms_mirrored, norms_single, rtol=1e-5)
    for key in ("train_loss", "val_loss", "test_loss", "train_grad_norm_max", "train_grad_norm_mean"):
        assert mirrored["metrics"][key] == pytest.approx(single[key], rel=1e-5), key
    # The same updates: one all-reduce, no double aggregation.
    for a, b in zip(_trained_weights(runs["mirrored"].info.run_id), _trained_weights(runs["single"].info.run_id)):
        np.testing.assert_allclose(a, b, atol=1e-5)


# -- multi_worker: two processes on 127.0.0.1 ---------------------------------------------
@pytest.mark.slow
def test_two_workers_make_one_run_with_identical_weights(tfds_dir: str, tmp_path: Path, empty_mlflow_db: Path) -> None:
    store = new_mlflow_store(tmp_path, empty_mlflow_db)
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cluster", "--workers", "2", "--", f"dataset.data_dir={tfds_dir}",
         "trainer.epochs=2", "debug=limit", "+debug.limit_batches=8", "debug.limit_fraction=null",
         "mlflow.log_model=true", "callbacks.early_stopping=null", "distribution.timeout_seconds=120",
         f"+callbacks.weights={{_target_: test_distribution.SaveWeightsAtTrainEnd, directory: '{weights_dir}'}}"],
        cwd=tmp_path, env=_env(MLFLOW_TRACKING_URI=store), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "[worker 0]" in result.stdout and "[worker 1]" in result.stdout

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["distribution.kind"] == "multi_worker"
    (version,) = client.search_model_versions("name = 'digits-mlp'")
    assert version.run_id == run.info.run_id
    chief, worker = np.load(weights_dir / "worker-0.npz"), np.load(weights_dir / "worker-1.npz")
    assert sorted(chief.files) == sorted(worker.files) and chief.files
    for name in chief.files:
        np.testing.assert_array_equal(chief[name], worker[name])
    # The chief keeps checkpoints; the other worker wrote its own to a scratch directory, then removed it.
    checkpoints = Path(run.data.tags["checkpoint_dir"])
    assert tf.train.get_checkpoint_state(str(checkpoints)).all_model_checkpoint_paths
    assert not [p for p in tmp_path.rglob("*-tmp") if "checkpoints" in p.name]


def _start_worker(index: int, addresses: list[str], cwd: Path, store: str, *args: str) -> subprocess.Popen:
    log = (cwd / f"worker-{index}.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "distribution=multi_worker", f"hydra.run.dir=worker-{index}", *args],
        cwd=cwd, env=_env(MLFLOW_TRACKING_URI=store, TF_CONFIG=tf_config(addresses, index)),
        stdout=log, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_killed_worker_ends_the_other_with_one_clear_line_and_the_run_resumes(tfds_dir: str, tmp_path: Path,
                                                                              empty_mlflow_db: Path) -> None:
    store = new_mlflow_store(tmp_path, empty_mlflow_db)
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    args = [f"dataset.data_dir={tfds_dir}", "trainer.epochs=3", "distribution.timeout_seconds=20",
            "callbacks.early_stopping=null"]
    workers = [_start_worker(i, addresses, tmp_path, store, *args) for i in range(2)]
    try:
        deadline = time.monotonic() + 400
        while "Epoch 2/" not in (tmp_path / "worker-1.log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "worker-1.log").read_text()[-3000:]
            assert workers[1].poll() is None, (tmp_path / "worker-1.log").read_text()[-3000:]
            time.sleep(0.5)
        workers[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        code = workers[0].wait(timeout=20 + 120)  # the timeout, plus the error's way out
        ended_after = time.monotonic() - killed_at
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    output = (tmp_path / "worker-0.log").read_text()
    assert code == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: multi-worker training stopped on worker-0: a worker died, is unreachable"), last
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert f"resume={run.info.run_id} distribution=multi_worker" in last
    assert run.info.status == "FAILED" and "multi-worker training stopped" in run.data.tags["failure_reason"]
    print(f"worker 0 ended {ended_after:.1f} s after worker 1 was killed")

    # Resumable from the chief's last checkpoint (here on one device: how to run is this invocation's choice).
    resumed = subprocess.run([sys.executable, "-m", "pipeline.train", f"resume={run.info.run_id}", "hydra.run.dir=r"],
                             cwd=tmp_path, env=_env(MLFLOW_TRACKING_URI=store), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0, 1, 2]


@pytest.mark.slow
def test_worker_that_never_arrives_ends_the_other_at_the_timeout(tfds_dir: str, tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    started = time.monotonic()
    alone = _start_worker(0, addresses, tmp_path, store, f"dataset.data_dir={tfds_dir}",
                          "distribution.timeout_seconds=15")
    try:
        alone.wait(timeout=15 + 120)  # the timeout, plus TensorFlow's start-up on a busy machine
    finally:
        if alone.poll() is None:
            alone.kill()
            alone.wait()
    output = (tmp_path / "worker-0.log").read_text()
    assert alone.returncode != 0
    assert f"error: distribution=multi_worker: the cluster ({', '.join(addresses)}) did not come together within " \
           "distribution.timeout_seconds=15" in output, output[-3000:]
    assert "Traceback" not in output
    assert not (tmp_path / "mlflow.db").exists() or not MlflowClient(store).search_runs(["0"])
    print(f"the lone worker ended after {time.monotonic() - started:.1f} s")


# -- keras#20585 canary --------------------------------------------------------------------
STOCK_KERAS_MULTI_WORKER = textwrap.dedent(
    """
    import numpy as np, tensorflow as tf, keras
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=60))
    x = np.random.RandomState(0).rand(64, 4).astype("float32")
    y = (x.sum(1) > 2).astype("int64")
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
        model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    try:
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=1, verbose=0)
        print("STOCK KERAS FIT OK")
    except Exception as error:
        print("STOCK KERAS FIT FAILED:", " ".join(str(error).split())[:200])
    """
)


@pytest.mark.slow
def test_stock_keras_still_fails_multi_worker(tmp_path: Path) -> None:
    """Fails once Keras fixes keras#20585: then delete pipeline/training/keras_multiworker_fix.py."""
    assert keras_multiworker_fix.needed(), f"keras {keras.__version__} is newer than the fix was checked for"
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    workers = [subprocess.Popen([sys.executable, "-c", STOCK_KERAS_MULTI_WORKER], cwd=tmp_path,
                                env=_env(TF_CONFIG=tf_config(addresses, i)), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=300)[0])
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for output in outputs:
        assert "STOCK KERAS FIT OK" not in output, (
            f"keras {keras.__version__} fits under MultiWorkerMirroredStrategy: keras#20585 is fixed, delete "
            "pipeline/training/keras_multiworker_fix.py and its use in pipeline/training/multi_worker.py")
        assert "STOCK KERAS FIT FAILED: Attempt to convert a value (PerReplica" in output, output[-3000:]


def test_fix_is_gated_on_the_keras_version() -> None:
    assert keras_multiworker_fix.needed("3.15.1") and keras_multiworker_fix.needed("3.8.0")
    assert not keras_multiworker_fix.needed("3.16.0") and not keras_multiworker_fix.needed("4.0.0")
