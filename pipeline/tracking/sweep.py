"""One MLflow parent run per Hydra sweep, a nested child run per job, a summary at the end.

    python -m pipeline.train -m architecture=mlp,resnet optimizer.lr=1e-3,1e-2
    python -m pipeline.train -m architecture=mlp,resnet hydra/launcher=joblib hydra.launcher.n_jobs=2
    python -m pipeline.train hparams_search=optuna

`SweepRecorder` does the work of the Hydra callback `pipeline.sweep_callback.SweepCallback`
(`hydra.callbacks.sweep` in `conf/train.yaml`), which hands it every hook of a multirun:

- `on_multirun_start` (launching process): opens the tracking store and the experiment
  once, before any job (parallel jobs racing to create a fresh sqlite schema fail), and
  creates the RUNNING parent run, tagged with the sweep dir and overrides.
- `on_job_start` (the job's process, also a joblib worker): tells the job's plan
  (`current_job`, read by `pipeline.plan`) through `$PIPELINE_SWEEP_JOB` to nest the
  job's run under the parent and to name it by the job's swept overrides (`architecture=mlp optimizer.lr=0.001`).
- `on_job_end` (the job's process): a job that failed before opening its run (e.g. a bad
  value in its overrides) still leaves a FAILED child with its `failure_reason`; a job
  that ended with a non-finite optimized metric is marked FAILED too.
- `on_multirun_end` (launching process): registers the best child's logged model (the
  one candidate for `champion`, with `register=best`; of the workers on one Optuna study,
  the one that ran its last trial), logs the summary on the parent (a
  table with one row per child, the optimized metric against each swept parameter, the
  best child's run id, `@sweep-best` on its registered model version), ends the parent
  FINISHED, prints its closing block (`pipeline.summary`), and exits non-zero if a job failed.

A failed job does not stop the sweep: in a multirun, `pipeline.cli.task` returns a
`JobFailure` instead of raising. Hydra itself swallows callback exceptions as warnings,
so the exit code is set here with `SystemExit`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.utils import JobReturn
from omegaconf import DictConfig, OmegaConf

from pipeline import cli, store_uri, tracking
from pipeline.errors import one_line
from pipeline.redact import redact, redact_command
from pipeline.tracking import optuna_runs, sweep_artifacts, sweep_resume
from pipeline.tracking.sweep_job import SWEEP_JOB_ENV, current_job, failure_of, find_children, optuna_tags, swept_keys
from pipeline.tracking.sweep_summary import Summary, metric_vs_params

log = logging.getLogger(__name__)

# sqlite answers "database is locked" when another process holds its write lock for
# longer than MLflow's busy timeout (20 s); the callback's own writes try again.
LOCK_RETRIES = 5

T = TypeVar("T")


class SweepRecorder:
    """A multirun recorded in MLflow: its parent run, a child per job, the summary. Created
    by the Hydra callback `pipeline.sweep_callback.SweepCallback`, which checks the
    arguments (see there), imports this module only for a multirun and calls the hooks
    below with Hydra's arguments."""

    def __init__(self, best_alias: str | None = "sweep-best", direction: str = "auto",
                 fail_on_failed_jobs: bool = True, register: str = "best") -> None:
        self.best_alias = best_alias
        self.register = register
        self.direction = direction
        self.fail_on_failed_jobs = fail_on_failed_jobs
        # Set in on_multirun_start; the callback is pickled with them to joblib workers.
        self.parent_run_id: str | None = None
        self.tracking_uri: str | None = None
        self.experiment_id: str | None = None
        self.swept_keys: list[str] = []
        self.optimized_metric = ""
        self._closed = False
        self.finished_jobs: dict[str, float] = {}  # +sweep.resume: job name -> its metric there

    # -- launching process -------------------------------------------------------------

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        from pipeline.errors import PipelineError

        overrides = cli.overrides(config.hydra)
        self.swept_keys = swept_keys(overrides, config.hydra.sweeper.get("params"))
        self.optimized_metric = str(config.optimized_metric)
        if self.direction == "auto":
            direction = config.hydra.sweeper.get("direction")
            self.direction = (str(direction) if direction in ("maximize", "minimize") else
                              "minimize" if "loss" in self.optimized_metric else "maximize")
        try:
            sweep_artifacts.requested(config)  # +trial_artifacts=: a bad value fails before any job
            # Creates the schema of a new sqlite store and the experiment once, here,
            # instead of in every parallel job at the same moment.
            self.experiment_id = tracking.connect(config.mlflow)
        except PipelineError as error:
            cli.fail(error, error.exit_code)  # no store: no job could log anything
        self.tracking_uri = store_uri.tracking_uri_exporting_credentials(config.mlflow.tracking_uri)
        _warn_if_parallel_on_sqlite(config, self.tracking_uri)

        sweep_dir = str(Path(str(config.hydra.sweep.dir)).absolute())
        sweeper = str(config.hydra.sweeper._target_).rpartition(".")[2]
        launcher = str(config.hydra.launcher._target_).rpartition(".")[2]
        searched = [o for o in overrides if _key(o) in self.swept_keys]
        searched += [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()
                     if k not in {_key(o) for o in searched}]  # the command line's range wins

        def create(extra_tags: Mapping[str, str]) -> str:
            return _retry(lambda: MlflowClient(self.tracking_uri).create_run(
                self.experiment_id,
                run_name=("sweep " + " ".join(searched) if searched else f"sweep {sweeper}")[:250],
                tags={
                    "sweep.dir": sweep_dir,
                    "sweep.overrides": " ".join(redact_command(overrides)) if overrides else "(none)",
                    "sweep.sweeper": sweeper,
                    "sweep.launcher": launcher,
                    "sweep.optimized_metric": f"{self.optimized_metric} ({self.direction})",
                    "mlflow.source.name": " ".join([os.path.basename(sys.executable), *redact_command(sys.argv)]),
                    **extra_tags,
                },
            )).info.run_id

        resumed = OmegaConf.select(config, "sweep.resume", default=None)
        if resumed:  # +sweep.resume=PARENT_RUN_ID: the jobs that finished there are not run again
            self.finished_jobs = sweep_resume.reopened(self.tracking_uri, str(resumed), self.optimized_metric)
            self.parent_run_id = str(resumed)
        else:  # a new parent, or (our Optuna sweeper) the study's own
            self.parent_run_id = optuna_runs.parent_run(config, self.tracking_uri, create)
        # If the sweep dies before on_multirun_end (a crashed sweeper, Ctrl-C), the parent
        # still ends, instead of staying RUNNING.
        atexit.register(self._end_unfinished_parent)
        log.info("sweep: parent run %s in experiment %s at %s", self.parent_run_id, self.experiment_id,
                 redact(self.tracking_uri))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id is None:
            return
        from pipeline.summary import print_sweep_closing_block

        summary = self._end_parent("FINISHED")
        log.info("sweep: %s", summary.headline())
        print_sweep_closing_block(self.parent_run_id, self.tracking_uri)  # each job printed one line
        if summary.failed and self.fail_on_failed_jobs:
            for row in summary.failed:
                print(f"error: sweep job {row['job']} ({row['run_name']}): {row['failure_reason']}",
                      file=sys.stderr)
            print(f"error: {len(summary.failed)} of {len(summary.rows)} sweep jobs failed; "
                  f"parent run {self.parent_run_id}", file=sys.stderr, flush=True)
            # Hydra turns an Exception raised by a callback into a warning; SystemExit passes.
            raise SystemExit(1)

    def _end_parent(self, status: str, reason: str | None = None) -> Summary:
        """Log the summary of the children so far on the parent, then end it with `status`."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        self._closed = True
        try:
            children = sorted(_retry(lambda: find_children(client, self.parent_run_id)),
                              key=lambda run: int(run.data.tags.get("sweep.job", "0") or 0))
            summary = Summary.of(children, self.optimized_metric, self.direction)
            self._log_summary(client, summary)
        finally:
            if reason:
                _retry(lambda: client.set_tag(self.parent_run_id, "failure_reason", reason))
            _retry(lambda: client.set_terminated(self.parent_run_id, status))
        return summary

    def _log_summary(self, client, summary: Summary) -> None:
        run_id = self.parent_run_id
        if (self.register == "best" and summary.best is not None and not summary.best.get("registered_model")
                and optuna_runs.registers_best(run_id)):
            from pipeline.tracking import registry

            summary.best["registered_model"] = _retry(lambda: registry.register_run(client, summary.best["run_id"]))
        tags = {
            "sweep.jobs": str(len(summary.rows)),
            "sweep.finished": str(len(summary.rows) - len(summary.failed)),
            "sweep.failed": str(len(summary.failed)),
            "mlflow.note.content": summary.markdown(),
        }
        if summary.failed:
            tags["sweep.failures"] = "; ".join(f"{row['run_name']}: {row['failure_reason']}"
                                               for row in summary.failed)[:5000]
        if summary.best is not None:
            tags["sweep.best_run_id"] = summary.best["run_id"]
            tags["sweep.best_run_name"] = summary.best["run_name"]
            _retry(lambda: client.log_metric(run_id, f"best_{self.optimized_metric}",
                                             summary.best[self.optimized_metric]))
        for key, value in tags.items():
            _retry(lambda key=key, value=value: client.set_tag(run_id, key, value))
        if summary.rows:
            _retry(lambda: client.log_table(run_id, summary.table(), "sweep_summary.json"))
        if summary.params and summary.best is not None:
            figure = metric_vs_params(summary.rows, self.optimized_metric, summary.params)
            _retry(lambda: client.log_figure(run_id, figure, "sweep_metric_vs_params.png"))
        if self.best_alias and summary.best is not None and summary.best.get("registered_model"):
            name, _, version = summary.best["registered_model"].rpartition("/")
            _retry(lambda: client.set_registered_model_alias(name, self.best_alias, version))
            _retry(lambda: client.set_tag(run_id, "sweep.best_model", f"models:/{name}@{self.best_alias}"))

    def _end_unfinished_parent(self) -> None:
        if self._closed or self.parent_run_id is None:
            return
        try:
            self._end_parent("FAILED", "the sweep stopped before on_multirun_end (see the command's output); "
                                       "the summary covers the jobs that ran")
        except Exception:  # at interpreter exit: report, never raise
            log.exception("could not end sweep parent run %s", self.parent_run_id)

    # -- job process -------------------------------------------------------------------

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id is None:  # a single run, not a sweep
            return
        job = str(config.hydra.job.num)
        swept = [o for o in cli.overrides(config.hydra) if _key(o) in self.swept_keys]
        params = {_key(o): o.partition("=")[2] for o in swept}
        os.environ[SWEEP_JOB_ENV] = json.dumps({
            "parent_run_id": self.parent_run_id,
            "run_name": " ".join(swept) or f"job {job}",
            "tags": {"sweep.job": job, "sweep.params": json.dumps(params), **optuna_tags()},
            "register": self.register,
            "finished": self.finished_jobs.get(" ".join(swept) or f"job {job}"),
        })

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        job = current_job()
        os.environ.pop(SWEEP_JOB_ENV, None)  # the next job in this process is not this one
        if self.parent_run_id is None or job is None:
            return
        reason = failure_of(job_return)
        if reason is None:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        number = job.tags["sweep.job"]
        runs = _retry(lambda: find_children(client, self.parent_run_id, f"tags.`sweep.job` = '{number}'"))
        child = runs[0] if runs else None
        if child is not None and child.info.status == "FAILED":
            return  # tracking.start_run recorded the reason already
        if child is None:  # failed before it opened its run: validation, data, model building
            tags = {**job.tags, "mlflow.parentRunId": self.parent_run_id}
            child = _retry(lambda: client.create_run(self._job_experiment(client, config), run_name=job.run_name,
                                                     tags=tags))
            log_file = cli.job_log_file(config.hydra)
            if log_file is not None and log_file.is_file():
                _retry(lambda: client.log_artifact(child.info.run_id, str(log_file)))
        _retry(lambda: client.set_tag(child.info.run_id, "failure_reason", one_line(reason, 5000)))
        _retry(lambda: client.set_terminated(child.info.run_id, "FAILED"))

    def _job_experiment(self, client, config: DictConfig) -> str:
        """The job's own experiment if its config names one, else the parent's."""
        name = OmegaConf.select(config, "mlflow.experiment_name", throw_on_resolution_failure=False)
        if not name or not str(name).strip():
            return str(self.experiment_id)
        experiment = client.get_experiment_by_name(str(name))
        if experiment is not None:
            return experiment.experiment_id
        try:
            return client.create_experiment(str(name))
        except Exception:  # another job created it a moment ago
            return client.get_experiment_by_name(str(name)).experiment_id


def _key(override: str) -> str:
    """`+optimizer.lr=0.1` -> `optimizer.lr`; group overrides keep their group."""
    return override.partition("=")[0].lstrip("+~")


def _warn_if_parallel_on_sqlite(config: DictConfig, uri: str) -> None:
    launcher = str(config.hydra.launcher._target_)
    n_jobs = config.hydra.launcher.get("n_jobs")
    if uri.startswith("sqlite") and "BasicLauncher" not in launcher and n_jobs != 1:
        log.warning(
            "sweep: %s runs jobs in parallel against the sqlite store %s. A few processes work (MLflow waits up "
            "to 20 s for sqlite's write lock), more may fail with 'database is locked'. For parallel sweeps run "
            "a tracking server (mlflow server --backend-store-uri sqlite:///mlflow.db) and pass mlflow=server.",
            launcher.rpartition(".")[2], uri)


def _retry(call: Callable[[], T]) -> T:
    """`call()`, tried again while sqlite reports "database is locked"."""
    for attempt in range(LOCK_RETRIES):
        try:
            return call()
        except Exception as error:
            if "database is locked" not in str(error) or attempt == LOCK_RETRIES - 1:
                raise
            time.sleep(2 ** attempt)
    raise AssertionError("unreachable")
