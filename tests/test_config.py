"""Config composition and validation: every group option composes, every mistake is one line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, compose_config, run_module
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from pipeline import cli
from pipeline.config import validate
from pipeline.errors import ConfigError

GROUPS = ["dataset", "architecture", "optimizer", "precision", "trainer", "callbacks", "mlflow", "augment"]
# Options with a key only the user can fill in (`???`): composed with a value for it.
REQUIRED = {("dataset", "csv"): ["dataset.path=table.csv", "dataset.label=species"],
            ("dataset", "image_folder"): ["dataset.path=photos"],
            ("dataset", "tfds"): ["dataset.name=mnist"]}


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; an empty mapping is a leaf of its own."""
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree}
    return {key: value for name, child in tree.items() for key, value in leaves(child, f"{prefix}{name}.").items()}


@pytest.mark.parametrize(
    "group, option",
    [(group, option) for group in GROUPS for option in group_options(group)],
)
def test_every_group_option_composes_and_validates(group: str, option: str) -> None:
    cfg = compose_config([f"{group}={option}", *REQUIRED.get((group, option), [])])
    validate(cfg)
    # The group holds the chosen option: every value its file sets (not its defaults list) is the composed
    # value (an interpolation, e.g. ${dataset.name}, resolves in the whole config, and `???` is the user's to
    # fill: they must be there), and an empty option (callbacks=none) composes to an empty group.
    composed = leaves(OmegaConf.to_container(cfg[group], resolve=True, throw_on_missing=True))
    own = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / group / f"{option}.yaml"))
    own.pop("defaults", None)
    assert own or composed == {"": {}}, f"{group}={option} sets nothing, yet composes to {composed}"
    for key, value in leaves(own).items():
        if isinstance(value, str) and ("${" in value or value == "???"):
            assert key in composed, f"{group}={option}: {group}.{key} is missing"
        else:
            assert composed.get(key, "<absent>") == value, f"{group}.{key} is {composed.get(key)!r}, not {value!r}"


def test_every_group_option_hydra_offers_is_tested() -> None:
    # The options Hydra lets a user pick (config files and ConfigStore entries alike) are the ones
    # `group_options` finds, so the test above composes every one of them; and the default
    # conf/train.yaml picks is one of them.
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    defaults = {group: option for entry in OmegaConf.load(REPO / "conf" / "train.yaml").defaults
                if isinstance(entry, DictConfig) for group, option in entry.items()}
    with initialize_config_module(config_module="conf", version_base="1.3"):
        offered = {group: sorted(GlobalHydra.instance().config_loader().get_group_options(group)) for group in GROUPS}
    for group in GROUPS:
        assert offered[group] == group_options(group), f"Hydra offers {offered[group]} for {group}"
        assert defaults[group] in offered[group], f"conf/train.yaml's default {group}={defaults[group]} is no option"


def test_user_facing_keys_exist_with_sane_defaults() -> None:
    cfg = compose_config()
    assert cfg.trainer.epochs >= 1
    assert cfg.dataset.batch_size >= 1
    assert cfg.optimizer.lr > 0
    assert isinstance(cfg.seed, int)
    assert cfg.dataset.name == "digits"
    assert cfg.architecture._target_ == "architectures.mlp.build"
    assert compose_config(["optimizer=sgd"]).optimizer._target_ == "keras.optimizers.SGD"


