"""The Hydra sweeper behind `hparams_search=optuna`: Optuna's ask-and-tell loop, launching
trials through the configured Hydra launcher (basic, joblib, submitit, Ray).

    python -m pipeline.train hparams_search=optuna hydra.sweeper.n_trials=20
    python -m pipeline.train hparams_search=optuna hydra.sweeper.pruner=hyperband hydra/launcher=joblib
    python -m pipeline.train hparams_search=optuna hydra.sweeper.storage=journal:///shared/study.log  # on N machines

It replaces hydra-optuna-sweeper, which pins Optuna < 3. Each round asks up to `n_jobs`
trials, launches them as one batch, and tells Optuna each outcome: COMPLETE with the
returned metric, PRUNED when the job's pruning callback stopped it, FAIL when the job
failed. `n_trials` is the study's total: the loop ends once the study holds that many
counted trials, whoever ran them (a resumed command, or other workers on the same
storage), or earlier once `patience` finished trials in a row did not improve the best
(`pipeline.tracking.optuna_progress`). While trials run, this process records their
heartbeats (in a journal file too: `pipeline.tracking.optuna_journal`); a trial whose
launching process died is failed by the next worker (`fail_stale_trials`) and asked
again. Each told trial prints one line, and the MLflow parent charts the search.

What a study is, how its space is read and how it maps onto MLflow lives in
`pipeline.tracking.optuna_study` and `optuna_runs`; this module, scanned by Hydra at every start, imports
nothing heavy until a search runs.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper

log = logging.getLogger(__name__)


class OptunaSweeper(Sweeper):
    """Hydra sweeper: an Optuna study over `hydra.sweeper.params` (conf/hydra/sweeper/optuna.yaml).

    Args:
        settings: the `hydra.sweeper` node; read again from the full config in `setup`.
    """

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config = None
        self.launcher = None
        self.hydra_context = None
        self.spec = None
        self._composed: set[tuple[str, str]] | None = None  # categorical values composed so far
        self._launched: set[int] = set()  # the numbers of the trials this process launched

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        from pipeline.tracking.optuna_study import StudySpec

        self.hydra_context = hydra_context
        self.config = config
        self.spec = StudySpec.from_config(config)  # bad input fails here, before any launch
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    def sweep(self, arguments: list[str]) -> list[Any]:
        from hydra.utils import instantiate
        from optuna.storages import fail_stale_trials
        from optuna.storages._heartbeat import is_heartbeat_enabled
        from optuna.trial import TrialState

        from pipeline.tracking.optuna_progress import Patience
        from pipeline.tracking.optuna_runs import Children, settle_registration
        from pipeline.tracking.optuna_study import counts_toward_n_trials

        spec, settings = self.spec, self.spec.settings
        study, _ = spec.open(heartbeat=True)
        sampler = dict(settings.get("sampler") or {"_target_": "optuna.samplers.TPESampler"})
        if sampler.get("seed") is not None:  # a resumed study must not replay its first trials' draws
            sampler["seed"] = int(sampler["seed"]) + len(study.trials)
        study.sampler = instantiate(sampler)
        children = Children.of(study)  # None without the sweep callback (no MLflow parent)
        n_trials, n_jobs = int(settings["n_trials"]), max(1, int(settings.get("n_jobs") or 1))
        patience = Patience.of(settings, spec.direction)
        # Every storage here has heartbeats (the journal file's are ours: optuna_journal), so a
        # running trial counts toward n_trials: workers on one study never overshoot it.
        heartbeats = is_heartbeat_enabled(study._storage)
        returns, launched, failed_before = [], 0, None
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental", at every call
                fail_stale_trials(study)  # RUNNING trials whose heartbeat stopped -> FAIL, enqueued again
            trials = study.get_trials(deepcopy=False)
            failed = sum(t.state == TrialState.FAIL for t in trials)
            if children is not None and failed != failed_before:
                children.fail_dead(study)
            failed_before = failed
            done = sum(counts_toward_n_trials(t) for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials) if heartbeats else 0
            stopped = patience.stop_reason(trials, spec.optimized_metric)
            if done >= n_trials or stopped:
                stopped = stopped or f"n_trials: the study holds {done} finished trials (n_trials={n_trials})"
                break
            room = n_trials - done - running
            if room <= 0:  # the rest run elsewhere (another worker, or a dead one not yet stale)
                time.sleep(float(settings.get("heartbeat_interval") or 5))
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with optimize": we record it
                batch = [study.ask(dict(spec.space)) for _ in range(min(n_jobs, room))]
            batch = [trial for trial in batch if not (heartbeats and self._surplus(study, trial, n_trials))]
            if batch:
                returns += self._run(study, batch, children)
                launched += len(batch)
        if launched == 0:
            print(f"optuna: study {spec.name} already holds {done} finished trials (n_trials={n_trials}): "
                  "nothing to train; raise hydra.sweeper.n_trials to search further"
                  if not stopped.startswith("patience") else
                  f"optuna: study {spec.name} stopped before: {stopped}; nothing to train", flush=True)
        elif stopped.startswith("patience"):
            print(f"optuna: study {spec.name} stops: {stopped}", flush=True)
        self._write_results(study)
        settle_registration(study, self._launched)  # one worker of a shared study registers its best
        if children is not None:
            children.record_stop(stopped)
            children.log_figures(study)
        return returns

    def _run(self, study, batch: list, children) -> list[Any]:
        """Launch one batch of trials, tell Optuna how each ended, and print its line."""
        from optuna.storages._heartbeat import get_heartbeat_thread

        from pipeline.tracking.optuna_progress import best_of, trial_line
        from pipeline.tracking.optuna_study import counts_toward_n_trials, trial_overrides
        from pipeline.tracking.optuna_trial import TRIAL_ENV, encoded

        # The job finds its trial through `hydra.job.env_set`, in whatever process it runs.
        overrides = [[*trial_overrides(self.spec, trial.params),
                      f"++hydra.job.env_set.{TRIAL_ENV}={encoded(self.spec.trial(trial._trial_id, trial.number))}"]
                     for trial in batch]
        self._launched.update(trial.number for trial in batch)
        heartbeats = [get_heartbeat_thread(trial._trial_id, study._storage) for trial in batch]
        for heartbeat in heartbeats:
            heartbeat.start()
        try:
            self.validate_batch_is_legal([job for job, trial in zip(overrides, batch) if self._composes_anew(trial)])
            returns = self.launcher.launch(overrides, initial_job_idx=batch[0].number)
        finally:
            for heartbeat in heartbeats:
                heartbeat.join()
        for trial, job_return in zip(batch, returns):
            state = self._tell(study, trial, job_return)
            if children is not None and state is not None:
                children.tag(trial.number, state)
        trials = study.get_trials(deepcopy=False)
        spec, n_trials = self.spec, int(self.spec.settings["n_trials"])
        for trial in batch:
            told = study._storage.get_trial(trial._trial_id)
            print(trial_line(told, trials, n_trials, spec.optimized_metric, spec.direction), flush=True)
        if children is not None:
            best = best_of(trials, spec.direction)
            children.log_progress(sum(counts_toward_n_trials(t) for t in trials), best.value if best else None)
        return list(returns)

    def _composes_anew(self, trial) -> bool:
        """Whether a trial's overrides need composing before launch (Hydra's
        `validate_batch_is_legal`, which composes the whole config: ~0.35 s a trial on 2
        cores): the first trial's do, and any with a categorical value (a config group's
        option) not composed before; numbers from the same ranges compose alike."""
        from optuna.distributions import CategoricalDistribution

        choices = {(key, str(trial.params[key])) for key, d in self.spec.space.items()
                   if isinstance(d, CategoricalDistribution)}
        new = self._composed is None or not choices <= self._composed
        self._composed = (self._composed or set()) | choices
        return new

    def _tell(self, study, trial, job_return) -> str | None:
        """Tell Optuna how `trial` ended; return its state's name (None if another worker
        failed it meanwhile)."""
        from optuna.trial import TrialState

        from pipeline.tracking.sweep import failure_of

        reason = failure_of(job_return)
        value = None if reason else job_return.return_value
        if reason is None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            reason = f"the job returned {value!r}, not a finite number"
        pruned_at = study._storage.get_trial(trial._trial_id).user_attrs.get("pruned_at_epoch")
        try:
            if reason is not None:
                trial.set_user_attr("failure_reason", reason[:1000])
                study.tell(trial, state=TrialState.FAIL)
                return "FAIL"
            if pruned_at is not None:
                study.tell(trial, state=TrialState.PRUNED)
                return "PRUNED"
            study.tell(trial, float(value))
            return "COMPLETE"
        except Exception as error:  # e.g. failed as stale by another worker while it ran
            log.warning("optuna: could not tell trial %d: %s", trial.number, error)
            return None

    @staticmethod
    def _surplus(study, trial, n_trials: int) -> bool:
        """Whether another worker filled the study while this one asked `trial`: then it is
        failed unrun (marked `surplus`, not counted), and the study stops at n_trials."""
        from optuna.trial import TrialState

        from pipeline.tracking.optuna_study import counts_toward_n_trials

        ahead = sum(1 for t in study.get_trials(deepcopy=False) if t.number < trial.number
                    and (counts_toward_n_trials(t) or t.state == TrialState.RUNNING))
        if ahead < n_trials:
            return False
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=TrialState.FAIL)
        return True

    def _write_results(self, study) -> None:
        """`optimization_results.yaml` in the sweep directory, as hydra-optuna-sweeper wrote it."""
        from omegaconf import OmegaConf

        try:
            best = study.best_trial
        except ValueError:  # no complete trial
            return
        directory = Path(str(self.config.hydra.sweep.dir))
        directory.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create({"name": "optuna", "study_name": self.spec.name,
                                         "best_params": best.params, "best_value": best.value}),
                       directory / "optimization_results.yaml")

