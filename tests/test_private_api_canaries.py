"""Canaries for the private APIs of TensorFlow, Keras, TFDS, Optuna, MLflow and Hydra that
the code reads or calls where no public API does the job (issue 33).

Each canary checks the behaviour the code relies on, with the library's real objects,
and fails with one message naming the library's installed version, what changed, the
file to revisit and the version it was written against, instead of letting the next
release break a run in the middle. The Keras internals the code copies are hashed in
tests/test_keras_canary.py. docs/upgrading.md lists both in one table
(`test_every_private_use_is_in_the_upgrading_guide`).
"""

from __future__ import annotations

import inspect
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import REPO


@dataclass(frozen=True)
class Private:
    """A private API the code uses."""

    used: str  # what is used, as the code spells it
    library: str  # its distribution, whose installed version the message names
    checked: str  # the version the code was written against
    where: str  # the file to revisit
    why: str  # why no public API does it


CANARIES: dict[str, tuple[Private, Callable[[], None]]] = {}


def canary(private: Private) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(check: Callable[[], None]) -> Callable[[], None]:
        CANARIES[check.__name__] = (private, check)
        return check
    return register


# -- TensorFlow ---------------------------------------------------------------------------

@canary(Private(
    "`tensorflow.python.eager.context`: `context().configure_coordination_service`, `.coordination_service`; "
    "`tensorflow.compiler.xla.tsl.protobuf.coordination_config_pb2.CoordinatedJob`",
    "tensorflow", "2.21.0", "pipeline/training/multi_worker.py",
    "MultiWorkerMirroredStrategy sets up the coordination service with no timeouts; configuring it first is "
    "the only way to bound a lost worker's wait"))
def coordination_service() -> None:
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context

    parameters = inspect.signature(context.context().configure_coordination_service).parameters
    used = {"service_type", "service_leader", "cluster_register_timeout_in_ms", "heartbeat_timeout_in_ms",
            "shutdown_barrier_timeout_in_ms", "coordinated_jobs"}
    assert used <= set(parameters), f"configure_coordination_service lacks {sorted(used - set(parameters))}"
    assert hasattr(context.context(), "coordination_service")
    job = coordination_config_pb2.CoordinatedJob(name="worker", num_tasks=2)
    assert (job.name, job.num_tasks) == ("worker", 2)


@canary(Private(
    "`tensorflow.tsl.profiler.protobuf.xplane_pb2`", "tensorflow", "2.21.0", "pipeline/training/top_ops.py",
    "the profiler's trace files are XSpace protos; TensorFlow ships their Python classes only here"))
def xplane_proto() -> None:
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    fields = {message: set(getattr(xplane_pb2, message).DESCRIPTOR.fields_by_name)
              for message in ("XSpace", "XPlane", "XLine", "XEvent")}
    assert "planes" in fields["XSpace"] and {"name", "lines", "event_metadata"} <= fields["XPlane"], fields
    assert "events" in fields["XLine"] and {"metadata_id", "offset_ps", "duration_ps"} <= fields["XEvent"], fields


# -- Keras --------------------------------------------------------------------------------

@canary(Private(
    "`Sequential._functional`, `Functional._nodes_by_depth`, `Layer._inbound_nodes`", "keras", "3.15.1",
    "pipeline/figures/activations.py",
    "Keras keeps where a graph calls a layer only in these; `pipeline.inspect` reads a nested layer's output "
    "where the outer graph uses it"))
def layer_graph_nodes() -> None:
    import keras

    dense = keras.layers.Dense(2)
    model = keras.Sequential([keras.Input((3,)), dense])
    graph = model._functional
    nodes = {id(node) for nodes in graph._nodes_by_depth.values() for node in nodes}
    assert [node for node in dense._inbound_nodes if id(node) in nodes], "the layer's call is not in the graph"


@canary(Private(
    "`Optimizer._learning_rate`", "keras", "3.15.1", "pipeline/figures/learning_rates.py",
    "`optimizer.learning_rate` evaluates a schedule at the current step; the schedule itself, to plot it, "
    "is kept only here"))
def optimizer_schedule() -> None:
    import keras

    schedule = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=10)
    assert keras.optimizers.Adam(learning_rate=schedule)._learning_rate is schedule


