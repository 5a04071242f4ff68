"""Bad configs and inputs: each ends in exactly one readable line and a non-zero exit.

The table runs the real entry point (`pipeline.train.cli_main`: Hydra composition, our
validation, data loading, tracking, resume; or `pipeline.evaluate`'s and
`pipeline.inspect`'s, for a case whose argv starts with the module) in-process, with the
user's argv, and has at least one case for every config group in conf/ (checked by a
test of its own); a few cases also run as separate processes in tests/test_cli.py and
test_fault_tolerance.py. Cases that need an existing run use the session's `default_run`
(tests/conftest.py), registered as digits-mlp/1 @champion; `{run_id}` is its id.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import pytest
import tensorflow as tf
import yaml
from conftest import REPO, TrainedRun, compose_plan, run_in_process
from mlflow.tracking import MlflowClient

# (argv after `python -m pipeline.train` (or after `python -m`, when it names another entry point),
#  exit code, text the single error line must contain)
BAD_INPUTS = [
    (["architecture=transformer"], 2, "Could not find 'architecture/transformer'"),
    (["optimizer=lion"], 2, "Could not find 'optimizer/lion'"),
    (["optimizer.lr=${oc.env:NO_SUCH_VARIABLE_HERE}"], 2,
     "optimizer.lr: Environment variable 'NO_SUCH_VARIABLE_HERE' not found"),
    (["mlflow.experiment_name=" + "x" * 300], 2, "mlflow.experiment_name must be at most 256 characters"),
    (["architecture=ensemble", "architecture.members=[]"], 2,
     "architecture.members must list at least 2 architecture names. Received: []"),
    (["precision=fp8"], 2, "Could not find 'precision/fp8'"),
    (["optimizer.lr=0"], 2, "optimizer.lr must be > 0. Received: 0.0"),
    (["optimizer.lr=-1e-3"], 2, "optimizer.lr must be > 0. Received: -0.001"),
    (["optimizer.lr=fast"], 2, "optimizer.lr: Value 'fast' of type 'str' could not be converted to Float"),
    (["dataset.batch_size=0"], 2, "dataset.batch_size must be >= 1. Received: 0"),
    (["trainer.epochs=0"], 2, "trainer.epochs must be >= 1. Received: 0"),
    (["trainer.steps_per_execution=-2"], 2, "trainer.steps_per_execution must be >= 1. Received: -2"),
    (["architecture.dropout=1.0"], 2, "architecture.dropout must be in [0, 1). Received: 1.0"),
    (["architecture.dropout=-0.1"], 2, "architecture.dropout must be in [0, 1). Received: -0.1"),
    (["precision.policy=float8"], 2, "precision.policy must be one of"),
    (["seed=abc"], 2, "seed: Value 'abc' of type 'str' could not be converted to Integer"),
    (["seed=1.5"], 2, "seed: Value '1.5' of type 'float' could not be converted to Integer"),
    (["optimizer=sgd", "optimizer.momentum=1.5"], 2, "optimizer.momentum must be in [0, 1). Received: 1.5"),
    (["+architecture.depth=3"], 2, "architecture.depth is not an argument of architectures.mlp.build"),
    (["callbacks.grad_norm.action=explode"], 2,
     "callbacks.grad_norm.action must be one of ('warn', 'skip', 'stop', 'rollback'). Received: 'explode'"),
    (["callbacks.grad_norm.threshold=-1"], 2, "callbacks.grad_norm.threshold must be > 0 or null. Received: -1"),
    (["callbacks.grad_norm.action=rollback", "callbacks.checkpoint=null"], 2,
     "callbacks.grad_norm.action=rollback needs checkpoints to roll back to"),
    (["callbacks.checkpoint.keep=0"], 2, "callbacks.checkpoint.keep must be >= 1. Received: 0"),
    (["dataset.inject_nan_at_step=-1"], 2, "dataset.inject_nan_at_step must be >= 0 or null. Received: -1"),
    (["dataset.name=no_such_dataset"], 2, "dataset.name: no TFDS dataset is called 'no_such_dataset'"),
    (["dataset.prepare=false", "dataset.data_dir={tmp}/empty"], 2,
     "dataset 'digits' is not prepared in {tmp}/empty/digits/1.0.0 and dataset.prepare=false"),
    (["dataset.val_fraction=0.9999"], 2,
     "dataset 'digits': train split has 1437 examples, none left to train on"),  # an empty split
    (["hydra.run.dir=/proc/no/such/dir"], 1, "hydra.run.dir: cannot create the job's output directory"),
    (["callbacks.checkpoint.directory=/proc/checkpoints"], 1,
     "callbacks.checkpoint.directory: cannot write checkpoints to /proc/checkpoints"),
    (["mlflow.tracking_uri=http://127.0.0.1:1"], 1,
     "mlflow.tracking_uri: cannot reach the tracking server at http://127.0.0.1:1"),
    (["resume=0123456789abcdef0123456789abcdef"], 2,
     "resume: no run '0123456789abcdef0123456789abcdef' in the tracking store"),
    (["resume=last"], 2, "resume=last: no unfinished run with checkpoints in experiment 'digits'"),
    (["distribution=ring"], 2, "Could not find 'distribution/ring'"),
    (["distribution=mirrored", "distribution.logical_cpus=0"], 2,
     "distribution.logical_cpus must be >= 1 or null. Received: 0"),
    (["distribution.logical_cpus=two"], 2,
     "distribution.logical_cpus: Value 'two' of type 'str' could not be converted to Integer"),
    (["distribution.logical_cpus=2"], 2, "distribution.logical_cpus only applies to distribution=mirrored"),
    (["distribution=multi_worker", "distribution.timeout_seconds=0"], 2,
     "distribution.timeout_seconds must be > 0. Received: 0.0"),
    (["distribution=multi_worker"], 2, "distribution=multi_worker needs TF_CONFIG"),  # no TF_CONFIG in the env
    (["debug=limit", "debug.limit_fraction=0"], 2, "debug.limit_fraction must be in (0, 1] or null. Received: 0.0"),
    (["experiment=no_such_recipe"], 2, "Could not find 'experiment/no_such_recipe'"),
    (["hparams_search=grid"], 2, "Could not find 'hparams_search/grid'"),
    (["mlflow.champion_min_delta=-0.01"], 2, "mlflow.champion_min_delta must be >= 0. Received: -0.01"),
    (["mlflow.champion_min_delta=small"], 2,
     "mlflow.champion_min_delta: Value 'small' of type 'str' could not be converted to Float"),
    (["mlflow.champion_metric=test_accuracy"], 2, "mlflow.champion_metric must not be a test metric"),
    (["hydra.callbacks.sweep.register=some"], 2,
     "hydra.callbacks.sweep.register must be best, all or none. Received: 'some'"),
    (["augment=cutmix"], 2, "Could not find 'augment/cutmix'"),
    (["augment=flip_crop", "augment.pad=-1"], 2, "augment.pad must be >= 0. Received: -1"),
    (["augment=light", "augment.fill=mirror"], 2, "augment.fill must be one of"),
    (["augment=custom", "augment.layers=[{_target_: keras.layers.Dense, units: 3}]"], 2,
     "augment.layers: Dense is not a Keras image preprocessing layer"),
    (["augment=flip_crop", "+augment.degrees=3"], 2, "augment.degrees is not an argument of pipeline.augment.FlipCrop"),
    (["dataset.cache=ram"], 2, "dataset.cache must be one of ('memory', 'disk', 'none'). Received: 'ram'"),
    (["dataset=tfds"], 2, "dataset.name is missing"),
    (["dataset=tfds", "dataset.name=digits", "dataset.image_key=photo"], 2,
     "dataset.image_key: dataset 'digits' has no feature 'photo' (it has: image, label)"),
    (["dataset=image_folder"], 2, "dataset.path is missing"),
    (["dataset=image_folder", "dataset.path={tmp}/no_photos"], 2, "dataset.path: {tmp}/no_photos does not exist"),
    (["dataset=image_folder", "dataset.path={tmp}", "dataset.channels=2"], 2,
     "dataset.channels must be 1 or 3. Received: 2"),
    (["dataset=image_folder", "dataset.path={tmp}", "dataset.on_bad_file=ignore"], 2,
     "dataset.on_bad_file must be one of ('error', 'skip'). Received: 'ignore'"),
    (["dataset=image_folder", "dataset.path={tmp}", "dataset.image_size=[32]"], 2,
     "dataset.image_size must be [height, width] of positive ints or null. Received: [32]"),
    (["dataset=image_folder", "dataset.path={tmp}"], 2, "needs at least two class folders with images in them"),
    (["dataset=csv", "dataset.path={tmp}/table.csv"], 2, "dataset.label is missing"),
    (["dataset=csv", "dataset.path={tmp}/table.csv", "dataset.label=y"], 2,
     "dataset.path: {tmp}/table.csv does not exist"),
    (["dataset=csv", "dataset.path=t.csv", "dataset.label=y", "dataset.on_missing=guess"], 2,
     "dataset.on_missing must be one of ('error', 'drop'). Received: 'guess'"),
    (["dataset=csv", "dataset.path=t.csv", "dataset.label=y", "dataset.test_fraction=0.6",
      "dataset.val_fraction=0.5"], 2, "dataset.test_fraction + val_fraction must be < 1"),
    (["mlflow.registered_model_name=../../evil"], 2,
     "mlflow.registered_model_name: MLflow refuses the name '../../evil'"),
    (["mlflow.experiment_name="], 2, "mlflow.experiment_name must not be empty"),
    # 28x28 images into the 8x8 digits model: one line naming both specs, not a traceback per batch.
    (["pipeline.evaluate", "model=models:/digits-mlp@champion", "dataset=synthetic_mnist"], 2,
     "model models:/digits-mlp@champion takes uint8 (-1, 8, 8, 1), but dataset synthetic_mnist gives "
     "uint8 (-1, 28, 28, 1): evaluate it on data of its own input shape and dtype"),
    (["pipeline.inspect", "model=runs:/{run_id}", "dataset=synthetic_mnist"], 2,
     "model runs:/{run_id} takes uint8 (-1, 8, 8, 1), but dataset synthetic_mnist gives uint8 (-1, 28, 28, 1)"),
]
ENTRY_POINTS = ("pipeline.train", "pipeline.evaluate", "pipeline.inspect")

# The groups a user picks options from: conf/'s folders, but for hydra/ (Hydra's own launcher presets).
CONFIG_GROUPS = sorted(p.name for p in (REPO / "conf").iterdir()
                       if p.is_dir() and p.name != "hydra" and any(p.glob("*.yaml")))


def run_cli(argv: list[str], capsys: pytest.CaptureFixture, module: str = "pipeline.train") -> tuple[int, list[str]]:
    """`python -m module *argv` (pipeline.train unless said) in this process: (exit code, stderr lines)."""
    code, _, err = run_in_process(module, argv, capsys)
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.strip()]


def error_lines(lines: list[str]) -> list[str]:
    """The `error:` lines; anything else on stderr is MLflow's own INFO logging."""
    return [line for line in lines if line.startswith("error: ")]


