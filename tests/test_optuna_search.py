"""`hparams_search=optuna`: our Hydra sweeper on Optuna >= 4. The study persists in
`optuna.db` and is one MLflow parent run; hopeless trials are pruned from their
per-epoch validation accuracy, in the launching process or in joblib's workers; a
search killed with -9 continues where it stopped; two commands share one study; bad
input is one line. Every search runs as a user would type it, in a temporary directory,
and is read back with Optuna's and MLflow's own APIs."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
import requests
from conftest import run_module
from mlflow.tracking import MlflowClient

from pipeline.errors import ConfigError
from pipeline.tracking import optuna_study
from pipeline.tracking.optuna_trial import storage_for

# Trials of 2 epochs, silent, no SavedModel: a trial costs a few seconds.
TINY = ("trainer.epochs=2", "trainer.verbose=0", "mlflow.log_model=false")
# A space whose trials are known in advance: TPE's random start-up with seed 11 draws
# lr 0.01 (learns digits in an epoch), then 1e-7 twice (stays near chance), so with one
# start-up trial and no warm-up the median pruner must stop trials 1 and 2 after epoch 0.
PRUNABLE = ("optimizer.lr=choice(0.01,1e-7)", "architecture.dropout=0.0", "hydra.sweeper.sampler.seed=11",
            "hydra.sweeper.pruner_startup_trials=1", "hydra.sweeper.pruner_warmup_epochs=0")


def search(tmp_path: Path, tfds_dir: str, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_module("pipeline.train", "hparams_search=optuna", *TINY, f"dataset.data_dir={tfds_dir}", *overrides,
                      cwd=tmp_path, timeout=timeout)


def the_study(tmp_path: Path) -> optuna.Study:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def all_runs(tmp_path: Path) -> tuple[list, list]:
    """(parents, children) in the search's MLflow store."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    return ([r for r in runs if "mlflow.parentRunId" not in r.data.tags],
            [r for r in runs if "mlflow.parentRunId" in r.data.tags])


def counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if optuna_study.counts_toward_n_trials(t)]


def test_search_space_reads_hydras_sweep_syntax_as_optuna_distributions() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space, fixed = optuna_study.search_space(
        {"optimizer.lr": "tag(log, interval(1e-4, 3e-2))", "architecture.dropout": "interval(0.0, 0.5)",
         "trainer.epochs": 3},
        ["hparams_search=optuna", "architecture.dropout=0.1", "architecture.width=range(32,129,32)",
         "optimizer=choice(adam,sgd)", "seed=tag(int, interval(1, 9))"])
    assert space == {
        "optimizer.lr": FloatDistribution(1e-4, 3e-2, log=True),
        "architecture.width": IntDistribution(32, 128, step=32),  # range's stop is exclusive
        "optimizer": CategoricalDistribution(["adam", "sgd"]),
        "seed": IntDistribution(1, 9),
    }, "a value typed on the command line fixes a searched key"
    assert fixed == ["hparams_search=optuna", "architecture.dropout=0.1", "trainer.epochs=3"]

    # The default study name is stable for the same search and changes with it.
    name = optuna_study.default_study_name("digits", space, fixed)
    assert name == optuna_study.default_study_name("digits", dict(space), list(reversed(fixed)))
    assert name != optuna_study.default_study_name("digits", space, [*fixed, "trainer.epochs=5"])
    with pytest.raises(ConfigError, match="use hydra.sweeper.direction=minimize"):
        optuna_study.check_direction("maximize", "final_val_loss")


def spec_of(tmp_path: Path, *overrides: str) -> optuna_study.StudySpec:
    """The search `python -m pipeline.train hparams_search=optuna *overrides` would run in `tmp_path`
    (the first override composes the config, the others are the command line's)."""
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    with initialize_config_module(config_module="conf", version_base="1.3"):
        config = compose("train", overrides=["hparams_search=optuna", *overrides[:1]], return_hydra_config=True)
    with open_dict(config):  # compose() refuses sweep overrides outside a multirun; the sweeper reads them here
        config.hydra.overrides.task.extend(overrides[1:])
    return optuna_study.StudySpec.from_config(config)


