"""One Optuna study of `hparams_search=optuna`, and how it maps onto MLflow.

    python -m pipeline.train hparams_search=optuna hydra.sweeper.n_trials=8

`StudySpec.from_config` reads a search from the composed config: its search space (the
`interval`/`tag(log, ...)`/`choice`/`range` syntax of `hydra.sweeper.params`, and sweep
overrides on the command line) as Optuna distributions, the overrides every trial
shares, the storage (default `sqlite:///optuna.db` in the launch directory) and the
study's name (default: the experiment plus a hash of the space and the fixed overrides,
so running the same command again continues the same study). Bad input is a
`ConfigError` of one line: an unknown pruner, a storage that cannot be opened, a
direction that contradicts `optimized_metric`, a changed space under an existing name.

How a study maps onto MLflow (one study, one parent run) is `pipeline.tracking.optuna_runs`;
the ask-and-tell loop is the Hydra sweeper in `hydra_plugins/pipeline_optuna_sweeper`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline import extras
from pipeline.errors import ConfigError, one_line
from pipeline.tracking.optuna_trial import (
    JOURNAL_SCHEME,
    PRUNERS,
    OptunaTrial,
    journal_path,
    monitored_metric,
    storage_for,
)

log = logging.getLogger(__name__)

SPACE_ATTR = "search_space"  # the space the study was created with, to refuse a changed one
# Metric names whose direction is not in doubt: a search that goes the other way is a typo.
MINIMIZED_WORDS = ("loss", "error", "mse", "mae")
MAXIMIZED_WORDS = ("acc", "auc", "precision", "recall", "f1", "iou")


@dataclass(frozen=True)
class StudySpec:
    """A search as the config describes it, resolved and checked.

    Args:
        name: the study's name in its storage.
        storage: the storage URL, sqlite and journal paths made absolute (`journal:///dir/study.log`).
        direction: `maximize` or `minimize` the optimized metric.
        space: the searched keys, in order, and their Optuna distributions.
        fixed: the command line's other overrides, passed to every trial as typed.
        settings: the rest of `hydra.sweeper` (n_trials, n_jobs, pruner, sampler, ...).
        optimized_metric: what each trial returns.
    """

    name: str
    storage: str
    direction: str
    space: Mapping[str, Any]
    fixed: tuple[str, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)
    optimized_metric: str = "final_val_accuracy"

    @classmethod
    def from_config(cls, config: DictConfig) -> StudySpec:
        """The search of a composed `pipeline.train` config (its `hydra` node included)."""
        sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=True)
        metric = str(config.optimized_metric)
        direction = str(sweeper.get("direction"))
        check_direction(direction, metric)
        if sweeper.get("pruner") not in PRUNERS:
            raise ConfigError(f"hydra.sweeper.pruner must be one of {', '.join(PRUNERS)}. "
                              f"Received: {sweeper.get('pruner')!r}")
        if sweeper.get("pruner") != "none" and monitored_metric(metric) is None:
            raise ConfigError(f"hydra.sweeper.pruner={sweeper['pruner']} needs a per-epoch validation metric, but "
                              f"optimized_metric={metric} has none: use a final_val_* metric or pruner=none")
        if int(sweeper.get("n_trials") or 0) < 1:
            raise ConfigError(f"hydra.sweeper.n_trials must be >= 1. Received: {sweeper.get('n_trials')}")
        from pipeline.tracking.optuna_progress import Patience

        Patience.of(sweeper, direction)  # a bad patience or min_delta fails here
        space, fixed = search_space(sweeper.get("params") or {}, list(config.hydra.overrides.task))
        if not space:
            raise ConfigError("hparams_search=optuna has nothing to search: hydra.sweeper.params is empty")
        storage = absolute_storage(str(sweeper.get("storage") or "sqlite:///optuna.db"))
        extras.require_driver(storage, "hydra.sweeper.storage")
        name = sweeper.get("study_name") or default_study_name(
            str(OmegaConf.select(config, "mlflow.experiment_name", default="") or "study"), space, fixed)
        return cls(name=str(name), storage=storage, direction=direction, space=space, fixed=tuple(fixed),
                   settings=sweeper, optimized_metric=metric)

    def redacted_storage(self) -> str:
        """The storage URL without its password, for tags and messages."""
        if self.storage.startswith(JOURNAL_SCHEME):
            return self.storage
        from sqlalchemy.engine import make_url

        return make_url(self.storage).render_as_string(hide_password=True)

    def space_record(self) -> dict[str, str]:
        """The space as JSON-able text, as stored in the study."""
        from optuna.distributions import distribution_to_json

        return {key: distribution_to_json(d) for key, d in self.space.items()}

    def open(self, heartbeat: bool = False) -> tuple[Any, bool]:
        """Open the study, creating it if it is new; return it and whether this call created it.

        Creation is atomic in the storage: of several workers starting at once, exactly one
        creates the study (and so the MLflow parent run); the others load it.
        """
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        settings = self.settings
        for attempt in range(3):  # two workers creating a fresh sqlite schema at once: one may lose
            try:
                storage = storage_for(self.storage, settings.get("heartbeat_interval") if heartbeat else None,
                                      settings.get("grace_period"))
                try:
                    study = optuna.create_study(storage=storage, study_name=self.name, direction=self.direction)
                    study.set_user_attr(SPACE_ATTR, self.space_record())
                    return study, True
                except optuna.exceptions.DuplicatedStudyError:
                    return self._loaded(optuna.load_study(study_name=self.name, storage=storage)), False
            except ConfigError:
                raise
            except Exception as error:
                if attempt == 2:
                    raise ConfigError(f"hydra.sweeper.storage: cannot open the Optuna study {self.name!r} in "
                                      f"{self.redacted_storage()}: {one_line(error)}") from None
                time.sleep(1 + attempt)
        raise AssertionError("unreachable")

    def _loaded(self, study):
        """An existing study, checked against this search."""
        wanted = "maximize" if self.direction == "maximize" else "minimize"
        if study.direction.name.lower() != wanted:
            raise ConfigError(f"hydra.sweeper.direction={self.direction}, but the study {self.name!r} in "
                              f"{self.redacted_storage()} was created to {study.direction.name.lower()}")
        recorded, now = study.user_attrs.get(SPACE_ATTR), self.space_record()
        if recorded is not None and recorded != now:
            differences = [f"{key}: {described(recorded.get(key))} -> {described(now.get(key))}"
                           for key in sorted(set(recorded) | set(now)) if recorded.get(key) != now.get(key)]
            raise ConfigError(f"the search space changed under hydra.sweeper.study_name={self.name}: "
                              f"{'; '.join(differences)}. Use a new study_name, or the space it was created with")
        return study

    def trial(self, trial_id: int, number: int) -> OptunaTrial:
        """What a job needs to find trial `number` and prune it."""
        return OptunaTrial(storage=self.storage, study_name=self.name, trial_id=trial_id, number=number,
                           pruner=str(self.settings.get("pruner")),
                           startup_trials=int(self.settings.get("pruner_startup_trials", 5)),
                           warmup_epochs=int(self.settings.get("pruner_warmup_epochs", 2)))


def described(record: str | None) -> str:
    """A stored distribution in the config's syntax: `tag(log, interval(0.0001, 0.03))`."""
    from optuna.distributions import CategoricalDistribution, IntDistribution, json_to_distribution

    if record is None:
        return "(not searched)"
    d = json_to_distribution(record)
    if isinstance(d, CategoricalDistribution):
        return f"choice({', '.join(map(str, d.choices))})"
    text = (f"range({d.low}, {d.high + d.step}, {d.step})" if isinstance(d, IntDistribution) and d.step != 1 else
            f"interval({d.low}, {d.high})")
    tags = ["log"] * d.log + ["int"] * (isinstance(d, IntDistribution) and d.step == 1)
    return f"tag({', '.join(tags)}, {text})" if tags else text


