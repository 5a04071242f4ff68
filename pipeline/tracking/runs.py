"""A training run in MLflow: the connection to the store, the run's names, the one place
a run is opened and closed (`start_run`), and what a run records before it trains
(config, dataset sizes, model summary). Imported through the package:
`from pipeline import tracking; tracking.start_run(...)`.

The tracking URI is `mlflow.tracking_uri` if set, else `$MLFLOW_TRACKING_URI`, else a
sqlite store `mlflow.db` in the launch directory (MLflow's own default, no server
needed; artifacts go to `./mlruns`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from pipeline.errors import PipelineError, TrainingInterrupted, one_line
from pipeline.redact import redact, redact_command, redact_config
from pipeline.store_uri import require_server, tracking_uri_exporting_credentials

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

# MLflow refuses longer parameter values.
MAX_PARAM_LENGTH = 6000


def connect(cfg: DictConfig) -> str:
    """Point MLflow at the configured store (`cfg` is the `mlflow` group) and return the
    experiment id, creating the experiment if needed.

    A tracking server that does not answer fails in seconds (`store_uri.require_server`,
    which `train` also calls before any training). A sqlite store is created (or its
    schema upgraded) under an inter-process lock: two runs started at once on a new
    directory would otherwise both create the tables, and one would fail.
    """
    uri = tracking_uri_exporting_credentials(cfg.tracking_uri)
    require_server(uri)
    mlflow.set_tracking_uri(uri)
    try:
        with _store_lock(uri):
            return mlflow.set_experiment(cfg.experiment_name).experiment_id
    except Exception as error:  # bad path, unwritable directory, corrupt database, ...
        raise PipelineError(f"mlflow.tracking_uri: cannot open the MLflow store at {redact(uri)}: "
                            f"{redact(one_line(error))}") from None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on `<database>.lock` beside a sqlite store's file while the
    block runs (MLflow creates or upgrades its schema on the first use in a process);
    other stores need none."""
    path = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    if path is None or path == ":memory:":
        yield
        return
    import fcntl

    with open(f"{path}.lock", "a") as lock:  # a missing directory fails here, as MLflow would
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"optimizer": {"lr": 0.001}} -> {"optimizer.lr": "0.001"}; lists stay whole."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


@dataclass(frozen=True)
class RunNames:
    """How a training run and its registered model are named and tagged."""

    run: str
    model: str
    tags: dict[str, str]

    @classmethod
    def from_config(cls, cfg: DictConfig, choices: Mapping[str, str], precision: str) -> RunNames:
        """`precision` is the resolved dtype policy (e.g. mixed_bfloat16 for "mixed").

        The default run name is `{architecture}-{dataset}-{precision}-{6 hex digits}`
        (e.g. `mlp-digits-float32-3fa91c`): what ran, at a glance, and distinct between
        the runs of a sweep. The run's description (`mlflow.note.content`) says what was
        trained on what, with which optimizer, rate and epochs.
        """
        # Under Hydra the group choice ("mlp") names the architecture; without it, the
        # builder's module does (architectures.mlp.build -> "mlp").
        architecture = choices.get("architecture") or cfg.architecture._target_.split(".")[-2]
        dataset = cfg.dataset.name
        return cls(
            run=cfg.mlflow.run_name or f"{architecture}-{dataset}-{precision}-{secrets.token_hex(3)}",
            model=registered_model_name(cfg, architecture),
            tags={"architecture": architecture, "dataset": dataset, "precision": precision,
                  "mlflow.note.content": run_description(cfg, choices, architecture, precision)},
        )


def registered_model_name(cfg: DictConfig, architecture: str) -> str:
    """`mlflow.registered_model_name`, else `{dataset}-{architecture}` (e.g. `digits-mlp`)."""
    return cfg.mlflow.registered_model_name or f"{cfg.dataset.name}-{architecture}"


