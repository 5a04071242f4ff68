"""Where a run came from: code version, command, library versions, dataset lineage and
system metrics.

    from pipeline.tracking import provenance
    tags = names.tags | provenance.provenance_tags(overrides)   # git, command, versions
    with tracking.start_run(..., tags, log_system_metrics=provenance.enable_system_metrics()):
        provenance.log_dataset_input("digits", "1.0.0", {"train": 1293, "val": 144, "test": 360})

Git is asked about the checkout that holds this package (not the working directory or
`sys.argv[0]`, which under pytest, Hydra multirun or a notebook point elsewhere), with a
short timeout; without git or a checkout there are simply no git tags.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import register_dataset_source

from pipeline.redact import redact_command, strip_credentials

log = logging.getLogger(__name__)

# A git call that takes longer than this is a hung network filesystem or a credential
# prompt; the run goes on without git tags.
GIT_TIMEOUT_SECONDS = 5.0
# The libraries a run's numbers depend on: tag name -> module.
VERSIONED_MODULES = {"tensorflow": "tensorflow", "keras": "keras", "mlflow": "mlflow", "hydra": "hydra"}
# MLflow samples every 10 s by default and logs nothing for a run shorter than one
# sampling period: 2 s x 3 samples gives a point every ~6 s, so a 20 s run gets 3.
SYSTEM_METRICS_SAMPLING_INTERVAL = 2.0
SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING = 3
# How each split is used, as MLflow's `mlflow.data.context` input tag.
SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


# -- code and environment -------------------------------------------------------------
def provenance_tags(overrides: list[str]) -> dict[str, str]:
    """Tags that say which code, command and libraries produced a run.

    - `mlflow.source.git.commit`, `mlflow.source.git.branch` (omitted on a detached
      HEAD), `mlflow.source.git.repoURL` (`origin`, credentials stripped; omitted
      without one): MLflow's own keys, shown on the run page;
    - `git_dirty` and MLflow's `mlflow.source.git.dirty`: "true" when a tracked file
      differs from the commit (staged or not). Untracked files do not count, as in
      MLflow's own git check, because runs launched in a checkout leave `outputs/`,
      `mlflow.db` and `mlruns/` behind; a new, never-added source file is therefore
      not seen;
    - `command` (the interpreter and `sys.argv`) and `overrides` (Hydra's, or
      "(defaults)"), the same values `tracking.log_config` records, secrets redacted;
    - `version.tensorflow`, `version.keras`, `version.mlflow`, `version.hydra`,
      `version.python`.

    Git tags are omitted when git is missing, times out, or this package is not
    tracked by a git checkout (e.g. installed into site-packages); never an error.
    """
    tags = git_tags(Path(__file__).resolve())
    tags["command"] = " ".join([os.path.basename(sys.executable), *redact_command(sys.argv)])
    tags["overrides"] = " ".join(redact_command(overrides)) if overrides else "(defaults)"
    for tag, module in VERSIONED_MODULES.items():
        try:
            tags[f"version.{tag}"] = str(importlib.import_module(module).__version__)
        except Exception:  # not installed, or a build without __version__
            tags[f"version.{tag}"] = "unknown"
    tags["version.python"] = platform.python_version()
    return tags


def git_tags(path: Path) -> dict[str, str]:
    """Git commit, branch, dirty flag and remote URL of the checkout whose tracked files
    include the folder of `path` (for this module: the `pipeline` package)."""
    directory = str(path.parent)
    # Does the repository track this folder? A venv or site-packages inside some
    # unrelated repository (ignored or untracked there) would otherwise report that
    # repository's commit.
    if not _git(directory, "ls-files", "--", "."):
        return {}
    # One call for the commit, the branch and the tracked changes.
    status = _git(directory, "status", "--porcelain=v2", "--branch", "--untracked-files=no")
    if status is None:
        return {}
    tags: dict[str, str] = {}
    dirty = False
    for line in status.splitlines():
        if line.startswith("# branch.oid "):
            commit = line.split()[2]
            if commit != "(initial)":
                tags["mlflow.source.git.commit"] = commit
        elif line.startswith("# branch.head "):
            branch = line.split(maxsplit=2)[2]
            if branch != "(detached)":
                tags["mlflow.source.git.branch"] = branch
        elif line and not line.startswith("#"):
            dirty = True
    if "mlflow.source.git.commit" not in tags:  # a repository without commits
        return {}
    tags["git_dirty"] = tags["mlflow.source.git.dirty"] = str(dirty).lower()
    url = _git(directory, "config", "--get", "remote.origin.url")
    if url:
        tags["mlflow.source.git.repoURL"] = strip_credentials(url.strip())
    return tags


def _git(directory: str, *args: str) -> str | None:
    """stdout of `git args` in `directory`, or None on any failure."""
    # No index.lock: `git status` would otherwise refresh the index and could collide
    # with a commit running at the same moment.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0"}
    try:
        result = subprocess.run(["git", *args], cwd=directory, env=env, capture_output=True, text=True,
                                timeout=GIT_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.SubprocessError) as error:  # no git, or it hung
        log.debug("git %s: %s", " ".join(args), error)
        return None
    if result.returncode != 0:
        log.debug("git %s exited %d: %s", " ".join(args), result.returncode, result.stderr.strip())
        return None
    return result.stdout


# -- datasets -------------------------------------------------------------------------
class TFDSSource(DatasetSource):
    """Where a TFDS dataset was read from: the prepared directory (if known) and the
    builder name and version, which reproduce it anywhere (`tfds build NAME`).

    Registered with MLflow, so `mlflow.data.get_source(run.inputs.dataset_inputs[0])`
    returns one (in a process that imported this module) and `.load()` gives the TFDS
    builder back.
    """

    def __init__(self, name: str, version: str, data_dir: str | None = None) -> None:
        self.name, self.version, self.data_dir = name, version, data_dir

    @staticmethod
    def _get_source_type() -> str:
        return "tfds"

    def load(self, **kwargs) -> Any:
        """The TFDS builder: read from the recorded directory (no builder code needed),
        else by name and version from TFDS's default data dir."""
        import tensorflow_datasets as tfds

        if self.data_dir and Path(self.data_dir).is_dir():
            return tfds.builder_from_directory(self.data_dir)
        return tfds.builder(f"{self.name}:{self.version}", **kwargs)

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> TFDSSource:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "data_dir": self.data_dir}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> TFDSSource:
        return cls(source_dict["name"], source_dict["version"], source_dict.get("data_dir"))