@pytest.mark.parametrize("overrides, message", [
    (["hydra.sweeper.pruner=sometimes"],
     "hydra.sweeper.pruner must be one of median, hyperband, successive_halving, none. Received: 'sometimes'"),
    (["hydra.sweeper.storage=sqlite:////nonexistent/dir/optuna.db"],
     "hydra.sweeper.storage: cannot open the Optuna study 'digits-"),
    (["hydra.sweeper.direction=minimize"],
     "hydra.sweeper.direction=minimize contradicts optimized_metric=final_val_accuracy: "
     "use hydra.sweeper.direction=maximize"),
    (["hydra.sweeper.study_name=s1", "optimizer.lr=tag(log,interval(1e-3,1e-1))"],
     "the search space changed under hydra.sweeper.study_name=s1: optimizer.lr: tag(log, interval(0.0001, 0.03)) "
     "-> tag(log, interval(0.001, 0.1)). Use a new study_name"),
])
def test_bad_search_input_is_refused_before_anything_runs(overrides: list[str], message: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec_of(tmp_path, "hydra.sweeper.study_name=s1").open()  # an existing study s1, over the default space
    with pytest.raises(ConfigError) as error:
        spec_of(tmp_path, *overrides).open()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_bad_search_is_one_line_and_opens_no_parent_run(tmp_path: Path) -> None:
    result = run_module("pipeline.train", "hparams_search=optuna", "hydra.sweeper.pruner=sometimes", cwd=tmp_path,
                        timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: hydra.sweeper.pruner must be one of median, hyperband, successive_halving, none. "
        "Received: 'sometimes'"], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert all_runs(tmp_path)[0] == [], "no parent run"


@pytest.mark.slow
def test_hopeless_trials_are_pruned_and_a_rerun_continues_the_study(tfds_dir: str, tmp_path: Path) -> None:
    # register=all: every complete trial's model logged and registered; a pruned one exports none.
    registering = ("mlflow.log_model=true", "hydra.callbacks.sweep.register=all")
    result = search(tmp_path, tfds_dir, *PRUNABLE, *registering, "hydra.sweeper.n_trials=3")
    assert result.returncode == 0, result.stderr[-3000:]

    study = the_study(tmp_path)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "PRUNED"], [
        t.user_attrs for t in study.trials]
    assert [t.params["optimizer.lr"] for t in study.trials] == [0.01, 1e-7, 1e-7]
    assert [t.user_attrs.get("pruned_at_epoch") for t in study.trials] == [None, 0, 0]

    (parent,), children = all_runs(tmp_path)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["optuna.study_name"] == study.study_name
    assert parent.data.tags["optuna.storage"] == f"sqlite:///{tmp_path / 'optuna.db'}"
    by_trial = {int(c.data.tags["optuna.trial_number"]): c for c in children}
    assert sorted(by_trial) == [0, 1, 2]
    assert [by_trial[n].info.status for n in range(3)] == ["FINISHED"] * 3, "a pruned trial is no failure"
    assert [by_trial[n].data.tags["trial_state"] for n in range(3)] == ["COMPLETE", "PRUNED", "PRUNED"]
    assert by_trial[1].data.tags["pruned_at_epoch"] == "0"
    assert len(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(
        by_trial[1].info.run_id, "val_accuracy")) == 1, "pruned after its first epoch"
    assert parent.data.tags["sweep.best_run_id"] == by_trial[0].info.run_id
    assert [by_trial[n].data.tags.get("registered_model") for n in range(3)] == ["digits-mlp/1", None, None]
    assert [by_trial[n].data.tags["trial_artifacts"] for n in (1, 2)] == ["all but the model: pruned at epoch 0"] * 2
    assert [m.source_run_id for m in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_logged_models(
        [parent.info.experiment_id])] == [by_trial[0].info.run_id], "a pruned trial never exports"
    versions = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_model_versions("name='digits-mlp'")
    assert [v.run_id for v in versions] == [by_trial[0].info.run_id]
    artifacts = {a.path for a in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").list_artifacts(
        parent.info.run_id)}
    assert {"optuna_optimization_history.png", "optuna_parallel_coordinate.png"} <= artifacts

    # The same command again: the study is complete, one line says so, nothing trains.
    again = search(tmp_path, tfds_dir, *PRUNABLE, *registering, "hydra.sweeper.n_trials=3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"study {study.study_name} already holds 3 finished trials" in again.stdout
    assert len(the_study(tmp_path).trials) == 3
    parents, children_after = all_runs(tmp_path)
    assert [p.info.run_id for p in parents] == [parent.info.run_id] and len(children_after) == 3
    assert parents[0].info.status == "FINISHED"


@pytest.mark.slow
def test_a_trial_in_a_joblib_worker_is_pruned_through_the_storage(tfds_dir: str, tmp_path: Path) -> None:
    result = search(tmp_path, tfds_dir, *PRUNABLE, "hydra.sweeper.n_trials=2", "hydra/launcher=joblib",
                    "hydra.launcher.n_jobs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    study = the_study(tmp_path)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"], [t.user_attrs for t in study.trials]
    _, children = all_runs(tmp_path)
    assert sorted(c.data.tags["trial_state"] for c in children) == ["COMPLETE", "PRUNED"]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def running_trial_runs(tmp_path: Path, epochs_logged: int = 0) -> list[str]:
    """Trial numbers of the RUNNING child runs that have logged at least `epochs_logged`
    epochs (`val_loss`), read straight from the sqlite store: polling through MlflowClient
    takes seconds on a loaded machine, longer than a trial runs."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db", timeout=1)) as db:
            return [value for (value,) in db.execute(
                "select t.value from runs r join tags t on r.run_uuid = t.run_uuid "
                "where t.key = 'optuna.trial_number' and r.status = 'RUNNING' and (select count(*) from metrics m "
                "where m.run_uuid = r.run_uuid and m.key = 'val_loss') >= ?", (epochs_logged,))]
    except sqlite3.Error:  # no store yet, or it is busy
        return []


@pytest.mark.slow
def test_a_search_killed_with_sigkill_continues_with_the_same_command(tfds_dir: str, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "pipeline.train", "hparams_search=optuna", *TINY, f"dataset.data_dir={tfds_dir}",
               "hydra.sweeper.n_trials=3", "hydra.sweeper.pruner=none", "trainer.epochs=8",
               # A dead trial is noticed 3 s after its last heartbeat, instead of 20 s.
               "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TF_CPP_MIN_LOG_LEVEL": "2"}
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Mid-trial: its run is open and has trained an epoch of its 8.
        wait_for(lambda: "1" in running_trial_runs(tmp_path, epochs_logged=1), 300, "trial 1 to log an epoch")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    study = the_study(tmp_path)
    assert len(counted(study)) == 3 and all(t.state.name == "COMPLETE" for t in counted(study))
    assert study.trials[1].state.name == "FAIL", "the killed trial, failed for its missing heartbeat"
    assert "failure_reason" not in study.trials[1].user_attrs, "... and not counted: it is asked again"
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retried) == 1 and retried[0].params == study.trials[1].params

    (parent,), children = all_runs(tmp_path)
    assert parent.info.status == "FINISHED", "one parent, re-attached, then finished"
    assert not [c for c in children if c.info.status == "RUNNING"], "no run left RUNNING"
    (dead,) = [c for c in children if c.info.status == "FAILED"]
    assert (dead.data.tags["optuna.trial_number"], dead.data.tags["trial_state"]) == ("1", "FAIL")
    assert dead.data.tags["failure_reason"].startswith("its process"), "who noticed first says why: the sweeper's" \
        " heartbeat check, or the store's check of runs whose process is gone"
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in finished) == sorted(t.number for t in counted(study))


@pytest.mark.slow
def test_two_commands_at_once_share_one_study_and_one_parent(tfds_dir: str, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "pipeline.train", "hparams_search=optuna", *TINY, f"dataset.data_dir={tfds_dir}",
               "hydra.sweeper.n_trials=4", "hydra.sweeper.pruner=none", "trainer.epochs=1"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TF_CPP_MIN_LOG_LEVEL": "2"}
    workers = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(err[-2000:] for _, err in outputs)

    study = the_study(tmp_path)
    assert len(counted(study)) == 4, [(t.number, t.state.name, t.user_attrs) for t in study.trials]
    (parent,), children = all_runs(tmp_path)
    assert parent.info.status == "FINISHED"
    numbers = sorted(int(c.data.tags["optuna.trial_number"]) for c in children)
    assert numbers == sorted(t.number for t in counted(study)), "every trial is a child of the one parent"


# -- patience, the journal's heartbeats, the trial lines: no training -------------------


def finished_trials(*outcomes: float | str) -> list[optuna.trial.FrozenTrial]:
    """Trials that finished one second apart, in the order given: a value is a COMPLETE
    trial, `pruned` and `failed` what they say."""
    import datetime

    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    start = datetime.datetime(2026, 1, 1)
    trials = []
    for number, outcome in enumerate(outcomes):
        state = {"pruned": TrialState.PRUNED, "failed": TrialState.FAIL}.get(outcome, TrialState.COMPLETE)
        trial = create_trial(state=state, value=outcome if state == TrialState.COMPLETE else None,
                             params={"optimizer.lr": 0.01}, distributions={"optimizer.lr": FloatDistribution(1e-4, 1)},
                             user_attrs={"failure_reason": "diverged"} if state == TrialState.FAIL else {})
        trial.number = number
        trial.datetime_start = start + datetime.timedelta(seconds=number)
        trial.datetime_complete = trial.datetime_start + datetime.timedelta(seconds=0.9)
        trials.append(trial)
    return trials


@pytest.mark.parametrize("patience, min_delta, outcomes, stops", [
    (2, 0.0, [0.90, 0.95, 0.94, 0.95], True),          # two in a row without beating 0.95 (a tie is no gain)
    (2, 0.0, [0.90, 0.95, 0.94, 0.96], False),         # the last one improved
    (3, 0.0, [0.90, 0.95, "pruned", "failed"], False),  # only two since the best
    (2, 0.0, [0.90, 0.95, "pruned", "failed"], True),  # pruned and failed trials do not improve
    (2, 0.01, [0.90, 0.95, 0.955, 0.958], True),       # gains under min_delta are none
    (None, 0.0, [0.9, 0.8, 0.7, 0.6], False),          # no patience: n_trials decides
])
def test_patience_counts_finished_trials_in_a_row_without_improvement(patience, min_delta, outcomes, stops) -> None:
    from pipeline.tracking.optuna_progress import Patience

    rule = Patience.of({"patience": patience, "min_delta": min_delta}, "maximize")
    reason = rule.stop_reason(finished_trials(*outcomes), "final_val_accuracy")
    assert (reason is not None) == stops, reason
    if stops:
        assert reason.startswith(f"patience: {patience} finished trials in a row did not improve final_val_accuracy "
                                 "0.9500 (trial 1)"), reason
    with pytest.raises(ConfigError, match="hydra.sweeper.patience must be null or an integer >= 1. Received: 0"):
        Patience.of({"patience": 0}, "maximize")


def test_only_the_worker_that_ran_the_last_finished_trial_registers_the_best() -> None:
    # Workers on one study end together and summarise the same children: each would
    # register the best model. Trial 3 failed last (e.g. failed by another worker when
    # its own died): the last *finished* trial is 2, pruned.
    from pipeline.tracking import optuna_runs

    study = optuna.create_study(direction="maximize")
    study.add_trials(finished_trials(0.90, 0.95, "pruned", "failed"))
    study.set_user_attr(optuna_runs.PARENT_ATTR, "parent-1")
    workers = {"a": {0, 2}, "b": {1, 3}, "late": set()}  # `late` found the study full
    registers = {}
    for name, launched in workers.items():
        registers[name] = optuna_runs.settle_registration(study, launched)
        assert optuna_runs.registers_best("parent-1") == registers[name]
    assert registers == {"a": True, "b": False, "late": False}
    assert optuna_runs.registers_best("another-sweep"), "grid sweeps, and other studies, register as before"


def test_trial_lines_say_what_each_trial_did_beside_the_best() -> None:
    from pipeline.tracking.optuna_progress import trial_line

    trials = finished_trials(0.9722, 0.9792, "pruned", "failed")
    trials[2].user_attrs["pruned_at_epoch"] = 3
    trials[2].intermediate_values[3] = 0.8611
    lines = [trial_line(t, trials, 24, "final_val_accuracy", "maximize") for t in trials]
    assert lines == [
        "[1/24] trial 0 COMPLETE final_val_accuracy 0.9722 (best 0.9792, trial 1) optimizer.lr=0.01 0.9 s",
        "[2/24] trial 1 COMPLETE final_val_accuracy 0.9792 (best 0.9792, trial 1) optimizer.lr=0.01 0.9 s",
        "[3/24] trial 2 PRUNED at epoch 3 val_accuracy 0.8611 (best 0.9792, trial 1) optimizer.lr=0.01 0.9 s",
        "[4/24] trial 3 FAIL (diverged) (best 0.9792, trial 1) optimizer.lr=0.01 0.9 s",
    ]


def test_a_journal_trial_whose_heartbeat_stopped_is_failed_and_asked_again(tmp_path: Path) -> None:
    # The journal file has no heartbeats of its own (optuna_journal adds them): without them a
    # dead worker's trial would stay RUNNING and hold its place in n_trials forever.
    from optuna.storages import fail_stale_trials
    from optuna.storages._heartbeat import get_heartbeat_thread

    url = f"journal://{tmp_path / 'study.log'}"
    study = optuna.create_study(study_name="s", storage=storage_for(url, heartbeat_interval=1, grace_period=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats are "experimental", and "meant for Study.optimize"
        alive, _dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), study.ask()
        heartbeat = get_heartbeat_thread(alive._trial_id, study._storage)
        heartbeat.start()
        try:
            time.sleep(2.5)  # the dead one's only heartbeat is its start, now older than the grace period
            fail_stale_trials(study)
        finally:
            heartbeat.join()
    states = {t.number: t.state.name for t in optuna.load_study(study_name="s", storage=storage_for(url)).trials}
    assert states == {0: "RUNNING", 1: "FAIL", 2: "WAITING"}, "the dead one failed, and its retry queued"


@pytest.mark.parametrize("storage, opened", [
    ("journal:///shared/dir/study.log", "journal:///shared/dir/study.log"),
    ("journal://study.log", "journal://{cwd}/study.log"),
    ("study.log", "journal://{cwd}/study.log"),  # a bare path, as before
    ("sqlite:///optuna.db", "sqlite:///{cwd}/optuna.db"),
    ("postgresql+psycopg2://user:secret@db/optuna", "postgresql+psycopg2://user:secret@db/optuna"),
])
def test_storage_urls_are_made_absolute_for_every_worker(storage: str, opened: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert optuna_study.absolute_storage(storage) == opened.format(cwd=tmp_path)


# -- what a search records, and how it is watched ---------------------------------------


@pytest.mark.slow
def test_only_the_trial_that_becomes_the_best_records_its_model_and_patience_ends_the_search(
        tfds_dir: str, tmp_path: Path) -> None:
    # PRUNABLE's trials without the pruner: lr 0.01 (good), then 1e-7 twice (chance). Patience 2
    # ends the study at 3 of its 5 trials; only trial 0 becomes the best, so only it records
    # plots, test scores and a model (the SavedModel export printed "Assets written" per trial).
    result = search(tmp_path, tfds_dir, *PRUNABLE, "hydra.sweeper.pruner=none", "mlflow.log_model=true",
                    "trainer.epochs=1", "hydra.sweeper.n_trials=5", "hydra.sweeper.patience=2")
    assert result.returncode == 0, result.stderr[-3000:]
    study = the_study(tmp_path)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3

    lines = re.findall(r"^\[\d+/\d+\] trial .*$", result.stdout, re.M)
    assert len(lines) == 3 and lines[0].startswith("[1/5] trial 0 COMPLETE final_val_accuracy "), lines
    assert re.fullmatch(r"\[3/5\] trial 2 COMPLETE final_val_accuracy 0\.\d{4} \(best 0\.\d{4}, trial 0\) "
                        r"optimizer\.lr=1e-07 \d+\.\d s", lines[2]), lines[2]
    assert "optuna: study " in result.stdout and "stops: patience: 2 finished trials in a row" in result.stdout
    assert result.stdout.count("Assets written") + result.stderr.count("Assets written") == 1

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,), children = all_runs(tmp_path)
    by_trial = {int(c.data.tags["optuna.trial_number"]): c for c in children}
    assert by_trial[0].data.tags["trial_artifacts"] == "all: the study's first complete trial"
    for number in (1, 2):
        child = by_trial[number]
        assert child.data.tags["trial_artifacts"].startswith("metrics only: final_val_accuracy "), child.data.tags
        assert "test_accuracy" not in child.data.metrics, "no test evaluation nobody reads"
        assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"config.yaml"}, "reproduce= works"
        assert "plots" not in {a.path for a in client.list_artifacts(child.info.run_id)}
    models = client.search_logged_models([parent.info.experiment_id])
    assert [m.source_run_id for m in models] == [by_trial[0].info.run_id]
    assert parent.data.tags["sweep.best_run_id"] == by_trial[0].info.run_id
    assert by_trial[0].data.tags["registered_model"] == "digits-mlp/1"

    # The parent charts the search as it runs, and says why it stopped.
    assert [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "trials_finished")] == [
        (1, 1), (2, 2), (3, 3)]
    best = [m.value for m in client.get_metric_history(parent.info.run_id, "best_so_far")]
    assert best == [study.best_value] * 3
    assert parent.data.tags["sweep.stopped"].startswith("patience: 2 finished trials in a row")
    assert re.search(rf"^dashboard +optuna-dashboard sqlite:///{tmp_path / 'optuna.db'} ", result.stdout, re.M)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_optuna_dashboard_opens_the_study_the_closing_block_names(kind: str, tmp_path: Path) -> None:
    # The optional extra (`.[dashboard]`, in `dev`): what the closing block's command starts.
    from mlflow_server import free_port, stop_process_group, wait_until_answers

    from pipeline.summary import search_rows

    dashboard = shutil.which("optuna-dashboard")
    if dashboard is None:
        pytest.skip("optuna-dashboard is not installed: pip install -e '.[dashboard]'")
    storage = {"sqlite": f"sqlite:///{tmp_path / 'optuna.db'}", "journal": f"journal://{tmp_path / 'study.log'}"}[kind]
    study = optuna.create_study(study_name="digits-0123456789", storage=storage_for(storage), direction="maximize")
    for lr, accuracy in ((1e-3, 0.95), (1e-2, 0.97)):
        study.add_trial(optuna.trial.create_trial(
            params={"optimizer.lr": lr}, distributions={"optimizer.lr": optuna.distributions.FloatDistribution(
                1e-4, 3e-2, log=True)}, value=accuracy, intermediate_values={0: accuracy - 0.1, 1: accuracy}))
    ((_, command),) = [row for row in search_rows({"optuna.storage": storage}) if row[0] == "dashboard"]
    argv = shlex.split(command.partition("  #")[0])
    assert argv[0] == "optuna-dashboard"

    port = free_port()
    log = tmp_path / "dashboard.log"
    with open(log, "wb") as output:
        process = subprocess.Popen([dashboard, *argv[1:], "--host", "127.0.0.1", "--port", str(port)], stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_answers(f"{url}/api/studies", process, 60, lambda: log.read_text(errors="replace")[-2000:])
        (listed,) = requests.get(f"{url}/api/studies", timeout=10).json()["study_summaries"]
        assert listed["study_name"] == "digits-0123456789"
        detail = requests.get(f"{url}/api/studies/{listed['study_id']}", timeout=10).json()
        assert [t["values"] for t in detail["trials"]] == [[0.95], [0.97]]
        assert detail["best_trials"][0]["number"] == 1
    finally:
        stop_process_group(process)


def test_in_process_trials_share_their_data(tfds_dir: str) -> None:
    # The jobs of a sweep in one process (the basic launcher's trials) read, decode and
    # trace the same dataset once; another seed orders the epochs differently: new splits.
    import dataclasses

    from pipeline.plan import compose
    from pipeline.tracking.sweep_job import SweepJob
    from pipeline.train import loaded_splits

    job = SweepJob(parent_run_id="0" * 32, run_name="optimizer.lr=0.01", tags={})
    first = dataclasses.replace(compose([f"dataset.data_dir={tfds_dir}", "optimizer.lr=0.01"]), sweep=job)
    second = dataclasses.replace(compose([f"dataset.data_dir={tfds_dir}", "optimizer.lr=0.001"]), sweep=job)
    reseeded = dataclasses.replace(compose([f"dataset.data_dir={tfds_dir}", "seed=7"]), sweep=job)
    assert loaded_splits(second) is loaded_splits(first)
    assert loaded_splits(reseeded) is not loaded_splits(first)
    single = compose([f"dataset.data_dir={tfds_dir}"])
    assert loaded_splits(single) is not loaded_splits(single), "a single run reads its own"