def check_direction(direction: str, metric: str) -> None:
    """Refuse a direction that is not one, or that plainly contradicts the metric's name."""
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"hydra.sweeper.direction must be maximize or minimize. Received: {direction!r}")
    name = metric.lower()
    expected = ("minimize" if any(w in name for w in MINIMIZED_WORDS) else
                "maximize" if any(w in name for w in MAXIMIZED_WORDS) else None)
    if expected is not None and expected != direction:
        raise ConfigError(f"hydra.sweeper.direction={direction} contradicts optimized_metric={metric}: "
                          f"use hydra.sweeper.direction={expected}")


def search_space(params: Mapping[str, Any], arguments: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Optuna distributions of `params` (`hydra.sweeper.params`) and of the sweep overrides
    in `arguments`, in that order (the command line wins over the config); the other
    arguments are fixed overrides, returned as typed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    space: dict[str, Any] = {}
    for key, value in params.items():
        (override,) = parser.parse_overrides([f"{key}={value}"])
        space[key] = distribution(override) if override.is_sweep_override() else None
    fixed = []
    for text, override in zip(arguments, parser.parse_overrides(list(arguments))):
        if override.is_sweep_override():
            space[override.key_or_group] = distribution(override)
        else:
            space.pop(override.key_or_group, None)  # a value on the command line fixes a searched key
            fixed.append(text)
    fixed += [f"{key}={params[key]}" for key, d in space.items() if d is None]  # fixed in the config's params
    return {key: d for key, d in space.items() if d is not None}, fixed


def distribution(override) -> Any:
    """The Optuna distribution of one sweep override: `interval(a, b)` (with `tag(log, ...)`
    sampled log-uniformly, with `tag(int, ...)` as integers), `range(a, b[, step])`,
    `choice(...)` or `a,b,c`."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep, Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value, key = override.value(), override.key_or_group
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if "int" in value.tags:
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    if isinstance(value, RangeSweep) and all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
        last = value.start + (value.stop - value.start - 1) // value.step * value.step  # range's stop is exclusive
        return IntDistribution(value.start, last, step=value.step)
    if isinstance(value, (ChoiceSweep, RangeSweep)) and not getattr(value, "shuffle", False):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    raise ConfigError(f"{key}: Optuna searches interval(), tag(log, interval()), range() and choice() "
                      f"spaces. Received: {override.input_line}")


def trial_overrides(spec: StudySpec, params: Mapping[str, Any]) -> list[str]:
    """A trial's job overrides: its sampled values, in the space's order, then the fixed ones."""
    return [f"{key}={params[key]!r}" if isinstance(params[key], float) else f"{key}={params[key]}"
            for key in spec.space] + list(spec.fixed)


def absolute_storage(storage: str) -> str:
    """A sqlite URL or journal file relative to the launch directory, made absolute so that
    jobs in other processes and directories open the same file; a bare path is a journal
    file (`journal:///abs/path`)."""
    if storage.startswith("sqlite:///") and not storage.startswith("sqlite:////") and ":memory:" not in storage:
        return "sqlite:///" + str(Path(storage.removeprefix("sqlite:///")).absolute())
    if storage.startswith(JOURNAL_SCHEME) or "://" not in storage:
        return JOURNAL_SCHEME + str(Path(journal_path(storage)).absolute())
    return storage


def default_study_name(experiment: str, space: Mapping[str, Any], fixed: Sequence[str]) -> str:
    """`<experiment>-<hash>`: the same search in the same experiment gets the same name."""
    from optuna.distributions import distribution_to_json

    identity = json.dumps({"space": {k: distribution_to_json(d) for k, d in space.items()},
                           "fixed": sorted(fixed)}, sort_keys=True)
    return f"{experiment}-{hashlib.sha256(identity.encode()).hexdigest()[:10]}"


def counts_toward_n_trials(trial) -> bool:
    """COMPLETE, PRUNED, and FAIL told by the search (a diverged trial); not a trial whose
    process died (it is asked again) nor one asked beyond n_trials by a racing worker."""
    from optuna.trial import TrialState

    return (trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (trial.state == TrialState.FAIL and "failure_reason" in trial.user_attrs))
