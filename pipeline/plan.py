"""The plan of one training run, resolved once at the entry point before TensorFlow starts.

`python -m pipeline.train` turns Hydra's config and its own globals (group choices,
overrides, the job's output directory and log) into a frozen `RunPlan`, then hands it to
`train(plan)`. Below the entry point nothing reads Hydra's globals, and nothing changes
the config: everything a run depends on is in its plan.

    plan = compose(["trainer.epochs=2"])     # tests, benchmarks, notebooks: as the CLI would
    metrics = train(plan)

Resolving a plan also recovers what the run continues (`pipeline.recovery`):
`resume=RUN_ID|last` reopens an unfinished run with the config it recorded,
`reproduce=RUN_ID` trains a recorded config again as a new run. And it decides the
process's role under `distribution=multi_worker`: only the chief records to MLflow.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from pipeline import cli, recovery
from pipeline.config import compose_with_hydra, validate
from pipeline.recovery import Resume
from pipeline.training import distribute

if TYPE_CHECKING:
    from pipeline.tracking.optuna_trial import OptunaTrial
    from pipeline.tracking.sweep_job import SweepJob

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """Everything one training run depends on, fixed before it starts.

    Args:
        cfg: the effective config, read-only: the composed one, or the one a resumed or
            reproduced run recorded (with this invocation's store and epochs).
        choices: the option chosen in each config group, e.g. {"architecture": "mlp"}.
        overrides: the command line's overrides, as typed.
        output_dir: the job's output directory (Hydra's `outputs/DATE/TIME/`), else the
            launch directory.
        log_file: Hydra's log of this job, attached to the run; None outside Hydra.
        resume: the run this one continues, or None for a new run.
        reproduces: the id of the run whose recorded config this one trains again.
        task: `local`, or this process's task in a multi-worker cluster (`worker-1`).
        is_chief: whether this process records the run (MLflow, export, registry).
        sweep: the sweep this run is a job of, or None.
        optuna_trial: the Optuna trial this run is (`hparams_search=optuna`), or None.
    """

    cfg: DictConfig
    choices: Mapping[str, str] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    output_dir: Path = field(default_factory=Path.cwd)
    log_file: Path | None = None
    resume: Resume | None = None
    reproduces: str | None = None
    task: str = "local"
    is_chief: bool = True
    sweep: SweepJob | None = None
    optuna_trial: OptunaTrial | None = None

    @property
    def architecture(self) -> str:
        """The architecture's name: its group choice (`mlp`), else its builder's module."""
        return self.choices.get("architecture") or str(self.cfg.architecture._target_).split(".")[-2]

    def choice(self, group: str) -> str:
        """The option chosen in `group`, else the `_target_` it selected (for messages)."""
        return self.choices.get(group) or str(self.cfg[group]._target_)

    def checkpoint_dir(self, run_id: Callable[[], str]) -> Path:
        """Where this run's checkpoints go: the resumed run's, `callbacks.checkpoint.directory`,
        else `checkpoints/` in the job's output directory, else (no Hydra job, e.g. a
        notebook) `./checkpoints/<run id>`, so that runs in one directory stay apart.
        `run_id` gives the run's id; it is called only in that last case (it may have to
        wait for the run to open)."""
        if self.resume is not None:
            return self.resume.checkpoint_dir
        configured = (self.cfg.callbacks.get("checkpoint") or {}).get("directory")
        if configured:
            return Path(configured).absolute()
        if self.log_file is not None:
            return self.output_dir / "checkpoints"
        return self.output_dir / "checkpoints" / run_id()

    def scratch_checkpoint_dir(self, directory: Path) -> Path | None:
        """None on the chief (it writes to `directory`); on another worker, a temporary
        sibling it writes each checkpoint to and then deletes (TensorFlow's multi-worker
        guidance: every worker saves, since a save may involve collectives; only the
        chief's copy is kept)."""
        return None if self.is_chief else directory.parent / f".{directory.name}-{self.task}-tmp"


def from_hydra(cfg: DictConfig) -> RunPlan:
    """The plan of the job Hydra is running: the one place that reads Hydra's globals."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return resolve(cfg)
    return _from_hydra_node(cfg, HydraConfig.get())


def compose(overrides: Sequence[str] = (), *, output_dir: Path | None = None) -> RunPlan:
    """Compose `conf/train.yaml` with `overrides` as `python -m pipeline.train` would, and
    resolve its plan (for tests, benchmarks and notebooks; runs go to the current store)."""
    cfg, hydra_node = compose_with_hydra(overrides)
    return resolve(cfg, choices=dict(hydra_node.runtime.choices), overrides=cli.overrides(hydra_node),
                   output_dir=output_dir)


def _from_hydra_node(cfg: DictConfig, hydra_node: DictConfig) -> RunPlan:
    from hydra.types import RunMode

    sweep, trial = None, None
    if hydra_node.mode == RunMode.MULTIRUN:  # only a sweep's job has a place in a sweep, or a trial
        # Validated first, since these modules import MLflow: a config mistake costs a second.
        # (`resolve` validates again: by then in milliseconds.) A single run imports MLflow
        # on a thread while it trains its first steps (`pipeline.pending_run`).
        validate(cfg)
        from pipeline.tracking import optuna_trial, sweep_job

        sweep, trial = sweep_job.current_job(), optuna_trial.current_trial()
    return resolve(cfg, choices=dict(hydra_node.runtime.choices), overrides=cli.overrides(hydra_node),
                   output_dir=cli.job_output_dir(hydra_node), log_file=cli.job_log_file(hydra_node),
                   sweep=sweep, optuna_trial=trial)


def resolve(
    cfg: DictConfig,
    *,
    choices: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
    output_dir: Path | None = None,
    log_file: Path | None = None,
    sweep: SweepJob | None = None,
    optuna_trial: OptunaTrial | None = None,
) -> RunPlan:
    """Validate `cfg`, recover what it resumes or reproduces, decide the process's role,
    and freeze the result. `cfg` itself is left as it was.

    Raises:
        ConfigError: a bad value, or a resume/reproduction that cannot be done.
    """
    validate(cfg)  # before any TensorFlow work: a typo costs a second, not a training run
    cfg = copy.deepcopy(cfg)
    choices = dict(choices or {})
    resume, reproduces = None, None
    if cfg.resume:
        resume, cfg, architecture = recovery.resumed(cfg, overrides)
    elif cfg.reproduce:
        reproduces = str(cfg.reproduce)
        cfg, architecture = recovery.reproduced(cfg, overrides)
    if resume is not None or reproduces is not None:
        choices["architecture"] = architecture or choices.get("architecture", "")
        validate(cfg)  # the recorded config, against today's code
    task, is_chief = distribute.role(cfg.get("distribution"))
    if not is_chief:
        cfg, resume = _record_nothing(cfg, resume, task)
    OmegaConf.set_readonly(cfg, True)
    return RunPlan(cfg=cfg, choices=choices, overrides=tuple(overrides),
                   output_dir=(output_dir or Path.cwd()).absolute(), log_file=log_file, resume=resume,
                   reproduces=reproduces, task=task, is_chief=is_chief, sweep=sweep, optuna_trial=optuna_trial)


def _record_nothing(cfg: DictConfig, resume: Resume | None, task: str) -> tuple[DictConfig, Resume | None]:
    """A non-chief worker's config: MLflow pointed at a throwaway store (deleted at exit),
    no model export, and a resume that opens a new (throwaway) run instead of the chief's.

    Every worker runs the same training code, so they all take part in the same
    collectives (fit, evaluation, the confusion matrix's predictions); only the chief's
    MLflow calls reach the real store, so a cluster makes exactly one run.
    """
    scratch = tempfile.mkdtemp(prefix=f"mlflow-{task}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    cfg.mlflow.tracking_uri = f"sqlite:///{scratch}/discarded.db"
    cfg.mlflow.log_model = False
    log.info("%s: not the chief, so nothing goes to MLflow (throwaway store %s)", task, scratch)
    return cfg, None if resume is None else dataclasses.replace(resume, run_id=None)
