"""tf.distribute for one job: the `distribution` config group.

    python -m pipeline.train distribution=mirrored distribution.logical_cpus=2
    python -m pipeline.cluster --workers 2 -- architecture=mlp     # multi_worker, locally

- `none`: the default strategy, one device; nothing here changes a run.
- `mirrored`: `tf.distribute.MirroredStrategy` over every local GPU; on a machine with
  none, `logical_cpus=N` splits the CPU into N logical devices so the path runs anywhere.
- `multi_worker`: `tf.distribute.MultiWorkerMirroredStrategy` configured by `TF_CONFIG`,
  with every wait bounded by `timeout_seconds` (cluster start-up, each collective, a
  lost peer's heartbeat), so a worker that never arrives or dies ends the others.

The multi-worker strategy's bounded start-up is `pipeline.training.multi_worker`'s; the train
step (`pipeline.training.guarded`) synchronizes its replicas with `pipeline.training.cross_replica`. Only
the chief logs to MLflow and exports; the other workers write their checkpoints to a
temporary directory they delete.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError, PipelineError, one_line
from pipeline.training import multi_worker

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import keras
    import tensorflow as tf

log = logging.getLogger(__name__)

KINDS = ("none", "mirrored", "multi_worker")


# -- validation: pure Python, before TensorFlow starts --------------------------------
def validate(cfg: Any) -> None:
    """Check the `distribution` group (None: absent, e.g. a run recorded before it existed)."""
    if cfg is None:
        return
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"distribution.kind must be one of {KINDS}. Received: {kind!r}")
    logical_cpus = cfg.get("logical_cpus")
    if logical_cpus is not None and not (isinstance(logical_cpus, int) and logical_cpus >= 1):
        raise ConfigError(f"distribution.logical_cpus must be >= 1 or null. Received: {logical_cpus!r}")
    if logical_cpus is not None and kind != "mirrored":
        raise ConfigError(f"distribution.logical_cpus only applies to distribution=mirrored. "
                          f"Received: logical_cpus={logical_cpus} with distribution={kind}")
    timeout = cfg.get("timeout_seconds")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ConfigError(f"distribution.timeout_seconds must be > 0. Received: {timeout!r}")
    if kind == "multi_worker":
        cluster_spec()


def cluster_spec() -> dict:
    """`TF_CONFIG`, parsed and checked: {"cluster": {...}, "task": {"type", "index"}}."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ConfigError("distribution=multi_worker needs TF_CONFIG (the cluster and this task), e.g. "
                          "'{\"cluster\": {\"worker\": [\"host1:2222\", \"host2:2222\"]}, \"task\": "
                          "{\"type\": \"worker\", \"index\": 0}}'; or start local workers with "
                          "python -m pipeline.cluster --workers 2. Received: TF_CONFIG unset")
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        task_type, index = task["type"], int(task["index"])
        addresses = cluster[task_type]
        if not isinstance(addresses, list) or not 0 <= index < len(addresses):
            raise ValueError(f"task index {index} is not in cluster[{task_type!r}] ({addresses})")
        for job in cluster.values():
            for address in job:
                host, _, port = str(address).rpartition(":")
                if not host or not port.isdigit():
                    raise ValueError(f"address {address!r} is not host:port")
    except (ValueError, KeyError, TypeError) as error:
        reason = f"missing key {error}" if isinstance(error, KeyError) else str(error)
        raise ConfigError(f"TF_CONFIG for distribution=multi_worker is invalid ({reason}). "
                          f"Received: {one_line(raw)}") from None
    return config


def role(cfg: Any) -> tuple[str, bool]:
    """(task, is_chief) of this process, from `TF_CONFIG`, before TensorFlow starts.

    `("local", True)` unless `cfg` (the `distribution` group) is `multi_worker`; then
    the task is e.g. `worker-1`, and the chief is task `chief` if the cluster has one,
    else worker 0 (TensorFlow's convention). Only the chief records the run.
    """
    if cfg is None or cfg.get("kind") != "multi_worker":
        return "local", True
    config = cluster_spec()
    task_type, index = config["task"]["type"], int(config["task"]["index"])
    is_chief = task_type == "chief" or (task_type == "worker" and index == 0 and "chief" not in config["cluster"])
    return f"{task_type}-{index}", is_chief