# -- TFDS ---------------------------------------------------------------------------------

@canary(Private(
    "`DatasetBuilder._log_download_bytes`, `_log_download_done`, `_download_and_prepare`; "
    "`tqdm_utils._active`", "tensorflow-datasets", "4.9.10", "pipeline/datasets/offline.py",
    "TFDS narrates every preparation as a download and has no switch for it; the offline builders override "
    "its hooks, and read the progress bars' state, which `tfds.display_progress_bar` only sets"))
def tfds_download_hooks() -> None:
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import tqdm_utils

    source = inspect.getsource(tfds.core.DatasetBuilder.download_and_prepare)
    for hook in ("self._log_download_bytes()", "self._download_and_prepare(", "self._log_download_done()"):
        assert hook in source, f"download_and_prepare no longer calls {hook}"
    assert callable(tfds.core.GeneratorBasedBuilder._download_and_prepare)
    showing = tqdm_utils._active
    try:
        tfds.display_progress_bar(not showing)
        assert tqdm_utils._active is (not showing), "display_progress_bar does not set _active"
    finally:
        tfds.display_progress_bar(showing)


# -- Optuna -------------------------------------------------------------------------------

@canary(Private(
    "`optuna.storages._heartbeat`: `is_heartbeat_enabled`, `get_heartbeat_thread`; `Study._storage`, "
    "`Trial._trial_id`", "optuna", "5.1.0", "hydra_plugins/pipeline_optuna_sweeper/optuna_sweeper.py",
    "the sweeper beats for trials that run in other processes (joblib, submitit, Ray), so it drives Optuna's "
    "heartbeat thread itself, for the trial's id in the study's storage"))
def optuna_heartbeat() -> None:
    import optuna
    from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled

    study = optuna.create_study()
    trial = study.ask()
    storage, trial_id = study._storage, trial._trial_id
    assert storage.get_trial(trial_id).number == trial.number
    assert is_heartbeat_enabled(storage) is False  # in memory: no heartbeats
    thread = get_heartbeat_thread(trial_id, storage)
    thread.start()
    thread.join()


@canary(Private(
    "`optuna.storages._heartbeat.BaseHeartbeat` (implemented), `FrozenTrial._trial_id`", "optuna", "5.1.0",
    "pipeline/tracking/optuna_journal.py",
    "Optuna fails a dead process's trials only on storages that implement this base; the journal storage "
    "gets heartbeats by implementing it"))
def optuna_heartbeat_base() -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
    from optuna.storages.journal import JournalFileBackend

    from pipeline.tracking.optuna_journal import HeartbeatJournalStorage

    implemented = {"record_heartbeat", "_get_stale_trial_ids", "get_heartbeat_interval",
                   "get_heartbeat_stale_trial_callback"}
    assert BaseHeartbeat.__abstractmethods__ == implemented, sorted(BaseHeartbeat.__abstractmethods__)
    with tempfile.TemporaryDirectory() as directory:
        storage = HeartbeatJournalStorage(JournalFileBackend(str(Path(directory) / "journal.log")), 60, 120)
        assert isinstance(storage, JournalStorage) and is_heartbeat_enabled(storage)
        study = optuna.create_study(storage=storage)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Heartbeat of storage is supposed to be used with Study.optimize"
            trial = study.ask()
        frozen = storage.get_all_trials(storage.get_study_id_from_name(study.study_name))[0]
        assert frozen._trial_id == trial._trial_id


# -- MLflow -------------------------------------------------------------------------------

@canary(Private(
    "`mlflow.data.Dataset._to_mlflow_entity`", "mlflow", "3.17.2", "pipeline/tracking/provenance.py",
    "one `MlflowClient.log_inputs` call links every split with its own tags; the entity it takes is made "
    "only by this method"))
def dataset_entity() -> None:
    from mlflow.entities import Dataset as DatasetEntity

    from pipeline.tracking.provenance import SplitDataset, TFDSSource

    entity = SplitDataset(TFDSSource("digits", "1.0.0", "/data"), "digits", "1.0.0", "train", 10)._to_mlflow_entity()
    assert isinstance(entity, DatasetEntity) and entity.name == "digits:1.0.0" and entity.digest


