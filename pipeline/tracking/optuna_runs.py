"""One Optuna study is one MLflow parent run, each trial one child run.

The study's user attributes hold its parent's run id and tracking URI (`attach_parent`,
called by `pipeline.tracking.sweep.SweepRecorder` before the first trial), so a resumed
study, or a second worker on the same study, adds its children to the same parent.
`Children` tags each trial's child with its Optuna state (`trial_state`), ends FAILED
the children of trials whose process died, and puts Optuna's own figures on the parent.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from omegaconf import DictConfig

from pipeline import cli
from pipeline.errors import PipelineError, one_line
from pipeline.tracking.optuna_study import StudySpec

log = logging.getLogger(__name__)

PARENT_ATTR = "mlflow.parent_run_id"  # study user attributes: the study's MLflow parent run...
TRACKING_URI_ATTR = "mlflow.tracking_uri"  # ... and the store it is in
STOPPED_TAG = "sweep.stopped"  # the parent's: why the study stopped (n_trials reached, or patience)

# Parent runs (studies) whose best model this process leaves to another worker (`settle_registration`).
_registered_elsewhere: set[str] = set()


def settle_registration(study, launched: set[int]) -> bool:
    """Decide, once this worker's search loop has ended, whether it registers the study's
    best model: only the worker that ran the study's last finished trial does.

    Every worker on a shared study ends its search at about the same moment (when the
    study holds `n_trials` finished trials) and summarises the same children, so each
    would register the same best model: two versions of it when they overlap. The last
    finished trial is the same in every worker's view, and its worker is alive at the
    end (it ran it). A command that ran no trial (the study was full) registers nothing.

    Args:
        study: the study, after the loop.
        launched: the numbers of the trials this process launched.
    """
    from optuna.trial import TrialState

    parent_run_id = study.user_attrs.get(PARENT_ATTR)
    ended = [t for t in study.get_trials(deepcopy=False)
             if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.datetime_complete is not None]
    last = max(ended, key=lambda t: (t.datetime_complete, t.number), default=None)
    registers = last is not None and last.number in launched
    if parent_run_id is not None:
        (_registered_elsewhere.discard if registers else _registered_elsewhere.add)(parent_run_id)
    if last is not None and not registers:
        log.info("sweep: the study's best model is registered by the worker that ran its last trial (%d)",
                 last.number)
    return registers


def registers_best(parent_run_id: str) -> bool:
    """Whether this process's sweep under `parent_run_id` registers its best model (False
    only for a worker on a shared Optuna study that did not run its last trial)."""
    return parent_run_id not in _registered_elsewhere


def parent_run(config: DictConfig, tracking_uri: str, create: Callable[[Mapping[str, str]], str]) -> str:
    """A sweep's parent run (for `SweepRecorder`): a new one from `create(tags)`, except under our
    Optuna sweeper, where the study has one parent run across commands and workers. A bad
    search fails here in one line, before any run."""
    if not str(config.hydra.sweeper.get("_target_", "")).startswith("hydra_plugins.pipeline_optuna_sweeper."):
        return create({})
    try:
        return attach_parent(StudySpec.from_config(config), tracking_uri, create)
    except PipelineError as error:
        cli.fail(error, error.exit_code)
        raise  # unreachable: cli.fail exits


def attach_parent(spec: StudySpec, tracking_uri: str, create: Callable[[Mapping[str, str]], str]) -> str:
    """The study's MLflow parent run: the one it already has (reopened RUNNING), else a new
    one from `create(tags)`, recorded in the study. Of several workers starting at once,
    the one that created the study creates the parent; the others wait for it."""
    from mlflow.tracking import MlflowClient

    study, created = spec.open()
    deadline = time.monotonic() + (0 if created else 60)
    while PARENT_ATTR not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(1)
    attrs = study.user_attrs
    if attrs.get(PARENT_ATTR) and attrs.get(TRACKING_URI_ATTR) == tracking_uri:
        try:
            MlflowClient(tracking_uri).update_run(attrs[PARENT_ATTR], status="RUNNING")
            log.info("optuna: study %s continues in parent run %s", spec.name, attrs[PARENT_ATTR])
            return attrs[PARENT_ATTR]
        except Exception as error:  # deleted meanwhile: a new parent
            log.warning("optuna: parent run %s of study %s is gone (%s)", attrs[PARENT_ATTR], spec.name,
                        one_line(error))
    run_id = create({"optuna.study_name": spec.name, "optuna.storage": spec.redacted_storage()})
    study.set_user_attr(PARENT_ATTR, run_id)
    study.set_user_attr(TRACKING_URI_ATTR, tracking_uri)
    return run_id


@dataclass(frozen=True)
class Children:
    """The study's parent run in MLflow, and its trials' child runs."""

    tracking_uri: str
    parent_run_id: str

    @classmethod
    def of(cls, study) -> Children | None:
        attrs = study.user_attrs
        return cls(attrs[TRACKING_URI_ATTR], attrs[PARENT_ATTR]) if PARENT_ATTR in attrs else None

    def _runs(self, extra_filter: str = "") -> list:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        query = f"tags.mlflow.parentRunId = '{self.parent_run_id}'" + (f" and {extra_filter}" if extra_filter else "")
        return client.search_runs([e.experiment_id for e in client.search_experiments()], query, max_results=10_000)

    def tag(self, number: int, state: str) -> None:
        """Tag trial `number`'s child run(s) with `trial_state`."""
        from mlflow.tracking import MlflowClient

        for run in self._runs(f"tags.`optuna.trial_number` = '{number}'"):
            MlflowClient(self.tracking_uri).set_tag(run.info.run_id, "trial_state", state)

    def fail_dead(self, study) -> None:
        """End FAILED the RUNNING children of trials that Optuna failed (their process died),
        and tag `trial_state=FAIL` on those the run's own start-up check ended already."""
        from mlflow.tracking import MlflowClient
        from optuna.trial import TrialState

        states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        client = MlflowClient(self.tracking_uri)
        for run in self._runs():  # MLflow's search compares a status with one value only
            number = run.data.tags.get("optuna.trial_number")
            if (number is None or states.get(int(number)) != TrialState.FAIL or "trial_state" in run.data.tags
                    or run.info.status not in ("RUNNING", "FAILED")):
                continue
            client.set_tag(run.info.run_id, "trial_state", "FAIL")
            if run.info.status == "RUNNING":
                client.set_tag(run.info.run_id, "failure_reason", f"its process died: Optuna found no heartbeat of "
                                                                   f"trial {number}, marked it FAIL and asks it again")
                client.set_terminated(run.info.run_id, "FAILED")
                log.warning("optuna: trial %s died with its process; child run %s marked FAILED", number,
                            run.info.run_id)

    def log_progress(self, finished: int, best: float | None) -> None:
        """`trials_finished` and `best_so_far` on the parent, stepped by finished trials,
        so the MLflow UI charts the search while it runs."""
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        now = int(time.time() * 1000)
        metrics = [Metric("trials_finished", finished, now, finished)]
        if best is not None:
            metrics.append(Metric("best_so_far", best, now, finished))
        try:
            MlflowClient(self.tracking_uri).log_batch(self.parent_run_id, metrics=metrics)
        except Exception as error:  # watching the search never stops it
            log.warning("optuna: progress not logged to parent run %s: %s", self.parent_run_id, one_line(error))

    def record_stop(self, reason: str) -> None:
        """Tag the parent with why the study stopped (`sweep.stopped`)."""
        from mlflow.tracking import MlflowClient

        MlflowClient(self.tracking_uri).set_tag(self.parent_run_id, STOPPED_TAG, reason)

    def log_figures(self, study) -> None:
        """Optuna's optimization history, parameter importances (given enough complete
        trials) and parallel-coordinate plot, as PNGs on the parent run."""
        import matplotlib.pyplot as plt
        from mlflow.tracking import MlflowClient
        from optuna.trial import TrialState
        from optuna.visualization import matplotlib as optuna_plots

        complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        plots = {"optimization_history": optuna_plots.plot_optimization_history,
                 "parallel_coordinate": optuna_plots.plot_parallel_coordinate}
        if len(complete) >= 4:  # fANOVA on fewer trials is noise
            plots["param_importances"] = optuna_plots.plot_param_importances
        client = MlflowClient(self.tracking_uri)
        for name, plot in plots.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Optuna's matplotlib plots are "experimental"
                    figure = plot(study).figure
                client.log_figure(self.parent_run_id, figure, f"optuna_{name}.png")
                plt.close(figure)
            except Exception as error:  # a plot never fails a search
                log.warning("optuna: no %s plot: %s", name, one_line(error))
