"""What `pip install -e .` leaves out: a run that needs an optional extra which is not
installed stops before any training, in one line naming `pip install -e '.[EXTRA]'`
(pipeline/extras.py), and the package declares what its code imports.

The suite's environment has every extra (`.[dev]`), so each case hides one from
`extras.installed`, the check the entry points make before Hydra, MLflow or Optuna
would fail deep inside with a traceback or a config they cannot find.
"""

from __future__ import annotations

import ast
import sys

import pytest
import tomllib
from conftest import REPO, run_in_process

from pipeline import extras

# (argv after `python -m pipeline.train`, the extra hidden, the one error line)
MISSING_EXTRAS = [
    (["-m", "hydra/launcher=slurm"], "slurm",
     "error: hydra/launcher=slurm needs hydra-submitit-launcher: pip install -e '.[slurm]'"),
    (["-m", "hydra/launcher=submitit_local"], "slurm",
     "error: hydra/launcher=submitit_local needs hydra-submitit-launcher: pip install -e '.[slurm]'"),
    (["-m", "hydra/launcher=ray_local"], "ray",
     "error: hydra/launcher=ray_local needs hydra-ray-launcher: pip install -e '.[ray]'"),
    (["mlflow.tracking_uri=postgresql://user:secret@db.internal/mlflow"], "postgres",
     "error: mlflow.tracking_uri=postgresql://db.internal/mlflow needs psycopg2-binary: pip install -e '.[postgres]'"),
    (["hparams_search=optuna", "hydra.sweeper.storage=postgresql+psycopg2://user@db.internal/optuna"], "postgres",
     "error: hydra.sweeper.storage=postgresql+psycopg2://db.internal/optuna needs psycopg2-binary: "
     "pip install -e '.[postgres]'"),
]


@pytest.mark.parametrize(("argv", "hidden", "line"), MISSING_EXTRAS, ids=[" ".join(a) for a, _, _ in MISSING_EXTRAS])
def test_a_missing_extra_is_one_line_naming_its_install(argv: list[str], hidden: str, line: str, tmp_path,
                                                         tfds_dir: str, capsys, monkeypatch) -> None:
    monkeypatch.setattr(extras, "installed", lambda extra: extra != hidden)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, out, err = run_in_process("pipeline.train", [*argv, f"dataset.data_dir={tfds_dir}", "trainer.epochs=1"],
                                    capsys)
    lines = [text for text in err.splitlines() if text.strip()]
    # The one `error:` line ends the output; anything before it is MLflow's INFO logging (a sweep opens its store).
    assert code == 2 and [text for text in lines if text.startswith("error: ")] == lines[-1:] == [line], err[-3000:]
    assert "Traceback" not in err and not list(tmp_path.rglob("ckpt-*")), "nothing trained"


def test_every_extra_is_installed_by_dev() -> None:
    # `.[dev]` is what CI installs and the suite tests every extra's path with.
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    dev_extras = {extra for requirement in optional["dev"] if requirement.startswith("tf-hydra-mlflow-pipeline[")
                  for extra in requirement.partition("[")[2].rstrip("]").split(",")}
    assert set(extras.EXTRAS) <= set(optional) and set(optional) - {"dev"} <= dev_extras, (set(optional), dev_extras)
    for extra, (_module, distribution) in extras.EXTRAS.items():
        assert any(r.startswith(distribution) for r in optional[extra]), (extra, distribution, optional[extra])


# Import names whose distribution is named differently in pyproject.toml.
DISTRIBUTIONS = {"sklearn": "scikit-learn", "tensorflow_datasets": "tensorflow-datasets", "yaml": "pyyaml",
                 "psycopg2": "psycopg2-binary", "hydra": "hydra-core", "PIL": "pillow"}


def test_what_the_code_imports_is_declared() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {requirement.split(";")[0].split("[")[0].split("~")[0].split(">")[0].split("<")[0].split("=")[0]
                .strip().lower() for requirement in project["dependencies"]}
    imported = set()
    for package in ("pipeline", "architectures", "callbacks", "hydra_plugins", "conf"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
                imported.update(name.split(".")[0] for name in names)
    ours = {"pipeline", "architectures", "callbacks", "hydra_plugins", "conf", "__future__"}
    third_party = {name for name in imported - ours if name not in sys.stdlib_module_names}
    optional = {"psycopg2"}  # imported by no module of ours; listed for the extras
    missing = sorted(name for name in third_party - optional
                     if DISTRIBUTIONS.get(name, name).lower().replace("_", "-") not in declared)
    assert not missing, f"imported but not declared in pyproject.toml's dependencies: {missing}"