@contextlib.contextmanager
def start_run(
    experiment_id: str,
    run_name: str,
    tags: Mapping[str, str],
    log_file: Path | None = None,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    log_system_metrics: bool | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open the training run (or reopen run `run_id`, to resume it) and always close it.

    The run ends FINISHED on success, KILLED on Ctrl-C or SIGTERM, and FAILED on any
    other error, with the reason in the `failure_reason` tag, so no run is ever left
    RUNNING for the next job of a sweep. `log_file` (the job's log) is attached to the
    run either way. `parent_run_id` nests a new run under another (a sweep's run).
    `log_system_metrics` goes to `mlflow.start_run` (None: MLflow's
    `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING` decides; see `provenance.enable_system_metrics`).

    A run whose process died before it could close it (kill -9, or a full disk) is
    closed by the next start in its experiment on the same host (`close_orphans`).
    """
    close_orphans(experiment_id, keep=run_id)
    if run_id is None:
        if parent_run_id is not None:  # e.g. a job of a Hydra sweep: a child of the sweep's run
            tags = {**tags, "mlflow.parentRunId": parent_run_id}
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags={**tags, **_process_tags()},
                               log_system_metrics=log_system_metrics)
    else:
        run = mlflow.start_run(run_id=run_id, log_system_metrics=log_system_metrics)
        mlflow.set_tags(_process_tags())
        if "failure_reason" in run.data.tags:  # the reason the previous attempt ended
            MlflowClient().delete_tag(run_id, "failure_reason")
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except (KeyboardInterrupt, TrainingInterrupted) as error:
        status = "KILLED"
        _tag_failure(run.info.run_id, str(error) or "interrupted (KeyboardInterrupt)")
        raise
    except BaseException as error:
        _tag_failure(run.info.run_id, f"{type(error).__name__}: {error}")
        raise
    finally:
        if log_file is not None and log_file.is_file():
            try:
                mlflow.log_artifact(str(log_file))
            except Exception as error:  # a lost log must not hide the run's real outcome
                log.error("could not attach %s to run %s: %s", log_file, run.info.run_id, one_line(error))
        try:
            mlflow.end_run(status)  # leaves no active run even when the store does not answer
        except Exception as error:  # the next start closes it (`close_orphans`)
            log.error("could not mark run %s %s in the MLflow store: %s", run.info.run_id, status, one_line(error))


def _process_tags() -> dict[str, str]:
    """Which process holds a run open: host, pid and the pid's start time (pids are reused)."""
    import psutil

    return {"process.host": socket.gethostname(), "process.pid": str(os.getpid()),
            "process.started": repr(psutil.Process().create_time())}


def close_orphans(experiment_id: str, keep: str | None = None) -> list[str]:
    """Mark FAILED, with a reason, every RUNNING run of `experiment_id` held by a process
    of this host that no longer exists (other hosts' runs are left to them), except
    `keep`; return their ids. They stay resumable (`resume=RUN_ID`)."""
    import psutil

    client = MlflowClient()
    runs = client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and "
                                               f"tags.`process.host` = '{socket.gethostname()}'")
    closed = []
    for run in runs:
        pid, started = int(run.data.tags.get("process.pid", 0)), float(run.data.tags.get("process.started", 0))
        try:
            if run.info.run_id == keep or abs(psutil.Process(pid).create_time() - started) < 1:
                continue  # being resumed, or its process is still there
        except psutil.Error:  # no such process
            pass
        client.set_tag(run.info.run_id, "failure_reason", f"its process (pid {pid}) ended without closing the "
                       "run: killed, or its disk or store failed; resume=RUN_ID continues it from its checkpoints")
        client.set_terminated(run.info.run_id, "FAILED")
        log.warning("run %s was left RUNNING by a process that is gone: marked FAILED", run.info.run_id)
        closed.append(run.info.run_id)
    return closed


def _tag_failure(run_id: str, reason: str) -> None:
    try:
        MlflowClient().set_tag(run_id, "failure_reason", one_line(reason, 5000))
    except Exception as error:  # the store may be the thing that failed; the status still gets set
        log.error("could not record the failure reason on run %s: %s", run_id, one_line(error))


def log_config(cfg: DictConfig, overrides: list[str]) -> None:
    """The resolved config as flattened params and as `config.yaml`; overrides and the
    command as tags. Secrets are redacted first (`pipeline.redact`)."""
    mlflow.log_params(flatten(redact_config(OmegaConf.to_container(cfg, resolve=True))))
    mlflow.set_tag("overrides", " ".join(redact_command(overrides)) if overrides else "(defaults)")
    mlflow.set_tag("command", " ".join([os.path.basename(sys.executable), *redact_command(sys.argv)]))
    log_config_file(cfg)


def log_config_file(cfg: DictConfig) -> None:
    """`config.yaml`, the record `resume=` and `reproduce=` train from (secrets redacted)."""
    mlflow.log_text(OmegaConf.to_yaml(redact_config(OmegaConf.to_container(cfg, resolve=True))), "config.yaml")


def log_dataset(name: str, version: str, sizes: Mapping[str, int]) -> None:
    """What the run trained on: TFDS version and the size of each split."""
    mlflow.log_params({"data.version": f"{name}:{version}"} | {f"data.{role}_examples": n for role, n in sizes.items()})


def log_model_summary(model: keras.Model) -> None:
    """`model_summary.txt` and the parameter count as the `model.parameters` param."""
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line), line_length=110)
    mlflow.log_text("\n".join(lines), "model_summary.txt")
    mlflow.log_param("model.parameters", model.count_params())


def run_description(cfg: DictConfig, choices: Mapping[str, str], architecture: str, precision: str) -> str:
    """Two lines for the run page's description (`mlflow.note.content`, Markdown:
    a blank line between them, so they stay two lines), e.g.

        mlp trained on digits (batch 128) in float32.
        adam, lr 0.001 (cosine schedule, 1 warmup epoch), up to 20 epochs, seed 0.
    """
    optimizer = choices.get("optimizer") or str(cfg.optimizer._target_).rsplit(".", 1)[-1]
    schedule = cfg.optimizer.get("schedule", "constant")
    warmup = cfg.optimizer.get("warmup_epochs", 0) or 0
    detail = f"{schedule} schedule" + (f", {warmup} warmup epoch{'s' if warmup != 1 else ''}" if warmup else "")
    return (f"{architecture} trained on {cfg.dataset.name} (batch {cfg.dataset.batch_size}) in {precision}.\n\n"
            f"{optimizer}, lr {cfg.optimizer.lr:g} ({detail}), up to {cfg.trainer.epochs} epochs, seed {cfg.seed}.")