@canary(Private(
    "`keras.random.SeedGenerator` subclassed without its `__init__`: Keras's random ops draw a seed with `next()`",
    "keras", "3.15.1", "pipeline/augment.py",
    "`augment=custom` runs Keras preprocessing layers in tf.data with a seed fixed by (seed, epoch, batch); their "
    "public `seed` takes a Python int or a stateful SeedGenerator, whose variable cannot be made per batch"))
def batch_seed() -> None:
    import keras
    import numpy as np
    import tensorflow as tf

    from pipeline.augment import BatchSeed

    draws = [keras.random.uniform((4,), seed=BatchSeed(tf.constant([5, 9]))) for _ in range(2)]
    np.testing.assert_array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], keras.random.uniform((4,), seed=BatchSeed(tf.constant([5, 10]))))
    layer = keras.layers.RandomRotation(0.2)
    images = tf.random.stateless_uniform((2, 16, 16, 3), (1, 2), maxval=255.0)
    rotated = [layer.transform_images(images, layer.get_random_transformation(
        images, training=True, seed=BatchSeed(tf.constant([1, 2])))) for _ in range(2)]
    np.testing.assert_array_equal(rotated[0], rotated[1])


@canary(Private(
    "`mlflow.utils.validation._validate_model_name` (mirrored)", "mlflow", "3.17.2", "pipeline/config.py",
    "the config check refuses a registered model name before training, without importing MLflow (about a "
    "second of start-up); `model_name_problem` mirrors MLflow's rules, which must still be the registry's"))
def registered_model_name_rules() -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    from pipeline.config import model_name_problem

    for name in ["digits-mlp", "my model v2", "a.b", "..", ".", "../../evil", "a/b", "a:b", "..hidden", "/abs",
                 "", "  ", "ok..name", "x/.", "name.", "résumé"]:
        try:
            _validate_model_name(name)
            refused = False
        except MlflowException:
            refused = True
        assert refused == (model_name_problem(name) is not None), f"MLflow {'refuses' if refused else 'takes'} {name!r}"


# -- Hydra --------------------------------------------------------------------------------

@canary(Private(
    "`JobReturn._return_value`", "hydra-core", "1.3.8", "pipeline/tracking/sweep_job.py",
    "a failed job's exception is kept only there: the public `return_value` raises it"))
def job_return_value() -> None:
    from hydra.core.utils import JobReturn, JobStatus

    error = ValueError("bad")
    job_return = JobReturn(overrides=[])
    job_return.return_value, job_return.status = error, JobStatus.FAILED  # as hydra.core.utils.run_job does
    assert job_return._return_value is error
    with pytest.raises(ValueError):
        job_return.return_value  # noqa: B018  (the public property re-raises: why the code reads the field)


# -- the canaries, run; and listed -------------------------------------------------------

@pytest.mark.parametrize("name", list(CANARIES))
def test_private_api_still_behaves_as_used(name: str) -> None:
    private, check = CANARIES[name]
    try:
        check()
    except Exception as error:  # an assertion, or the API gone (ImportError, AttributeError, TypeError)
        pytest.fail(f"{private.library} {version(private.library)}: {private.used} no longer behaves as "
                    f"{private.where} uses it ({type(error).__name__}: {first_line(error)}). Revisit {private.where}, "
                    f"written against {private.library} {private.checked}: {private.why}", pytrace=False)


def first_line(error: Exception) -> str:
    """The error's own message, without pytest's rewritten-assert detail."""
    return (str(error).strip().splitlines() or [""])[0]


def test_every_private_use_is_in_the_upgrading_guide() -> None:
    rows = [line for line in (REPO / "docs" / "upgrading.md").read_text().splitlines()
            if line.startswith("|") and "test_private_api_canaries.py" in line]
    missing = [f"{p.used} ({p.where})" for p, _ in CANARIES.values()
               if not any(p.where in row and re.search(r"`([^`]+)`", p.used).group(1) in row for row in rows)]
    assert not missing, "docs/upgrading.md's table has no row for:\n" + "\n".join(missing)
