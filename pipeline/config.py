"""Typed schema of `conf/` and the checks that run before TensorFlow does any work.

The dataclasses here only declare keys and types; the values and their reasons live in
the YAML files under `conf/`. Every group option pulls its schema in through its
defaults list (e.g. `/optimizer_sgd_schema@_here_`), so a wrong type or an unknown key
is refused by Hydra while composing. `validate` then checks what types cannot express
(ranges, choices, importable targets) and raises a one-line `ConfigError`.
"""

from __future__ import annotations

import importlib
import inspect
import math
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from pipeline import quiet
from pipeline.errors import ConfigError, one_line
from pipeline.training import distribute

# "mixed" picks mixed_float16 (with loss scaling) on a GPU and mixed_bfloat16 otherwise.
PRECISION_POLICIES = ("float32", "mixed", "mixed_bfloat16", "mixed_float16")
LR_SCHEDULES = ("constant", "cosine")
# Keys of an architecture config that go to `model.compile`, not to its builder.
RESERVED_ARCHITECTURE_KEYS = ("compile",)
# Keys of a dataset config that `pipeline.data` reads (batching, shuffling, caching),
# not the dataset kind its `_target_` names.
RESERVED_DATASET_KEYS = ("batch_size", "shuffle_buffer", "cache", "inject_nan_at_step")
CACHE_MODES = ("memory", "disk", "none")
# dataset.cache was a boolean before `disk` existed: configs recorded then, and the
# habit of typing it, still mean what they meant.
CACHE_ALIASES = {"true": "memory", "false": "none"}
DEBUG_MODES = ("smoke", "overfit", "limit", "profile")


@dataclass
class DatasetConfig:
    """What every dataset kind has: `pipeline.data` reads these (`RESERVED_DATASET_KEYS`
    and `val_fraction`), the kind (`_target_`) the rest."""

    _target_: str = MISSING
    name: str = MISSING
    batch_size: int = MISSING
    val_fraction: float = MISSING
    shuffle_buffer: int = MISSING
    cache: str = MISSING
    inject_nan_at_step: Optional[int] = MISSING


@dataclass
class TfdsDatasetConfig(DatasetConfig):
    data_dir: Optional[str] = MISSING
    prepare: bool = MISSING
    image_key: Optional[str] = MISSING
    label_key: Optional[str] = MISSING
    image_size: Optional[List[int]] = MISSING


@dataclass
class ImageFolderConfig(DatasetConfig):
    path: str = MISSING
    image_size: Optional[List[int]] = MISSING
    channels: int = MISSING
    test_fraction: float = MISSING
    on_bad_file: str = MISSING
    data_dir: Optional[str] = MISSING


@dataclass
class CsvConfig(DatasetConfig):
    path: str = MISSING
    label: str = MISSING
    drop: List[str] = MISSING
    categorical: List[str] = MISSING
    test_fraction: float = MISSING
    on_missing: str = MISSING


@dataclass
class OptimizerConfig:
    _target_: str = MISSING
    lr: float = MISSING
    schedule: str = MISSING
    warmup_epochs: int = MISSING
    min_lr_ratio: float = MISSING
    global_clipnorm: Optional[float] = MISSING


@dataclass
class AdamConfig(OptimizerConfig):
    beta_1: float = MISSING
    beta_2: float = MISSING
    epsilon: float = MISSING


@dataclass
class AdamWConfig(AdamConfig):
    weight_decay: float = MISSING


@dataclass
class SGDConfig(OptimizerConfig):
    momentum: float = MISSING
    nesterov: bool = MISSING


@dataclass
class RMSpropConfig(OptimizerConfig):
    rho: float = MISSING
    momentum: float = MISSING
    epsilon: float = MISSING


@dataclass
class PrecisionConfig:
    policy: str = MISSING


@dataclass
class TrainerConfig:
    epochs: int = MISSING
    steps_per_execution: int = MISSING
    jit_compile: bool = MISSING
    verbose: int = MISSING