register_dataset_source(TFDSSource)


class FilesSource(DatasetSource):
    """Where a dataset of the user's own files was read from: a folder of images or a
    CSV file, with a digest of what was read (`pipeline.datasets`: relative paths,
    sizes and modification times of a folder's files; a CSV file's bytes)."""

    def __init__(self, kind: str, location: str, digest: str) -> None:
        self.kind, self.location, self.digest = kind, location, digest

    @staticmethod
    def _get_source_type() -> str:
        return "files"

    def load(self, **kwargs) -> str:
        """The folder or file's path."""
        return self.location

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> FilesSource:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "location": self.location, "digest": self.digest}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> FilesSource:
        return cls(source_dict["kind"], source_dict["location"], source_dict["digest"])


register_dataset_source(FilesSource)


class SplitDataset(Dataset):
    """One split of a dataset, as MLflow lineage: name `digits:1.0.0` (or
    `photos:3fa91c2d` for files, the version being their digest's start), a profile with
    the split and its size, and a digest of name, version, split and size.

    The digest identifies the data, not where it lies: the same split read from
    another directory has the same digest. For TFDS it is not a hash of the examples
    (that would mean reading them); TFDS versions are immutable, so name, version and
    split size pin them down. For files it includes their digest: a changed folder or
    table is a different dataset.
    """

    def __init__(self, source: TFDSSource | FilesSource, name: str, version: str, split: str, examples: int) -> None:
        self.split, self.examples, self.version = split, int(examples), version
        super().__init__(source=source, name=f"{name}:{version}")

    def _compute_digest(self) -> str:
        identity = {"name": self.name.rsplit(":", 1)[0], "version": self.version, "split": self.split,
                    "examples": self.examples}
        if isinstance(self.source, FilesSource):
            identity["files"] = self.source.digest
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]

    @property
    def profile(self) -> dict[str, Any]:
        return {"split": self.split, "num_examples": self.examples}

    @property
    def schema(self) -> None:
        return None

    def to_dict(self) -> dict[str, str]:
        return super().to_dict() | {"profile": json.dumps(self.profile)}


# How each database MLflow supports reports a second insert of one dataset (sqlite, PostgreSQL, MySQL).
DATASET_KEY_CLASHES = ("UNIQUE constraint failed: datasets.", '"dataset_pk"', "for key 'datasets.PRIMARY'")


