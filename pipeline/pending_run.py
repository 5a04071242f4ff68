"""The training run's MLflow run, opened while TensorFlow builds and runs the first steps.

Importing MLflow and opening its sqlite store cost about 2 s of Python on 2 cores (most
of it the imports of MLflow's SQLAlchemy store: SQLAlchemy's mappers, Alembic), more
than TensorFlow needs to trace and run the first execution; done first, they delayed
the first step by all of it. So `opening` starts them on a thread, which sets to work
once the train step is traced (`GuardedModel.step_traced`: tracing is Python, and
would share the GIL with the thread; what follows, graph optimization and the steps,
is TensorFlow's C++). The training thread creates the run as soon as the store is open:

- at the first execution boundary after that (`RunOpener.on_train_batch_begin`);
- at the latest before anything an epoch produced is logged (the opener is the first
  of `fit`'s callbacks, at every epoch's and at training's end), or when a callback
  needs the run earlier (a stop by signal, a guard's event: their `open_run` hooks);
- and whatever ends the block (an error, Ctrl-C), the run is opened and closed with
  that outcome.

The run records what it did before (`run_started`: config, data, precision,
model summary) when it opens, so its first epoch finds it complete, and no checkpoint of
trained steps is written before it is open (`Checkpointing.open_run`). A tracking server
that does not answer is refused before training starts (`store_uri.require_server`); a
store that cannot be opened (an unwritable directory, a corrupt database) ends training
at the next execution boundary, with the same message as ever.

    with pending_run.opening(plan, policy, model, splits, checkpoints=True) as run:
        guarded.fit(..., callbacks=[RunOpener(run), ...])    # FitCallbacks.attach does this
        record.result(plan, run.open(), ...)                 # pipeline.record: after fit
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING

import keras

from pipeline import store_uri
from pipeline.errors import one_line
from pipeline.heavy_imports import first_import
from pipeline.plan import RunPlan

if TYPE_CHECKING:
    import mlflow

    from pipeline.training.guarded import GuardedModel
    from pipeline.training.precision import Resolved

log = logging.getLogger(__name__)


class PendingRun:
    """The plan's run while its store opens on a thread; `open` creates it (once).

    Args:
        stack: where the open run's context goes, to be closed with the block's outcome.
        plan, policy, model, splits, checkpoints: what `run_started` records.
        start_after: the thread starts opening the store once this is set (`open`
            sets it, if nothing has).
    """

    def __init__(self, stack: contextlib.ExitStack, plan: RunPlan, policy: Resolved, model: keras.Model, splits,
                 checkpoints: bool, start_after: threading.Event) -> None:
        self._stack = stack
        self._started = (plan, policy, model, splits, checkpoints)
        self._start_after = start_after
        self._run_id: str | None = None
        self._on_open: list[Callable[[str], None]] = []
        self._experiment_id: Future[str] = Future()
        # No training without the store: a tracking server must answer now.
        store_uri.require_server(store_uri.tracking_uri_exporting_credentials(plan.cfg.mlflow.tracking_uri))
        threading.Thread(target=self._connect, name="open-mlflow-store", daemon=True).start()

    def _connect(self) -> None:
        self._start_after.wait()
        try:
            # MLflow, its store's modules, and what `open` records with, imported here.
            with first_import("pipeline.summary", "pipeline.tracking", "pipeline.tracking.provenance"):
                from pipeline import summary, tracking  # noqa: F401
                from pipeline.tracking import provenance  # noqa: F401

            self._experiment_id.set_result(tracking.connect(self._started[0].cfg.mlflow))
        except BaseException as error:  # raised in the training thread, by `open`
            self._experiment_id.set_exception(error)

    @property
    def ready(self) -> bool:
        """Whether `open` would not wait: the store is open, or failed to open."""
        return self._experiment_id.done()

    @property
    def is_open(self) -> bool:
        return self._run_id is not None

    def when_open(self, hook: Callable[[str], None]) -> None:
        """Call `hook(run_id)` once the run is open (now, if it is), before `open` returns."""
        if self._run_id is not None:
            hook(self._run_id)
        else:
            self._on_open.append(hook)

    def open(self) -> str:
        """Open the run, waiting for its store if need be, and return its id. Call it from
        the training thread: MLflow's active run is per thread.

        Raises:
            PipelineError: the store could not be opened (`tracking.connect`).
        """
        if self._run_id is None:
            self._start_after.set()  # needed now: no more waiting for the first step's tracing
            experiment_id = self._experiment_id.result()
            plan, policy, model, splits, checkpoints = self._started
            run = self._stack.enter_context(opened_run(plan, policy.policy, experiment_id))
            self._run_id = run.info.run_id
            run_started(plan, self._run_id, model, splits, policy, checkpoints)
            for hook in self._on_open:
                hook(self._run_id)
            self._on_open = []
        return self._run_id

    def open_to_record(self, error: BaseException) -> None:
        """Open the run, if its store opens, so that it is closed with `error` as its outcome."""
        try:
            self.open()
        except Exception as cannot:
            if cannot is not error:  # else the error is the store's own, and says so
                log.error("training ended (%s) and MLflow could not record it: %s", one_line(error, 200),
                          one_line(cannot))


@contextlib.contextmanager
def opening(plan: RunPlan, policy: Resolved, guarded: GuardedModel, splits, checkpoints: bool) -> Iterator[PendingRun]:
    """Start opening the plan's run (see the module's docstring) and yield it, open or
    not. On the way out, it is open and closed with the block's outcome: FINISHED,
    KILLED or FAILED (`opened_run`)."""
    with contextlib.ExitStack() as stack:
        run = PendingRun(stack, plan, policy, guarded.model, splits, checkpoints, start_after=guarded.step_traced)
        try:
            yield run
        except BaseException as error:
            run.open_to_record(error)
            raise
        run.open()


@contextlib.contextmanager
def opened_run(plan: RunPlan, policy: str, experiment_id: str) -> Iterator[mlflow.ActiveRun]:
    """Open the plan's run (a new one, the resumed one, or a sweep's child) in experiment
    `experiment_id`, and close it with its outcome (`tracking.start_run`). `policy` is the
    resolved dtype policy."""
    from pipeline import summary, tracking
    from pipeline.tracking import provenance

    names = tracking.RunNames.from_config(plan.cfg, plan.choices, policy)
    run_name, tags = names.run, names.tags | provenance.provenance_tags(list(plan.overrides))
    if plan.sweep is not None:  # a job of a Hydra sweep: named by its swept overrides
        run_name, tags = plan.sweep.run_name, tags | dict(plan.sweep.tags)
    with tracking.start_run(experiment_id, run_name, tags, log_file=plan.log_file,
                            run_id=plan.resume.run_id if plan.resume else None,
                            parent_run_id=plan.sweep.parent_run_id if plan.sweep else None,
                            log_system_metrics=provenance.enable_system_metrics()) as run:
        print(summary.started_line(run), flush=True)  # to find it in the UI while it trains
        yield run
    summary.print_closing_block(run.info.run_id, brief=plan.sweep is not None)  # once closed: its final status


def run_started(plan: RunPlan, run_id: str, model: keras.Model, splits, policy: Resolved, checkpoints: bool) -> None:
    """What the run records as it opens: the config, data, precision (the policy chosen
    and why) and model of a new run; that it was resumed, and with how many epochs, for
    a resumed one."""
    import mlflow

    from pipeline import data, tracking
    from pipeline.tracking import provenance
    from pipeline.training import debug

    cfg = plan.cfg
    mlflow.set_tags(debug.tags(cfg))  # a debug run says so: it never passes for a real one
    if plan.reproduces is not None:
        mlflow.set_tag("reproduces", plan.reproduces)
    if plan.resume is not None:
        mlflow.set_tag("resumed_with_epochs", str(cfg.trainer.epochs))
        return
    tracking.log_config(cfg, list(plan.overrides))
    mlflow.log_params({"precision.resolved_policy": policy.policy, "precision.reason": policy.reason})
    lineage = splits.lineage
    tracking.log_dataset(lineage.name, lineage.version, splits.sizes)
    mlflow.log_params({"data.digest": lineage.digest, "dataset.classes": class_names_param(splits)})
    # How the commands the run prints (evaluate, inspect, predict) read this data again.
    mlflow.set_tag("data_overrides", json.dumps(data.command_overrides(cfg.dataset)))
    if splits.skipped:  # on_bad_file=skip: which files the run never saw
        mlflow.log_text("\n".join(splits.skipped) + "\n", "skipped_files.txt")
    provenance.log_dataset_input(lineage.name, lineage.version, splits.sizes, data_dir=lineage.location,
                                 kind=lineage.kind, digest=lineage.digest)
    if (cfg.get("augment") or {}).get("_target_"):  # what augmentation does, to see at a glance
        from pipeline.tracking import report

        report.log_augmented_examples(splits.train_batch(0, 0), splits.class_names, run_id)
    tracking.log_model_summary(model)
    if checkpoints:
        mlflow.set_tag("checkpoint_dir", str(plan.checkpoint_dir(lambda: run_id)))


def class_names_param(splits) -> str:
    """The class names as one param value, in output order (per head for several
    labels), cut to fit MLflow's 6000 characters (the logged model keeps them all)."""
    text = ", ".join(splits.class_names) or "; ".join(f"{head}: {', '.join(names)}"
                                                     for head, names in splits.label_names.items())
    return text if len(text) <= 6000 else text[:5990].rsplit(", ", 1)[0] + ", ..."


class RunOpener(keras.callbacks.Callback):
    """The first of `fit`'s callbacks: opens `run` at the first execution boundary after
    its store is open, and at the latest at an epoch's or training's end, before any
    other callback logs what the epoch produced."""

    def __init__(self, run: PendingRun) -> None:
        super().__init__()
        self.run = run

    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        if self.run.ready:
            self._open_in_epoch()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        self._open_in_epoch()

    def _open_in_epoch(self) -> None:
        """Open the run. Within an epoch, `trainer.verbose=1`'s progress bar is mid-line
        (Keras rewrites it in place, and ends it at the epoch's end, after this callback):
        the run's "started" line then goes on a line of its own, and the bar below it."""
        if not self.run.is_open and self.params.get("verbose") == 1:
            print(flush=True)
        self.run.open()

    def on_train_end(self, logs=None) -> None:
        self.run.open()