@dataclass
class MLflowConfig:
    tracking_uri: Optional[str] = MISSING
    experiment_name: str = MISSING
    run_name: Optional[str] = MISSING
    log_model: bool = MISSING
    registered_model_name: Optional[str] = MISSING
    champion_alias: str = MISSING
    champion_metric: str = MISSING
    champion_mode: str = MISSING
    champion_min_delta: float = MISSING


@dataclass
class DistributionConfig:
    kind: str = MISSING
    logical_cpus: Optional[int] = MISSING
    timeout_seconds: float = MISSING


@dataclass
class DebugConfig:
    mode: str = MISSING
    limit_batches: Optional[int] = None
    limit_fraction: Optional[float] = None
    overfit_steps: Optional[int] = None


@dataclass
class TrainConfig:
    seed: int = MISSING
    optimized_metric: str = MISSING
    resume: Optional[str] = None
    reproduce: Optional[str] = None
    determinism: bool = False
    # One of the dataset kinds above (TfdsDatasetConfig, ImageFolderConfig, CsvConfig):
    # each option of the group pulls in its own schema.
    dataset: Any = MISSING
    # Architectures differ in their hyperparameters; `validate` checks them against the
    # builder's own keyword arguments instead.
    architecture: Dict[str, Any] = MISSING
    optimizer: OptimizerConfig = MISSING
    precision: PrecisionConfig = MISSING
    trainer: TrainerConfig = MISSING
    # name -> `_target_` config of a Keras callback; null drops one.
    callbacks: Dict[str, Any] = field(default_factory=dict)
    mlflow: MLflowConfig = MISSING
    # none | mirrored | multi_worker (conf/distribution/, pipeline/training/distribute.py)
    distribution: DistributionConfig = MISSING
    # debug=smoke|overfit|limit (conf/debug/) shrinks the data, debug=profile traces steps; null trains normally.
    debug: Optional[DebugConfig] = None
    # augment=flip_crop|light|custom (conf/augment/, pipeline/augment.py); options differ in
    # their keys, which `validate` checks against the augmentation's own arguments.
    augment: Optional[Dict[str, Any]] = None


@dataclass
class EvaluateConfig:
    model: str = MISSING
    split: str = MISSING
    dataset: Any = MISSING
    mlflow: MLflowConfig = MISSING
    log_run: bool = MISSING


def cache_mode(value: Any) -> str:
    """`dataset.cache` as one of `CACHE_MODES` (true and false: memory and none)."""
    mode = str(value).strip().lower()
    return CACHE_ALIASES.get(mode, mode)


# The name a dataset of files gets by default: `${basename:${.path}}` for a folder,
# `${stem:${.path}}` for a file (conf/dataset/image_folder.yaml, csv.yaml).
OmegaConf.register_new_resolver("basename", lambda path: Path(str(path).rstrip("/\\")).expanduser().name,
                                replace=True)
OmegaConf.register_new_resolver("stem", lambda path: Path(str(path)).expanduser().stem, replace=True)


def register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="evaluate_schema", node=EvaluateConfig)
    # Stored outside any group, so `--help` lists only the options users pick from.
    for name, node in [
        ("dataset_tfds_schema", TfdsDatasetConfig),
        ("dataset_image_folder_schema", ImageFolderConfig),
        ("dataset_csv_schema", CsvConfig),
        ("optimizer_adam_schema", AdamConfig),
        ("optimizer_adamw_schema", AdamWConfig),
        ("optimizer_sgd_schema", SGDConfig),
        ("optimizer_rmsprop_schema", RMSpropConfig),
        ("precision_schema", PrecisionConfig),
        ("trainer_schema", TrainerConfig),
        ("mlflow_schema", MLflowConfig),
        ("distribution_schema", DistributionConfig),
    ]:
        store.store(name=name, node=node)


register_schemas()