def log_dataset_input(
    name: str,
    version: str,
    sizes: Mapping[str, int],
    data_dir: str | None = None,
    run_id: str | None = None,
    *,
    kind: str = "tfds",
    digest: str | None = None,
) -> list[SplitDataset]:
    """Log each split the run used as an MLflow dataset input (the run page's
    "Datasets used", and `run.inputs.dataset_inputs`).

    One input per split, each named `NAME:VERSION` with its own digest, context
    (`training`, `validation`, `test`; others keep their role name) and profile
    (`{"split": role, "num_examples": n}`); input tags `split` and `examples` repeat
    them for searching. One input per split because MLflow stores a dataset once per
    (name, digest) and links it to a run once, whatever the context.

    Args:
        name: the dataset's name, e.g. "digits" (a TFDS builder) or "photos" (a folder).
        version: its version, e.g. "1.0.0", or the start of a digest of its files.
        sizes: role -> examples, e.g. `Splits.sizes` ({"train": 1293, "val": 144, "test": 360}).
        data_dir: the prepared dataset's directory, or the folder or file read, recorded as the source.
        run_id: the run to log to; default the active run.
        kind: "tfds", "image_folder" or "csv".
        digest: of the files read (`pipeline.datasets`), for a kind other than "tfds".

    Returns:
        The logged datasets, in `sizes` order.
    """
    source = TFDSSource(name, version, data_dir) if kind == "tfds" else FilesSource(kind, str(data_dir), str(digest))
    datasets = [SplitDataset(source, name, version, role, examples) for role, examples in sizes.items()]
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = [
        DatasetInput(dataset._to_mlflow_entity(), tags=[
            InputTag(MLFLOW_DATASET_CONTEXT, SPLIT_CONTEXTS.get(dataset.split, dataset.split)),
            InputTag("split", dataset.split),
            InputTag("examples", str(dataset.examples)),
        ])
        for dataset in datasets
    ]
    run_id = run_id or mlflow.active_run().info.run_id
    client = mlflow.MlflowClient()
    try:
        client.log_inputs(run_id, datasets=inputs)  # one call for every split
    except mlflow.exceptions.MlflowException as error:
        # MLflow's store looks the dataset up, then inserts it, in two statements: runs
        # starting together in one experiment can both insert it, and all but one fail
        # on the unique key. Nothing was written; now the dataset exists and is linked.
        if not any(key in str(error) for key in DATASET_KEY_CLASHES):
            raise
        client.log_inputs(run_id, datasets=inputs)
    return datasets


# -- system metrics -------------------------------------------------------------------
def enable_system_metrics(
    sampling_interval: float = SYSTEM_METRICS_SAMPLING_INTERVAL,
    samples_before_logging: int = SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING,
) -> bool:
    """Whether to log MLflow system metrics (`system/cpu_utilization_percentage`,
    `system/system_memory_usage_megabytes`, disk, network; GPU with `pynvml`) for the
    next run, having set how often they are sampled.

    Pass the result as `log_system_metrics` to `mlflow.start_run`. Nothing global is
    switched on: other runs of the process (an evaluation run, the next sweep job)
    are unaffected.

    Returns False, with one log line, when `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING` is
    set to false (the user's opt-out) or `psutil` is missing. The sampling settings
    are process-wide environment variables in MLflow 3.17 (its monitor reads nothing
    else); one the user already set is left alone.

    Args:
        sampling_interval: seconds between samples (MLflow's default: 10).
        samples_before_logging: samples averaged into each logged point (default: 1).
    """
    if not sampling_interval > 0:
        raise ValueError(f"sampling_interval must be > 0 seconds. Received: {sampling_interval}")
    if int(samples_before_logging) < 1:
        raise ValueError(f"samples_before_logging must be >= 1. Received: {samples_before_logging}")
    from mlflow.environment_variables import (
        MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING,
        MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING,
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL,
    )

    if MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.defined and not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get():
        log.info("system metrics off: MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is false")
        return False
    if importlib.util.find_spec("psutil") is None:
        log.warning("system metrics off: the psutil package is missing (`pip install psutil`)")
        return False
    # MLflow announces starting, stopping and "no GPU" at INFO on every run: debug
    # detail for a training run's terminal. Its warnings and errors still show.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    for variable, value in ((MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, float(sampling_interval)),
                            (MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING, int(samples_before_logging))):
        if not variable.defined or variable.name in _set_by_us:
            variable.set(value)  # what mlflow.set_system_metrics_sampling_interval etc. do
            _set_by_us.add(variable.name)
    return True


# The sampling variables this module set, so a later call may change them again while
# a value the user exported stays theirs.
_set_by_us: set[str] = set()
