"""Canaries for the Keras internals the pipeline copies, overrides or calls.

`GuardedModel` (pipeline/training/guarded.py) is Keras 3.15's `TensorFlowTrainer.train_step`
and train function with additions, and it calls two `keras.src` helpers by name; the
early-stopping callback, the fused Adam, the optimizer's skipped all-reduce and the
keras#20585 fix copy or replace other Keras internals. pyproject.toml pins Keras to the
minor version these were read from; a Keras that changes any of them fails here,
naming the function, the file to revisit and what to re-check, instead of training
subtly differently. Like `tests/test_distribution.py::test_stock_keras_still_fails_multi_worker`
does for keras#20585, this says when our copy has to be looked at again. The Keras
internals read as attributes rather than copied (a layer's graph nodes, an optimizer's
schedule) are checked by behaviour in tests/test_private_api_canaries.py; both are
listed in docs/upgrading.md.

Each definition is hashed as Keras's source file has it (not the live attribute,
which `pipeline.training.keras_multiworker_fix` may have replaced), normalised with `ast`:
docstrings, comments and formatting do not count.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect

import keras
import pytest
from conftest import REPO

# The Keras release the copies were made from; its sources are at
# https://github.com/keras-team/keras/blob/v3.15.1/keras/src/backend/tensorflow/trainer.py
CHECKED_KERAS = "3.15.1"

GUARDED = "pipeline/training/guarded.py"
EARLY_STOPPING = "callbacks/early_stopping.py"
MULTIWORKER_FIX = "pipeline/training/keras_multiworker_fix.py"
OPTIM = "pipeline/training/optim.py"
CROSS_REPLICA = "pipeline/training/cross_replica.py"

# (module, qualified name) -> (sha256 of the normalised definition, the file that depends on
# it, how, what to re-check).
KERAS_INTERNALS = {
    ("keras.src.backend.tensorflow.trainer", "TensorFlowTrainer.train_step"): (
        "5e61593806fc57ea3720da658ddba86e74137d9711fa4fcdbf5a1cb8853e74d9", GUARDED,
        "GuardedModel.train_step / _guarded_step (a copy, plus the gradient-norm and finite checks; it reads "
        "the model's `_loss_tracker` as this does)",
        "port any change of the forward pass, loss, loss tracking, loss scaling or update into the copy",
    ),
    ("keras.src.backend.tensorflow.trainer", "TensorFlowTrainer._make_function"): (
        "e2b6b51a4798f5b7adf939b1adda46e57a3302f2cb0b90a3fb7a077481471ca4", GUARDED,
        "GuardedModel.make_train_function (a copy whose executions stop at the epoch's last batch)",
        "port any change of how a step is run, reduced and compiled (tf.function options) into the copy",
    ),
    ("keras.src.backend.tensorflow.trainer", "TensorFlowTrainer.make_train_function"): (
        "901acf9e6900ffb3713bd972377aeff8b2cb98780a417a1006c28573730d4d50", GUARDED,
        "GuardedModel.make_train_function (overrides it, and calls it when steps_per_epoch is None)",
        "check the override still caches `train_function` and is called the same way by fit",
    ),
    ("keras.src.backend.tensorflow.trainer", "reduce_per_replica"): (
        "5fd739f8492922de29e51038fd987edcb0589b1e5710eac534b7e93bd2c1d780", GUARDED,
        "GuardedModel.make_train_function (calls it by name; pipeline/training/keras_multiworker_fix.py wraps it)",
        "check its arguments and reductions are what the copy of the train function passes and expects",
    ),
    ("keras.src.losses.loss", "unscale_loss_for_distribution"): (
        "57254718682ae41226f72bba98f39f90676a9ae39fb2ae02572f29fd28d90f90", GUARDED,
        "GuardedModel._guarded_step (the loss tracker's update, as Keras's own step does it)",
        "check the loss the copy reports per step is still the one Keras's own train step reports",
    ),
    ("keras.src.backend.tensorflow.trainer", "TensorFlowTrainer._maybe_symbolic_build"): (
        "e6b142865da81cff09401f99c5964b917d1e551bd36500081953a552ea205e83", MULTIWORKER_FIX,
        "replaced by a copy that keeps a PerReplica batch whole (keras#20585), under multi_worker only",
        "port the change into the replacement, or drop the fix if test_stock_keras_still_fails_multi_worker fails",
    ),
    ("keras.src.backend.tensorflow.trainer", "_collective_all_reduce_multi_worker"): (
        "ccada3b54a0504cd5a10aae7f55fb2e1bad4912b15adbf3797403ca329e54e0c", MULTIWORKER_FIX,
        "the wrapped reduce_per_replica calls it to tell a multi-worker strategy",
        "check it still says whether the strategy is MultiWorkerMirroredStrategy over several workers",
    ),
    ("keras.src.backend.tensorflow.optimizer", "TFOptimizer._backend_update_step"): (
        "291ade074e043726c53ecdd952958ba871936fd88bc50da3c2de5380ac259dbc", CROSS_REPLICA,
        "skip_optimizer_all_reduce replaces `_all_reduce_sum_gradients`, which this calls before every update",
        "check the optimizer still all-reduces through that one method (else gradients are summed twice)",
    ),
    ("keras.src.backend.tensorflow.optimizer", "TFOptimizer._all_reduce_sum_gradients"): (
        "46a9bff35520b640ae5dbeaddf214e138eaf09c8056de2991d5e4b9c92226fe9", CROSS_REPLICA,
        "replaced per optimizer instance by `list`: the train step all-reduces the gradients itself",
        "check the replacement still returns what this returns, (gradient, variable) pairs",
    ),
    ("keras.src.optimizers.adam", "Adam.build"): (
        "d420a67bc8d699213b5b6594800594e82198c5304ecb3427ea2657439b2c328d", OPTIM,
        "the fused Adam reads the slots it creates, `_momentums` and `_velocities`",
        "check the slots are still one momentum and one velocity per variable, in `_get_variable_index` order",
    ),
    ("keras.src.optimizers.adam", "Adam.update_step"): (
        "a6760d36acae4b892739d51d1c63d62a13f39f5300f57592dd2f2a0e792f2c33", OPTIM,
        "the fused Adam (ResourceApplyAdam) must compute this update; tests/test_optim.py compares the two",
        "check the update is still Adam's and run tests/test_optim.py",
    ),
    ("keras.src.optimizers.base_optimizer", "BaseOptimizer._get_variable_index"): (
        "092557a0b0e159edc644774c287890f35ac03ac53956777428c45573d1279f23", OPTIM,
        "the fused Adam finds a variable's slots with it, as Adam.update_step does",
        "check it still maps a variable to its index in the slot lists",
    ),
    ("keras.src.callbacks.early_stopping", "EarlyStopping.on_epoch_end"): (
        "4d01c25ece02431056a2165aab21f7f3e23b20d878208aca47b5cfb73af69ab3", EARLY_STOPPING,
        "EarlyStopping.on_epoch_end (a copy that keeps the best weights in variables)",
        "port the change into the copy",
    ),
    ("keras.src.callbacks.early_stopping", "EarlyStopping.on_train_end"): (
        "be186e82912d47a58ced4e56394756fd3210aa8636dfb74898de622359bd228a", EARLY_STOPPING,
        "EarlyStopping.on_train_end (a copy that restores the best weights from variables)",
        "port the change into the copy, its printed lines included",
    ),
    ("keras.src.callbacks.monitor_callback", "MonitorCallback._set_monitor_op"): (
        "6eed2de58c026937f0b9d81b5ae89a955fa41de08338f92030cf551492b40636", EARLY_STOPPING,
        "EarlyStopping.on_epoch_end calls it, as Keras's does, and `improves` relies on what it sets "
        "(`monitor_op` is keras.ops.less or keras.ops.greater; `min_delta` negative for less)",
        "check `improves` still decides as `_is_improvement` does",
    ),
    ("keras.src.callbacks.monitor_callback", "MonitorCallback._is_improvement"): (
        "51081cd1346c2e132ee4f0755a230b28a74fc17fa86b99599c581c78c8d584bf", EARLY_STOPPING,
        "EarlyStopping.improves (the same decision in Python, without an eager op)",
        "port the change into `improves`",
    ),
}


def definition(module_name: str, qualname: str, user: str = GUARDED) -> ast.AST:
    """The `def` of `qualname` (e.g. `Class.method`) in the source file of `module_name`
    (`user`: the file of ours that depends on it, for the message)."""
    scope: ast.AST = ast.parse(inspect.getsource(importlib.import_module(module_name)))
    for name in qualname.split("."):
        found = [node for node in ast.iter_child_nodes(scope)
                 if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name]
        if not found:
            pytest.fail(f"keras {keras.__version__}: {module_name} has no {qualname} any more; "
                        f"{user} depends on it (written against Keras {CHECKED_KERAS})")
        scope = found[-1]  # the last definition wins, as at import
    return scope


def normalised(node: ast.AST) -> str:
    """The definition's code without docstrings, comments or formatting."""
    for inner in ast.walk(node):
        body = getattr(inner, "body", None)
        if (isinstance(inner, (ast.FunctionDef, ast.ClassDef)) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            inner.body = body[1:] or [ast.Pass()]
    return ast.unparse(node)


@pytest.mark.parametrize(("module_name", "qualname"), list(KERAS_INTERNALS), ids=[q for _, q in KERAS_INTERNALS])
def test_copied_keras_internals_are_unchanged(module_name: str, qualname: str) -> None:
    expected, user, used_by, recheck = KERAS_INTERNALS[module_name, qualname]
    digest = hashlib.sha256(normalised(definition(module_name, qualname, user)).encode()).hexdigest()
    assert digest == expected, (
        f"keras {keras.__version__} changed {module_name}.{qualname} (sha256 {digest}, was {expected} in Keras "
        f"{CHECKED_KERAS}). Revisit {user}, written against Keras {CHECKED_KERAS}: {used_by}. Compare the new "
        f"source with Keras {CHECKED_KERAS}'s, {recheck}, run the tests of {user} (tests/test_guarded.py and "
        "tests/test_distribution.py for the train step), then update the hash here and the keras pin in "
        "pyproject.toml.")


def test_every_file_relying_on_keras_internals_is_in_the_upgrading_guide() -> None:
    """docs/upgrading.md's table names each internal and gives each file a row that names this canary."""
    guide = (REPO / "docs" / "upgrading.md").read_text()
    rows = [line for line in guide.splitlines() if line.startswith("|") and "test_keras_canary.py" in line]
    users = {user for _, user, _, _ in KERAS_INTERNALS.values()}
    missing = sorted(user for user in users if not any(user in row for row in rows))
    assert not missing, f"docs/upgrading.md has no row naming tests/test_keras_canary.py for {missing}"
    unnamed = [f"{m}.{q}" for m, q in KERAS_INTERNALS if not any(q.rpartition(".")[2] in row for row in rows)]
    assert not unnamed, f"docs/upgrading.md does not name {unnamed}"
