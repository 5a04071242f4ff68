"""The Hydra callback every training process instantiates (`hydra.callbacks.sweep` in
`conf/train.yaml`), light to import: a single run needs nothing of it, so it imports
MLflow (about 1 s) only once its config is valid. A multirun hands every hook to
`pipeline.tracking.sweep.SweepRecorder`, which does the work:
one MLflow parent run per sweep, a nested child per job, a summary at the end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from hydra.core.utils import JobReturn

    from pipeline.tracking.sweep import SweepRecorder

# hydra.callbacks.sweep.register: which jobs' models become registered versions.
REGISTER_CHOICES = ("best", "all", "none")


class SweepCallback(Callback):
    """Hydra callback: an MLflow parent run for a multirun and its summary
    (`pipeline.tracking.sweep.SweepRecorder`, created at the multirun's start and pickled
    with this callback to joblib workers).

    Args:
        best_alias: registered-model alias moved to the best child's model version
            (when the child registered one); null leaves aliases alone.
        direction: `maximize` or `minimize` the optimized metric to pick the best child;
            `auto` takes the Optuna sweeper's direction, else minimizes a metric named
            `*loss*` and maximizes any other.
        fail_on_failed_jobs: exit non-zero when any job failed (after the summary).
        register: `best`: only the best child's model becomes a registered version (the
            sweep's one candidate for the champion alias); `all`: every child's; `none`.
    """

    def __init__(self, best_alias: str | None = "sweep-best", direction: str = "auto",
                 fail_on_failed_jobs: bool = True, register: str = "best") -> None:
        if direction not in ("auto", "maximize", "minimize"):
            raise ConfigError(f"hydra.callbacks.sweep.direction must be auto, maximize or minimize. "
                              f"Received: {direction!r}")
        if register not in REGISTER_CHOICES:
            raise ConfigError(f"hydra.callbacks.sweep.register must be best, all or none. Received: {register!r}")
        self.options = {"best_alias": best_alias, "direction": direction,
                        "fail_on_failed_jobs": fail_on_failed_jobs, "register": register}
        self.sweep: SweepRecorder | None = None  # a multirun's, from on_multirun_start

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from pipeline.tracking.sweep import SweepRecorder

        self.sweep = SweepRecorder(**self.options)
        self.sweep.on_multirun_start(config, **kwargs)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep is not None:
            self.sweep.on_multirun_end(config, **kwargs)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep is not None:  # else a single run: nothing to nest it under
            self.sweep.on_job_start(config, **kwargs)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.sweep is not None:
            self.sweep.on_job_end(config, job_return, **kwargs)