def compose_with_hydra(overrides: Sequence[str] = (), config_name: str = "train") -> tuple[DictConfig, DictConfig]:
    """Compose `conf/<config_name>.yaml` with `overrides` as `@hydra.main` would; return
    the job's own config and Hydra's node (group choices, overrides, job) apart."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    hydra_node = cfg.hydra
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, hydra_node


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The job's config alone, composed as `@hydra.main` would (tests, notebooks); a
    training run's whole plan is `pipeline.plan.compose`."""
    return compose_with_hydra(overrides, config_name)[0]


def validate(cfg: DictConfig) -> None:
    """Check a composed training config; raise `ConfigError` naming the first bad key.
    The value checks run in pure Python first; then the `_target_`s are imported (and
    TensorFlow with them). No data is read, no model built.
    """
    for key, what in (("path", "the folder of images or the CSV file"), ("label", "the column to predict"),
                      ("name", "the TFDS dataset's name")):
        # Before resolving `name`, which may derive from them (`in` is False for a missing value).
        if key in cfg.dataset.keys() and OmegaConf.is_missing(cfg.dataset, key):
            raise ConfigError(f"dataset.{key} is missing: give {what}, e.g. dataset.{key}=...")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        raise ConfigError(f"{error.full_key} is missing: give it a value") from None
    except InterpolationResolutionError as error:  # e.g. ${oc.env:NAME} of an unset variable
        # "KeyError raised while resolving interpolation: "Environment variable 'X' not found"" -> the quoted part
        reason = str(error.msg).strip().splitlines()[0].split("while resolving interpolation: ", 1)[-1].strip('"')
        raise ConfigError(f"{error.full_key}: {one_line(reason)}") from None

    _check(cfg, "seed", lambda v: v >= 0, "must be >= 0")
    _check(cfg, "dataset.batch_size", lambda v: v >= 1, "must be >= 1")
    _check(cfg, "dataset.val_fraction", lambda v: 0 <= v < 1, "must be in [0, 1)")
    _check(cfg, "dataset.shuffle_buffer", lambda v: v >= 1, "must be >= 1")
    _check(cfg, "dataset.inject_nan_at_step", lambda v: v is None or v >= 0, "must be >= 0 or null")
    _check(cfg, "dataset.cache", lambda v: cache_mode(v) in CACHE_MODES, f"must be one of {CACHE_MODES}")
    _check(cfg, "dataset.name", lambda v: bool(str(v).strip()), "must not be empty")
    _check(cfg, "trainer.epochs", lambda v: v >= 1, "must be >= 1")
    _check(cfg, "trainer.steps_per_execution", lambda v: v >= 1, "must be >= 1")
    _check(cfg, "trainer.verbose", lambda v: v in (0, 1, 2), "must be 0, 1 or 2")
    _check(cfg, "optimizer.lr", lambda v: v > 0 and math.isfinite(v), "must be > 0")
    _check(cfg, "optimizer.schedule", lambda v: v in LR_SCHEDULES, f"must be one of {LR_SCHEDULES}")
    _check(cfg, "optimizer.warmup_epochs", lambda v: 0 <= v < cfg.trainer.epochs,
           "must be >= 0 and < trainer.epochs")
    _check(cfg, "optimizer.min_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]")
    _check(cfg, "optimizer.global_clipnorm", lambda v: v is None or v > 0, "must be > 0 or null")
    for key, ok, rule in [  # keys that only some optimizers have
        ("momentum", lambda v: 0 <= v < 1, "must be in [0, 1)"),
        ("beta_1", lambda v: 0 <= v < 1, "must be in [0, 1)"),
        ("beta_2", lambda v: 0 <= v < 1, "must be in [0, 1)"),
        ("rho", lambda v: 0 <= v < 1, "must be in [0, 1)"),
        ("epsilon", lambda v: v > 0, "must be > 0"),
        ("weight_decay", lambda v: v >= 0, "must be >= 0"),
    ]:
        if key in cfg.optimizer:
            _check(cfg, f"optimizer.{key}", ok, rule)
    _check(cfg, "precision.policy", lambda v: v in PRECISION_POLICIES,
           f"must be one of {PRECISION_POLICIES}")
    _check(cfg, "mlflow.experiment_name", lambda v: bool(v.strip()), "must not be empty")
    # MLflow's stores keep experiment names in a 256-character column.
    _check(cfg, "mlflow.experiment_name", lambda v: len(v) <= 256, "must be at most 256 characters")
    _check_registered_model_name(cfg)
    _check(cfg, "mlflow.champion_alias", lambda v: v.strip() and v != "latest",
           "must be a non-empty alias other than 'latest' (MLflow reserves it)")
    _check(cfg, "mlflow.champion_mode", lambda v: v in ("max", "min"), "must be 'max' or 'min'")
    _check(cfg, "mlflow.champion_min_delta", lambda v: v >= 0 and math.isfinite(v), "must be >= 0")
    _check(cfg, "mlflow.champion_metric", lambda v: not v.startswith("test_"),
           "must not be a test metric: choosing on the test split biases its estimate (use final_val_*)")

    if cfg.get("debug") is not None:
        _check(cfg, "debug.mode", lambda v: v in DEBUG_MODES, f"must be one of {DEBUG_MODES}")
        _check(cfg, "debug.limit_batches", lambda v: v is None or v >= 1, "must be >= 1 or null")
        _check(cfg, "debug.limit_fraction", lambda v: v is None or 0 < v <= 1, "must be in (0, 1] or null")
        _check(cfg, "debug.overfit_steps", lambda v: v is None or v >= 1, "must be >= 1 or null")

    distribute.validate(cfg.get("distribution"))

    quiet.import_tensorflow()  # the targets' modules import it: without its CUDA probing on a CPU-only machine
    _check_target(cfg, "optimizer")
    _check_dataset(cfg)
    _check_augment(cfg)
    builder = _check_target(cfg, "architecture")
    _check_keywords(cfg, "architecture", builder, runtime_args=1)
    if cfg.architecture.get("members") is not None:  # ensembles: before any data is read
        from architectures.members import check_members

        member_overrides = cfg.architecture.get("member_overrides")
        try:
            check_members(list(cfg.architecture.members), {} if member_overrides is None else
                          OmegaConf.to_container(member_overrides, resolve=True))
        except ValueError as error:
            raise ConfigError(f"architecture.{error}") from None
    compile_args = cfg.architecture.get("compile")
    if compile_args is not None and not (isinstance(compile_args, DictConfig) and "loss" in compile_args):
        raise ConfigError(f"architecture.compile must be a mapping with a `loss`. Received: {compile_args!r}")
    for key, value in cfg.architecture.items():
        if "dropout" in str(key) and not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise ConfigError(f"architecture.{key} must be in [0, 1). Received: {value!r}")
    for name, callback in cfg.callbacks.items():
        if callback is not None:
            callback_class = _check_target(cfg.callbacks, name, prefix="callbacks.")
            _check_keywords(cfg.callbacks, name, callback_class, runtime_args=0, prefix="callbacks.")
    if cfg.dataset.val_fraction == 0:
        monitors = [str(c.get("monitor", "")) for c in cfg.callbacks.values() if c is not None]
        needs_val = [m for m in [cfg.optimized_metric, *monitors] if "val_" in m]
        if needs_val:
            raise ConfigError(f"dataset.val_fraction must be > 0: {', '.join(needs_val)} needs a validation set. "
                              "Received: 0.0")