# -- the strategy ----------------------------------------------------------------------
_strategies: dict[tuple, Any] = {}


def strategy_for(cfg: Any) -> tf.distribute.Strategy:
    """The strategy `cfg` (the `distribution` group, or None) asks for.

    Call it before TensorFlow creates any tensor or variable: logical CPUs and
    multi-worker collectives can only be configured before TensorFlow initialises its
    devices. A process keeps one strategy per configuration (a sweep reuses it).
    """
    import tensorflow as tf

    validate(cfg)
    kind = "none" if cfg is None else cfg.kind
    key = (kind, None if cfg is None else cfg.get("logical_cpus"))
    if key in _strategies:
        return _strategies[key]
    if kind != "none":  # tf.distribute narrates every all-reduce it builds at INFO
        logging.getLogger("tensorflow").setLevel(logging.WARNING)
    if kind == "none":
        strategy = tf.distribute.get_strategy()
    elif kind == "mirrored":
        strategy = tf.distribute.MirroredStrategy(devices=_mirrored_devices(cfg.get("logical_cpus")))
    else:
        strategy = multi_worker.strategy(cluster_spec(), float(cfg.timeout_seconds))
    if kind != "none":
        log.info("distribution: %s, %d replica(s) on %s", kind, strategy.num_replicas_in_sync,
                 ", ".join(strategy.extended.worker_devices))
    _strategies[key] = strategy
    return strategy


def _mirrored_devices(logical_cpus: int | None) -> list[str] | None:
    """Every local GPU; without GPUs, `logical_cpus` logical CPU devices (or the one CPU)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if logical_cpus is not None:
            raise ConfigError(f"distribution.logical_cpus is for machines without GPUs; this one has {len(gpus)}: "
                              f"leave it null to mirror over them. Received: {logical_cpus}")
        return None  # MirroredStrategy's own choice: all GPUs
    if logical_cpus is None:
        return ["/cpu:0"]
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration() for _ in range(logical_cpus)]
    try:
        if len(tf.config.get_logical_device_configuration(cpu) or [None]) != logical_cpus:
            tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError:  # TensorFlow has already initialised its devices in this process
        have = len(tf.config.list_logical_devices("CPU"))
        if have != logical_cpus:
            raise ConfigError(f"distribution.logical_cpus={logical_cpus}: this process already initialised "
                              f"TensorFlow with {have} CPU device(s); set it in a new process. "
                              f"Received: {logical_cpus}") from None
    return [f"/cpu:{i}" for i in range(logical_cpus)]


def explained(error: BaseException, strategy: tf.distribute.Strategy,
              run_id: Callable[[], str] | None = None) -> BaseException:
    """`error`, or, if it is a multi-worker peer failure (a worker died, is unreachable or
    did not answer within `distribution.timeout_seconds`), a one-line `PipelineError`
    saying so and how to resume. Use as `raise distribute.explained(error, strategy)`.
    `run_id` gives the chief's run id (by default, MLflow's active run)."""
    import tensorflow as tf

    peer_errors = (tf.errors.UnavailableError, tf.errors.CancelledError, tf.errors.AbortedError,
                   tf.errors.DeadlineExceededError, tf.errors.InternalError, tf.errors.FailedPreconditionError)
    if not (is_multi_worker(strategy) and isinstance(error, peer_errors)):
        return error
    multi_worker.exit_if_stuck()
    lines = [line.strip() for line in str(getattr(error, "message", error)).splitlines() if line.strip()]
    reason = next((line for line in lines if "abort" in line.lower() or "connect" in line.lower()), lines[0] if lines
                  else type(error).__name__)
    chief_run = ((run_id or _active_run_id)() if is_chief(strategy) else None) or "<the chief's run id>"
    return PipelineError(
        f"multi-worker training stopped on {task_name(strategy)}: a worker died, is unreachable or did not answer "
        f"within distribution.timeout_seconds={multi_worker.configured_timeout():g} "
        f"({type(error).__name__}: {reason[:300]}). "
        f"Resume from the last checkpoint on every worker with: python -m pipeline.train resume={chief_run} "
        "distribution=multi_worker")


def _active_run_id() -> str | None:
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


def num_replicas(strategy: tf.distribute.Strategy) -> int:
    return int(strategy.num_replicas_in_sync)


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """A MultiWorkerMirroredStrategy over more than one worker (chief and worker tasks,
    as TensorFlow counts them); without a cluster in TF_CONFIG it runs as one worker."""
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return len(cluster.get("chief", [])) + len(cluster.get("worker", [])) > 1


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True unless this is a non-chief worker of a multi-worker cluster: the chief is
    task `chief` if the cluster has one, else worker 0 (TensorFlow's convention)."""
    if not is_multi_worker(strategy):
        return True
    return bool(strategy.extended.should_checkpoint)


