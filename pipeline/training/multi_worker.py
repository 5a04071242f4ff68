"""Bring up `tf.distribute.MultiWorkerMirroredStrategy` with no unbounded wait, and end a
process that a failed peer leaves stuck (`distribution=multi_worker`; chosen by
`pipeline.training.distribute.strategy_for`).

TensorFlow's own set-up waits forever for a worker that never arrives, and after a
peer fails its gRPC server can keep the interpreter from exiting. Here every wait is
bounded by `distribution.timeout_seconds`: the coordination service's registration,
heartbeat and shutdown barrier, and each collective; the start-up barrier, which
honours none of them and holds the GIL, by a watchdog process; and the exit after a
failure by `exit_if_stuck`.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError, PipelineError

if TYPE_CHECKING:
    import tensorflow as tf

_timeout_seconds = 0.0  # of the multi-worker strategy, for error messages


def strategy(config: dict, timeout_seconds: float) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy from TF_CONFIG (`config`, as
    `pipeline.training.distribute.cluster_spec` parsed and checked it), with no unbounded wait."""
    import tensorflow as tf
    from tensorflow.python.eager import context  # no public API configures the coordination service

    from pipeline.training import keras_multiworker_fix

    global _timeout_seconds
    keras_multiworker_fix.apply()
    _timeout_seconds = timeout_seconds
    milliseconds = int(timeout_seconds * 1000)
    if context.context().coordination_service is None:
        # The coordination service (what MultiWorkerMirroredStrategy sets up itself, with
        # no timeouts): a worker that never registers, or stops sending heartbeats, fails
        # the others after `timeout_seconds` instead of never.
        cluster = tf.train.ClusterSpec(config["cluster"])
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2

        context.context().configure_coordination_service(
            service_type="standalone",
            # The chief, else worker 0: TensorFlow's choice (multi_worker_util.coordination_leader)
            # for a cluster without parameter servers.
            service_leader=f"/job:{'chief' if 'chief' in cluster.jobs else 'worker'}/replica:0/task:0",
            cluster_register_timeout_in_ms=milliseconds,
            heartbeat_timeout_in_ms=milliseconds,
            shutdown_barrier_timeout_in_ms=milliseconds,
            coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name=job, num_tasks=cluster.num_tasks(job))
                              for job in ("chief", "worker") if job in cluster.jobs],
        )
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_seconds)
    addresses = ", ".join(a for job in config["cluster"].values() for a in job)
    # TensorFlow's start-up barrier (`context.ensure_initialized`) does not honour the
    # timeouts above when a worker never arrives, and it holds the GIL, so no Python
    # thread or signal handler can act: a separate watchdog process says so and ends this
    # one past the timeout. No MLflow run is open yet, so nothing is left behind.
    watchdog = _watchdog(timeout_seconds, f"error: distribution=multi_worker: the cluster ({addresses}) did not "
                         f"come together within distribution.timeout_seconds={timeout_seconds:g}: is every worker "
                         "started, with the same TF_CONFIG cluster and its own task index?")
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except RuntimeError as error:
        if "initialized" in str(error) or "startup" in str(error):
            raise ConfigError("distribution=multi_worker must be set up before TensorFlow starts: run it in a "
                              "new process (python -m pipeline.train distribution=multi_worker)") from None
        raise
    except tf.errors.OpError as error:  # a worker never arrived, or the cluster spec points nowhere
        exit_if_stuck()
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PipelineError(f"distribution=multi_worker: the cluster ({addresses}) did not come together within "
                            f"distribution.timeout_seconds={timeout_seconds:g}: {first[:300]}") from None
    finally:
        watchdog.kill()
        watchdog.wait()


def _watchdog(seconds: float, message: str):
    """A process that, unless killed first, prints `message` to stderr and SIGKILLs
    this process after `seconds`."""
    import subprocess

    script = ("import os, signal, sys, time; time.sleep(float(sys.argv[1])); "
              "print(sys.argv[2], file=sys.stderr, flush=True); os.kill(int(sys.argv[3]), signal.SIGKILL)")
    return subprocess.Popen([sys.executable, "-c", script, str(seconds), message, str(os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def exit_if_stuck(exit_code: int = 1) -> None:
    """After a peer failure, TensorFlow's gRPC server can keep the interpreter from
    exiting ("Servers don't support clean shutdown"): end the process anyway once the
    error has had `timeout_seconds` (at least 30 s) to be reported and the run closed."""
    import threading

    timer = threading.Timer(max(30.0, _timeout_seconds), os._exit, args=(exit_code,))
    timer.daemon = True
    timer.start()


def configured_timeout() -> float:
    """`distribution.timeout_seconds` of the multi-worker strategy this process started
    (0 before it started one), for error messages."""
    return _timeout_seconds