def dataset_arguments(dataset: DictConfig) -> dict[str, Any]:
    """The keys of a `dataset` config that its kind (`_target_`) takes: all but
    `RESERVED_DATASET_KEYS`, which `pipeline.data` reads."""
    return {key: value for key, value in OmegaConf.to_container(dataset, resolve=True).items()
            if key not in RESERVED_DATASET_KEYS and not str(key).startswith("_")}


def _check_dataset(cfg: DictConfig) -> None:
    """The dataset kind can be built from its keys (no data is read): a bad value is
    refused by the kind's own checks, in one line."""
    if not cfg.dataset.get("_target_"):  # a config recorded before kinds were named: TFDS
        return
    kind = _check_target(cfg, "dataset")
    _check_keywords(cfg, "dataset", kind, runtime_args=0, reserved=RESERVED_DATASET_KEYS)
    try:
        kind(**dataset_arguments(cfg.dataset))
    except ValueError as error:
        raise ConfigError(f"dataset.{error}") from None


def _check_augment(cfg: DictConfig) -> None:
    """The augmentation's keys are its arguments, and its values it accepts."""
    augment = cfg.get("augment")
    if augment is None or not augment.get("_target_"):
        return
    augmentation = _check_target(cfg, "augment")
    _check_keywords(cfg, "augment", augmentation, runtime_args=0)
    from pipeline import augment as augment_module

    augment_module.from_config(augment)  # builds the layers of augment=custom too


