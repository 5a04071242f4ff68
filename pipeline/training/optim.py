"""Build the Keras optimizer and learning-rate schedule from the `optimizer` config group."""

from __future__ import annotations

import keras
import tensorflow as tf
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

# Keys of the `optimizer` group that shape the schedule; all others go to the class.
SCHEDULE_KEYS = ("_target_", "lr", "schedule", "warmup_epochs", "min_lr_ratio")


def learning_rate(
    cfg: DictConfig, steps_per_epoch: int, epochs: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """`cfg.lr` as a constant, or a (warmed-up) cosine decay over the whole run.

    Steps are optimizer updates: `steps_per_epoch * epochs` in total.
    """
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    if cfg.schedule == "constant" and warmup_steps == 0:
        return float(cfg.lr)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else float(cfg.lr),
        warmup_target=float(cfg.lr) if warmup_steps else None,
        warmup_steps=warmup_steps,
        decay_steps=max(steps_per_epoch * epochs - warmup_steps, 1),
        # alpha=1 keeps the rate flat after a warmup: "constant" with warmup.
        alpha=1.0 if cfg.schedule == "constant" else float(cfg.min_lr_ratio),
    )


@keras.saving.register_keras_serializable(package="pipeline")
class ScaledLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """`base` (a rate or a schedule) times `scale`, a variable that a rollback lowers
    while training runs (`callbacks.grad_norm`)."""

    def __init__(self, base: float | keras.optimizers.schedules.LearningRateSchedule, scale) -> None:
        self.base = base
        self.scale = scale

    def __call__(self, step):
        rate = self.base(step) if callable(self.base) else self.base
        return keras.ops.cast(rate, "float32") * keras.ops.cast(self.scale, "float32")

    def get_config(self) -> dict:
        base = self.base if isinstance(self.base, float) else keras.saving.serialize_keras_object(self.base)
        return {"base": base, "scale": float(keras.ops.convert_to_numpy(self.scale))}

    @classmethod
    def from_config(cls, config: dict) -> ScaledLearningRate:
        base = config["base"]
        return cls(base if isinstance(base, float) else keras.saving.deserialize_keras_object(base), config["scale"])


@keras.saving.register_keras_serializable(package="pipeline")
class Adam(keras.optimizers.Adam):
    """`keras.optimizers.Adam`: the same arguments, variables and update, applied by
    TensorFlow's fused `ResourceApplyAdam` kernel, one pass over each variable, instead of
    Keras's separate element-wise ops (about a tenth of a small model's step on CPU:
    `benchmarks/`). Keras's own update runs for `amsgrad`, under a tf.distribute strategy
    (each replica's copy of the slots is Keras's to address) and on other backends.

    Keras computes `m += (g - m)(1 - b1)`, `v += (g^2 - v)(1 - b2)` and
    `w -= m lr sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(v) + eps)`; so does the kernel.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._fused = keras.backend.backend() == "tensorflow" and not tf.distribute.has_strategy()

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or not self._fused:
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(self._momentums[index]), v=_handle(self._velocities[index]),
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype),
            beta1=beta_1, beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype),
        )


def _handle(variable) -> tf.Tensor:
    """The resource handle of a Keras variable, or of the tf.Variable Keras passes in."""
    return (variable.value if isinstance(variable, keras.Variable) else variable).handle


def build(cfg: DictConfig, steps_per_epoch: int, epochs: int, lr_scale=None) -> keras.optimizers.Optimizer:
    """Instantiate `cfg._target_` (any `keras.optimizers` class) with its own options;
    with `lr_scale` (a variable), the learning rate is multiplied by it at every step."""
    options = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in SCHEDULE_KEYS}
    if options.get("global_clipnorm") is None:
        options.pop("global_clipnorm", None)
    optimizer_class = get_class(cfg._target_)
    rate = learning_rate(cfg, steps_per_epoch, epochs)
    if lr_scale is not None:
        rate = ScaledLearningRate(rate, lr_scale)
    return optimizer_class(learning_rate=rate, **options)


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The rate the next update will use (evaluates a schedule at the current step)."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
