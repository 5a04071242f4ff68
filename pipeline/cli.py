"""Run a `@hydra.main` entry point so that user mistakes cost one line, not a traceback.

Hydra prints composition errors (a wrong type, an unknown key or group option) over
several lines, and task errors with a traceback. Our entry points decorate their task
function with `task` and call their Hydra main through `run`: every error the user can
fix then ends as a single `error: ...` line and a non-zero exit (2 for config mistakes).
`HYDRA_FULL_ERROR=1` restores Hydra's own behaviour, tracebacks included.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import logging
import math
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import extras
from pipeline.errors import PipelineError, TrainingInterrupted
from pipeline.redact import redact

Task = TypeVar("Task", bound=Callable[..., Any])

# Every entry point imports this module before TensorFlow: TensorFlow's C++ INFO lines
# (CUDA probing, CPU features) are noise for users; warnings stay.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# Progress bars for a few small artifact downloads only clutter the terminal.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow's default HTTP retries give up on a dead server after ~4 minutes per call;
# 3 retries (about 15 s) ride out a restart, then training goes on without the store.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def job_output_dir(hydra_node: Any = None) -> Path | None:
    """The output directory of the job Hydra is running (`outputs/DATE/TIME/`), from
    `hydra_node` (a config's `hydra` node) or Hydra's globals; None when Hydra composed
    the config without running a job, or does not run at all. For entry points only."""
    if hydra_node is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        hydra_node = HydraConfig.get()
    if OmegaConf.is_missing(hydra_node.runtime, "output_dir"):
        return None
    return Path(str(hydra_node.runtime.output_dir)).absolute()


def unclaimed_dir(path: str) -> str:
    """`path`, or `path_2`, `path_3`, ...: the first that did not exist, created here.
    The configs name Hydra's job and sweep directories with it (`${unclaimed_dir:...}`):
    they are named to the second, and jobs started in the same second would otherwise
    share one, their checkpoints, logs and `.hydra/` mixed. Registered with a cache, so
    one config claims one directory (Hydra copies the cache to each job of a sweep). If
    the parent cannot be created, `path` is returned for Hydra to fail on with its error.

    A directory claimed but still empty when the process exits (`--cfg hydra --resolve`
    resolves both the run's and the sweep's) is removed, with the parents created for it."""
    base = Path(path)
    try:
        created = [parent for parent in reversed(base.parents) if not parent.exists()]
        base.parent.mkdir(parents=True, exist_ok=True)
        for number in itertools.count(1):
            candidate = base if number == 1 else base.with_name(f"{base.name}_{number}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            if not _claimed:
                atexit.register(_remove_unused_claims)
            _claimed.extend(d.absolute() for d in [candidate, *reversed(created)])
            return str(candidate)
    except OSError:
        pass
    return path


_claimed: list[Path] = []  # by `unclaimed_dir`, innermost first


def _remove_unused_claims() -> None:
    for directory in _claimed:
        with contextlib.suppress(OSError):  # not empty (used), or already gone
            directory.rmdir()


OmegaConf.register_new_resolver("unclaimed_dir", unclaimed_dir, use_cache=True, replace=True)


def overrides(hydra_node: Any) -> list[str]:
    """The job's overrides as typed (`hydra_node` is a config's `hydra` node), without
    resolving what they hold: `optimizer.lr=${oc.env:LR}` is a string here, not a lookup
    that fails before the config is validated."""
    return [str(o) for o in OmegaConf.to_container(hydra_node.overrides.task, resolve=False)]


def job_log_file(hydra_node: Any) -> Path | None:
    """Hydra's log of the job (`<output dir>/<job name>.log`) from a config's `hydra`
    node, or None when Hydra composed the config without running a job."""
    output_dir = job_output_dir(hydra_node)
    return None if output_dir is None else output_dir / f"{hydra_node.job.name}.log"


def user_wants_tracebacks() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def describe(error: BaseException) -> str:
    """One line that names the offending key and value, for any user-fixable error; no
    URL in it keeps its credentials."""
    return redact(_describe(error))


def _describe(error: BaseException) -> str:
    if isinstance(error, MissingConfigException):
        first = str(error).strip().splitlines()[0]
        return f"{first}. Available: {', '.join(error.options)}" if error.options else first
    if isinstance(error, OverrideParseException):
        return f"cannot parse override '{error.override}': {error.message.splitlines()[0]}"
    cause = error.__cause__ if isinstance(error, HydraException) else error
    if isinstance(cause, PipelineError):  # e.g. a Hydra callback refusing a value: its own line
        return " ".join(str(cause).split())
    if isinstance(cause, OmegaConfBaseException):
        message = (getattr(cause, "msg", None) or str(cause)).strip().splitlines()[0]
        key = getattr(cause, "full_key", None)
        return f"{key}: {message}" if key else message
    return " ".join(str(error).split())


def fail(error: BaseException, exit_code: int) -> None:
    print(f"error: {describe(error)}", file=sys.stderr, flush=True)
    raise SystemExit(exit_code)


@dataclass(frozen=True)
class JobFailure:
    """What a failed job of a multirun returns to Hydra instead of raising.

    Raising would stop the sweep: Hydra's basic sweeper re-raises a failed job's error
    once its batch ends, so later batches and `on_multirun_end` (where `pipeline.tracking.sweep`
    closes the parent run and sets the exit code) would never run. It is not a float,
    so the Optuna sweeper records the trial as failed.
    """

    reason: str

    def __str__(self) -> str:
        return f"job failed: {self.reason}"


def task(function: Task) -> Task:
    """Decorate a Hydra task function so a `PipelineError` inside it ends in one line.

    Hydra would print "Error executing job with overrides" and re-raise; a `SystemExit`
    passes through its job runner untouched. In a multirun, a failed job (any error, or
    a non-finite return value) prints its error and returns a `JobFailure`, and the
    sweep goes on; Ctrl-C and SIGTERM still stop the whole sweep.
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _task_started
        _task_started = True
        if _in_multirun():
            return _sweep_job(function, *args, **kwargs)
        try:
            return function(*args, **kwargs)
        except PipelineError as error:
            if _full_error_requested:
                raise
            fail(error, error.exit_code)
        except KeyboardInterrupt:
            print("error: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _sweep_job(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    from hydra.core.hydra_config import HydraConfig

    job = HydraConfig.get().job.num
    try:
        value = function(*args, **kwargs)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except TrainingInterrupted as error:
        fail(error, error.exit_code)
    except PipelineError as error:
        print(f"error: sweep job {job}: {describe(error)}", file=sys.stderr, flush=True)
        return JobFailure(f"{type(error).__name__}: {describe(error)}")
    except Exception as error:  # a bug: its traceback belongs in the output
        traceback.print_exc()
        return JobFailure(f"{type(error).__name__}: {describe(error)}")
    if isinstance(value, float) and not math.isfinite(value):
        reason = f"the value returned to the sweeper is not finite: {value}"
        print(f"error: sweep job {job}: {reason}", file=sys.stderr, flush=True)
        return JobFailure(reason)
    return value


_full_error_requested = user_wants_tracebacks()
# Set once Hydra hands over to the task: an OSError before that is Hydra failing to
# create the job's output directory or log file.
_task_started = False


def _terminate(number: int, frame: Any) -> None:
    # SIGTERM (e.g. from a scheduler) ends a run like Ctrl-C does: marked KILLED, not
    # left RUNNING. During training, callbacks.checkpoint takes over and saves first.
    raise TrainingInterrupted(f"stopped by {signal.Signals(number).name}", number)


def run(hydra_main: Callable[[], Any]) -> None:
    """Call a `@hydra.main`-decorated function; exit with one line on a user error."""
    global _task_started
    _task_started = False
    signal.signal(signal.SIGTERM, _terminate)
    if _full_error_requested:
        extras.require_launcher(sys.argv[1:])
        hydra_main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # make Hydra raise composition errors to us
    # A failing store (full disk, lost server) reaches us as an MLflow exception that
    # ends in one line; MLflow's own logger would first print each with its traceback.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    logging.raiseExceptions = False  # a log file on a full disk must not bury the real error
    try:
        extras.require_launcher(sys.argv[1:])  # a missing plugin: one line naming its extra, not Hydra's
        hydra_main()
    except PipelineError as error:
        fail(error, error.exit_code)
    except (HydraException, OmegaConfBaseException) as error:
        fail(error, 2)
    except OSError as error:
        if _task_started:
            raise
        print(f"error: hydra.run.dir: cannot create the job's output directory or log "
              f"({error.strerror}: {error.filename}). Point hydra.run.dir (hydra.sweep.dir for -m) "
              "at a writable directory", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