def model_name_problem(name: str) -> str | None:
    """Why MLflow's model registry refuses `name`, or None: the rules of
    `mlflow.utils.validation._validate_model_name` (MLflow 3.17), mirrored rather than
    imported, which would import MLflow before training (about a second of start-up);
    tests/test_private_api_canaries.py checks that the two agree."""
    if not name.strip():
        return "it is empty"
    if "/" in name or ":" in name:
        return "names cannot contain '/' or ':'"
    resolved = posixpath.normpath(name)  # the registry may use a name as a path
    if resolved != name or resolved == "." or resolved.startswith(("..", "/")):
        return f"as a path it resolves to {resolved!r}"
    return None


def _check_registered_model_name(cfg: DictConfig) -> None:
    """The name a run registers its model under, as MLflow will check it after training:
    `mlflow.registered_model_name`, else `{dataset.name}-{architecture}` when a model is logged."""
    name = cfg.mlflow.registered_model_name
    if name is not None:
        problem = model_name_problem(name)
        if problem:
            raise ConfigError(f"mlflow.registered_model_name: MLflow refuses the name {name!r}: {problem}")
    elif cfg.mlflow.log_model and "." in str(cfg.architecture.get("_target_") or ""):  # else: refused below
        # As tracking.registered_model_name names it; the architecture's group option is its module's name.
        default = f"{cfg.dataset.name}-{str(cfg.architecture._target_).split('.')[-2]}"
        problem = model_name_problem(default)
        if problem:
            raise ConfigError(f"mlflow.registered_model_name: MLflow refuses the default name {default!r} "
                              f"(dataset.name-architecture): {problem}; set mlflow.registered_model_name")


def _check(cfg: DictConfig, key: str, ok: Callable[[Any], Any], rule: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not ok(value):
        raise ConfigError(f"{key} {rule}. Received: {one_line(repr(value), 200)}")


def _check_target(cfg: DictConfig, key: str, prefix: str = "") -> Callable[..., Any]:
    """Import `<key>._target_` and return it; a typo fails here, not deep in Hydra."""
    node = cfg[key]
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not target:
        raise ConfigError(f"{prefix}{key}._target_ is missing: name the class or builder to use")
    module_name, _, attribute = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{prefix}{key}._target_ cannot be imported. Received: {target!r}") from None


def _check_keywords(
    cfg: DictConfig, key: str, function: Callable[..., Any], runtime_args: int, prefix: str = "",
    reserved: Sequence[str] = RESERVED_ARCHITECTURE_KEYS,
) -> None:
    """Refuse keys that `function` (a builder or a class) does not accept, naming the key;
    `reserved` keys are read by the pipeline itself."""
    parameters = list(inspect.signature(function).parameters.values())[runtime_args:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = {p.name for p in parameters}
    for name in cfg[key]:
        if not str(name).startswith("_") and name not in accepted and name not in reserved:
            raise ConfigError(
                f"{prefix}{key}.{name} is not an argument of {cfg[key]._target_}. "
                f"Accepted: {', '.join(sorted(accepted))}"
            )