def test_evaluate_config_composes() -> None:
    cfg = compose_config(["model=models:/digits-mlp@champion"], config_name="evaluate")
    assert cfg.model == "models:/digits-mlp@champion"
    assert cfg.split == "test"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=-1", "optimizer.lr must be > 0. Received: -1.0"),
        ("optimizer.lr=0", "optimizer.lr must be > 0. Received: 0.0"),
        ("dataset.batch_size=0", "dataset.batch_size must be >= 1. Received: 0"),
        ("trainer.epochs=0", "trainer.epochs must be >= 1. Received: 0"),
        ("trainer.steps_per_execution=0", "trainer.steps_per_execution must be >= 1. Received: 0"),
        ("dataset.val_fraction=1.0", "dataset.val_fraction must be in [0, 1). Received: 1.0"),
        ("architecture.dropout=1.5", "architecture.dropout must be in [0, 1). Received: 1.5"),
        ("precision.policy=float64", "precision.policy must be one of"),
        ("optimizer.schedule=linear", "optimizer.schedule must be one of"),
        ("optimizer.warmup_epochs=50", "optimizer.warmup_epochs must be >= 0 and < trainer.epochs. Received: 50"),
        ("mlflow.champion_alias=latest", "mlflow.champion_alias must be a non-empty alias other than 'latest'"),
        ("mlflow.champion_mode=best", "mlflow.champion_mode must be 'max' or 'min'. Received: 'best'"),
        ("mlflow.champion_min_delta=-1", "mlflow.champion_min_delta must be >= 0. Received: -1.0"),
        ("mlflow.champion_metric=test_category_accuracy", "mlflow.champion_metric must not be a test metric"),
        ("seed=-3", "seed must be >= 0. Received: -3"),
        ("architecture._target_=architectures.nope.build",
         "architecture._target_ cannot be imported. Received: 'architectures.nope.build'"),
        ("+architecture.depth=3", "architecture.depth is not an argument of architectures.mlp.build"),
        ("+callbacks.early_stopping.patence=3",
         "callbacks.early_stopping.patence is not an argument of callbacks.early_stopping.EarlyStopping"),
        ("optimizer.epsilon=0", "optimizer.epsilon must be > 0. Received: 0.0"),
        ("optimizer.beta_1=1.5", "optimizer.beta_1 must be in [0, 1). Received: 1.5"),
        ("dataset.val_fraction=0",
         "dataset.val_fraction must be > 0: final_val_accuracy, val_loss needs a validation set"),
        ("dataset.name=???", "dataset.name is missing"),
    ],
)
def test_validate_names_key_and_value(override: str, message: str) -> None:
    cfg = compose_config([override])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer=sgd", "optimizer.momentum=1.5"], "optimizer.momentum must be in [0, 1). Received: 1.5"),
        (["optimizer=adamw", "optimizer.weight_decay=-1"], "optimizer.weight_decay must be >= 0. Received: -1.0"),
        (["optimizer=rmsprop", "optimizer.rho=1"], "optimizer.rho must be in [0, 1). Received: 1.0"),
        (["dataset.val_fraction=0", "callbacks=none", "optimized_metric=test_accuracy"], None),
    ],
)
def test_validate_optimizer_specific_keys(overrides: list[str], message: str | None) -> None:
    cfg = compose_config(overrides)
    if message is None:
        validate(cfg)  # no validation set is fine when nothing needs one
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=abc", "optimizer.lr: Value 'abc' of type 'str' could not be converted to Float"),
        ("seed=1.5", "seed: Value '1.5' of type 'float' could not be converted to Integer"),
        ("trainer.epochs=many", "trainer.epochs: Value 'many' of type 'str' could not be converted to Integer"),
        ("trainer.epoch=3", "trainer.epoch: Key 'epoch' not in 'TrainerConfig'"),
        ("optimizer=nope", "Could not find 'optimizer/nope'. Available: adam, adamw, rmsprop, sgd"),
    ],
)
def test_composition_errors_become_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose_config([override])
    line = cli.describe(error.value)
    assert message in line
    assert "\n" not in line


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=-1", "error: optimizer.lr must be > 0. Received: -1.0"),
        ("optimizer.lr=abc", "error: optimizer.lr: Value 'abc' of type 'str' could not be converted to Float"),
        ("optimizer=nope", "error: In 'train': Could not find 'optimizer/nope'. Available: adam, adamw, rmsprop, sgd"),
        ("trainer.epoch=3", "error: trainer.epoch: Key 'epoch' not in 'TrainerConfig'"),
        ("dataset.batch_size=0", "error: dataset.batch_size must be >= 1. Received: 0"),
    ],
)
def test_cli_refuses_bad_config_in_one_line(override: str, message: str, tmp_path: Path) -> None:
    result = run_module("pipeline.train", override, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "mlflow.db").exists(), "a refused config must not create runs"


def test_hydra_full_error_restores_the_traceback(tmp_path: Path) -> None:
    result = run_module("pipeline.train", "optimizer.lr=-1", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"}, timeout=120)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "optimizer.lr must be > 0" in result.stderr