@pytest.fixture
def workdir(tmp_path: Path, tfds_dir: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(sys, "argv", sys.argv)
    monkeypatch.delenv("TF_CONFIG", raising=False)  # distribution=multi_worker without one is a case
    return tmp_path


def placed(text: str, values: dict[str, str]) -> str:
    """`text` with the table's placeholders ({tmp}, {run_id}) filled in."""
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


@pytest.mark.parametrize(("argv", "exit_code", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _, _ in BAD_INPUTS])
def test_bad_input_is_one_line(argv, exit_code, message, workdir: Path, tfds_dir: str, capsys,
                               request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    module, argv = (argv[0], argv[1:]) if argv[0] in ENTRY_POINTS else ("pipeline.train", argv)
    values = {"{tmp}": str(workdir)}
    if module != "pipeline.train":  # a model to evaluate or inspect: the session's registered run
        default_run: TrainedRun = request.getfixturevalue("default_run")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", default_run.uri)
        values["{run_id}"] = default_run.run.info.run_id
        argv = [f"dataset.data_dir={tfds_dir}", "log_run=false" if module == "pipeline.evaluate" else
                f"output_dir={workdir / 'inspect'}", *argv]
    elif not any(a.startswith(("dataset.data_dir=", "resume=")) for a in argv):  # a resume takes no other keys
        # A table has no data_dir: only TFDS datasets and image folders' disk caches do.
        data_dir = [] if "dataset=csv" in argv else [f"dataset.data_dir={tfds_dir}"]
        argv = [*data_dir, "trainer.epochs=1", "trainer.verbose=0", *argv]
    argv, message = [placed(a, values) for a in argv], placed(message, values)
    code, lines = run_cli(argv, capsys, module)
    assert code == exit_code
    assert error_lines(lines) == [lines[-1]], lines
    assert message in lines[-1]


def test_the_table_covers_every_config_group() -> None:
    # A case covers a group by picking one of its options (`optimizer=lion`) or setting one of its keys.
    covered = {arg.lstrip("+").split("=")[0].split(".")[0] for argv, _, _ in BAD_INPUTS for arg in argv}
    in_train_yaml = {group for entry in yaml.safe_load((REPO / "conf" / "train.yaml").read_text())["defaults"]
                     if isinstance(entry, dict) for group in entry}
    assert in_train_yaml <= set(CONFIG_GROUPS), f"conf/'s folders {CONFIG_GROUPS} miss groups of train.yaml"
    missing = [group for group in CONFIG_GROUPS if group not in covered]
    assert not missing, f"BAD_INPUTS has no case for the config group(s) {missing}: add a bad option or value of each"


@pytest.fixture
def finished_run(default_run: TrainedRun, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The id of the session's default run (2 epochs, checkpoints kept), in the store the
    command line finds; its outputs go to `workdir`."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", default_run.uri)
    mlflow.set_tracking_uri(default_run.uri)
    return default_run.run.info.run_id


def test_resume_refuses_changes_and_loses_nothing(finished_run: str, tfds_dir: str, capsys) -> None:
    client = MlflowClient()
    before = client.get_run(finished_run)
    checkpoints = tf.train.get_checkpoint_state(before.data.tags["checkpoint_dir"]).all_model_checkpoint_paths

    code, lines = run_cli([f"resume={finished_run}", "optimizer.lr=0.1"], capsys)
    assert code == 2 and error_lines(lines) == [
        f"error: resume={finished_run}: a resumed run keeps its recorded config; only trainer.epochs may be "
        "raised (and dataset.data_dir name where its data lies now). Received: optimizer.lr=0.1"
    ]
    code, lines = run_cli([f"resume={finished_run}", "trainer.epochs=1"], capsys)
    assert code == 2 and error_lines(lines) == [
        f"error: resume={finished_run}: trainer.epochs may only be raised (the run was configured for 2). Received: 1"
    ]
    after = client.get_run(finished_run)
    assert after.info.status == before.info.status == "FINISHED"
    assert after.data.metrics == before.data.metrics
    assert tf.train.get_checkpoint_state(after.data.tags["checkpoint_dir"]).all_model_checkpoint_paths == checkpoints


@pytest.mark.parametrize("key", ["resume", "reproduce"])
def test_data_moved_elsewhere_is_named_on_resume_and_reproduce(key: str, finished_run: str, tfds_dir: str,
                                                              tmp_path: Path) -> None:
    # Where the data lies is not what the run trained on: the error for data that is not
    # there says to set dataset.data_dir, and a resume or reproduction takes it.
    moved = tmp_path / "moved_tfds"
    plan = compose_plan([f"{key}={finished_run}", f"dataset.data_dir={moved}"])
    assert plan.cfg.dataset.data_dir == str(moved)
    assert compose_plan([f"{key}={finished_run}"]).cfg.dataset.data_dir == tfds_dir, "else the recorded one"
    default = compose_plan([f"{key}={finished_run}", "dataset.data_dir=null"]).cfg.dataset.data_dir
    assert default is None, "null: back to TFDS's default directory"
    assert plan.cfg.optimizer == compose_plan([f"{key}={finished_run}"]).cfg.optimizer


def test_every_checkpoint_corrupt_is_one_line(finished_run: str, capsys) -> None:
    directory = Path(MlflowClient().get_run(finished_run).data.tags["checkpoint_dir"])
    saved = {data_file: data_file.read_bytes() for data_file in directory.glob("ckpt-*.data-*")}
    try:
        for data_file in saved:
            data_file.write_bytes(b"not a checkpoint")
        code, lines = run_cli([f"resume={finished_run}", "trainer.epochs=3"], capsys)
    finally:  # the run is shared: its checkpoints are left as they were
        for data_file, content in saved.items():
            data_file.write_bytes(content)
    assert code == 1 and error_lines(lines) == [lines[-1]]
    assert lines[-1].startswith(f"error: every checkpoint in {directory} is unreadable (ckpt-")
    assert lines[-1].endswith("); cannot resume")
    assert MlflowClient().get_run(finished_run).info.status == "FINISHED", "checked before the run reopens"