def task_name(strategy: tf.distribute.Strategy) -> str:
    """`worker-1`, or `chief` / `local` for the process that records the run."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not is_multi_worker(strategy) or resolver is None:
        return "local"
    return f"{resolver.task_type}-{resolver.task_id}"


# -- data ------------------------------------------------------------------------------
def shard_by_data(splits, strategy: tf.distribute.Strategy):
    """Auto-shard every split by DATA: each global batch is split between the workers
    (the datasets are generated, not files, so FILE sharding has nothing to shard)."""
    if num_replicas(strategy) == 1:
        return splits
    import dataclasses

    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA

    def sharded(dataset):
        return None if dataset is None else dataset.with_options(options)

    return dataclasses.replace(splits, train=sharded(splits.train), val=sharded(splits.val),
                               test=sharded(splits.test))


def steps_per_execution(configured: int, strategy: tf.distribute.Strategy) -> int:
    """`trainer.steps_per_execution`, or 1 with more than one replica: Keras 3.15 runs
    several steps per call in a `tf.while_loop`, and a cross-replica synchronization
    (every optimizer update is one) inside TensorFlow control flow builds a graph that
    fails at run time (`You must feed a value for placeholder tensor 'while/cond/...'`,
    keras-team/keras#19246; stock Keras `fit` fails the same way)."""
    if configured > 1 and num_replicas(strategy) > 1:
        log.warning("trainer.steps_per_execution=%d runs as 1 under %d replicas (keras-team/keras#19246)",
                    configured, num_replicas(strategy))
        return 1
    return configured


# -- the model -------------------------------------------------------------------------
def nested_layers(model: keras.Model) -> Iterator[keras.Layer]:
    """Every layer of `model`, and of the models nested in it (an ensemble's members),
    depth first, through the public `Model.layers`. A layer built inside a custom layer
    (not a model) is not listed: none of `architectures/` has a BatchNormalization there."""
    import keras

    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from nested_layers(layer)


def synchronize_batch_norm(model: keras.Model, strategy: tf.distribute.Strategy) -> list[str]:
    """With more than one replica, make every BatchNormalization layer compute its batch
    statistics over the global batch (`synchronized=True`): per-replica statistics make
    the moving averages drift between replicas. Returns the layers changed."""
    import keras

    if num_replicas(strategy) == 1:
        return []
    changed = []
    for layer in nested_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and not layer.synchronized:
            layer.synchronized = True  # read at call time, so before the first trace is enough
            changed.append(layer.path if hasattr(layer, "path") else layer.name)
    if changed:
        log.info("BatchNormalization synchronized across %d replicas: %s", num_replicas(strategy), changed)
    return changed
