"""The optional extras of pyproject.toml, and the one line that names the one a run needs.

`pip install -e .` installs what the quick start, a local sweep (basic or joblib launcher)
and an Optuna search on sqlite or a journal file need. The rest are extras, and a run
that needs a missing one stops before any training, in one line naming the command:

    error: hydra/launcher=slurm needs hydra-submitit-launcher: pip install -e '.[slurm]'
    error: mlflow.tracking_uri=postgresql://db/mlflow needs psycopg2-binary: pip install -e '.[postgres]'

The `profile` extra (TensorBoard, to view a `debug=profile` trace) is never needed by a
run: the run's closing block names it beside the `tensorboard` command. Light to
import: no TensorFlow, MLflow or Hydra.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence

from pipeline.errors import ConfigError

# extra -> (a module it installs, the distribution that provides it)
EXTRAS = {
    "postgres": ("psycopg2", "psycopg2-binary"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "ray": ("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher"),
}

# hydra/launcher options (ours in conf/hydra/launcher/, and the plugins' own) -> the extra that provides them
LAUNCHERS = {"slurm": "slurm", "submitit_slurm": "slurm", "submitit_local": "slurm",
             "ray_local": "ray", "ray": "ray", "ray_aws": "ray"}

# A PostgreSQL URL whose driver is psycopg2, SQLAlchemy's default: postgresql://, postgresql+psycopg2://
POSTGRES_PSYCOPG2 = re.compile(r"^postgres(ql)?(\+psycopg2)?://", re.IGNORECASE)


def installed(extra: str) -> bool:
    """Whether `extra`'s module can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(EXTRAS[extra][0]) is not None
    except ModuleNotFoundError:  # its parent package is missing too
        return False


def require(extra: str, what: str) -> None:
    """Raise `ConfigError` naming `pip install -e '.[extra]'` if `extra` is missing;
    `what` is the setting that needs it, e.g. `hydra/launcher=slurm`."""
    if not installed(extra):
        raise ConfigError(f"{what} needs {EXTRAS[extra][1]}: pip install -e '.[{extra}]'")


def require_launcher(arguments: Sequence[str]) -> None:
    """For a command line choosing a launcher of an extra (`hydra/launcher=slurm`), that
    extra. Checked before Hydra composes: without the plugin, Hydra would say only that
    it cannot find the launcher's config."""
    for argument in arguments:
        key, _, value = argument.lstrip("+~").partition("=")
        if key == "hydra/launcher" and value in LAUNCHERS:
            require(LAUNCHERS[value], f"hydra/launcher={value}")


def require_driver(url: str, key: str) -> None:
    """For a PostgreSQL URL (`key` is the setting that holds it), its driver."""
    if POSTGRES_PSYCOPG2.match(url):
        from pipeline.redact import redact

        require("postgres", f"{key}={redact(url)}")
