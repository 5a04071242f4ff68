"""Canaries for the Keras internals the pipeline's train step copies or calls.

`GuardedModel` (pipeline/training/guarded.py) is Keras 3.15's `TensorFlowTrainer.train_step`
and train function with additions, and it calls two `keras.src` helpers by name.
pyproject.toml pins Keras to the minor version these were read from; a Keras that
changes any of them fails here, naming the function, the copy and what to re-check,
instead of training subtly differently. Like
`tests/test_distribution.py::test_stock_keras_still_fails_multi_worker` does for
keras#20585, this says when our copy has to be looked at again.

Each definition is hashed as Keras's source file has it (not the live attribute,
which `pipeline.training.keras_multiworker_fix` may have replaced), normalised with `ast`:
docstrings, comments and formatting do not count.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
from pathlib import Path

import keras
import pytest

from pipeline.training.guarded import GuardedModel

# The Keras release the copies were made from; its sources are at
# https://github.com/keras-team/keras/blob/v3.15.1/keras/src/backend/tensorflow/trainer.py
CHECKED_KERAS = "3.15.1"

# (module, qualified name) -> (sha256 of the normalised definition, where we depend on it, what to re-check).
KERAS_INTERNALS = {
    ("keras.src.backend.tensorflow.trainer", "TensorFlowTrainer.train_step"): (
        "5e61593806fc57ea3720da658ddba86e74137d9711fa4fcdbf5a1cb8853e74d9",
        "GuardedModel.train_step / _guarded_step (a copy, plus the gradient-norm and finite checks)",
        "port any change of the forward pass, loss, loss tracking, loss scaling or update into the copy",
    ),
    ("keras.src.backend.tensorflow.trainer", "TensorFlowTrainer._make_function"): (
        "e2b6b51a4798f5b7adf939b1adda46e57a3302f2cb0b90a3fb7a077481471ca4",
        "GuardedModel.make_train_function (a copy whose executions stop at the epoch's last batch)",
        "port any change of how a step is run, reduced and compiled (tf.function options) into the copy",
    ),
    ("keras.src.backend.tensorflow.trainer", "TensorFlowTrainer.make_train_function"): (
        "901acf9e6900ffb3713bd972377aeff8b2cb98780a417a1006c28573730d4d50",
        "GuardedModel.make_train_function (overrides it, and calls it when steps_per_epoch is None)",
        "check the override still caches `train_function` and is called the same way by fit",
    ),
    ("keras.src.backend.tensorflow.trainer", "reduce_per_replica"): (
        "5fd739f8492922de29e51038fd987edcb0589b1e5710eac534b7e93bd2c1d780",
        "GuardedModel.make_train_function (calls it by name; pipeline/training/keras_multiworker_fix.py wraps it)",
        "check its arguments and reductions are what the copy of the train function passes and expects",
    ),
    ("keras.src.losses.loss", "unscale_loss_for_distribution"): (
        "57254718682ae41226f72bba98f39f90676a9ae39fb2ae02572f29fd28d90f90",
        "GuardedModel._guarded_step (the loss tracker's update, as Keras's own step does it)",
        "check the loss the copy reports per step is still the one Keras's own train step reports",
    ),
}


def definition(module_name: str, qualname: str) -> ast.AST:
    """The `def` of `qualname` (e.g. `Class.method`) in the source file of `module_name`."""
    scope: ast.AST = ast.parse(inspect.getsource(importlib.import_module(module_name)))
    for name in qualname.split("."):
        found = [node for node in ast.iter_child_nodes(scope)
                 if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name]
        if not found:
            pytest.fail(f"keras {keras.__version__}: {module_name} has no {qualname} any more; "
                        f"{copy_file()} depends on it (written against Keras {CHECKED_KERAS})")
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


def copy_file() -> str:
    """Where the copies live now (the module that defines `GuardedModel`)."""
    return str(Path(inspect.getsourcefile(GuardedModel)).relative_to(Path(__file__).resolve().parents[1]))


@pytest.mark.parametrize(("module_name", "qualname"), list(KERAS_INTERNALS), ids=[q for _, q in KERAS_INTERNALS])
def test_copied_keras_internals_are_unchanged(module_name: str, qualname: str) -> None:
    expected, used_by, recheck = KERAS_INTERNALS[module_name, qualname]
    digest = hashlib.sha256(normalised(definition(module_name, qualname)).encode()).hexdigest()
    assert digest == expected, (
        f"keras {keras.__version__} changed {module_name}.{qualname} (sha256 {digest}, was {expected} in Keras "
        f"{CHECKED_KERAS}). {copy_file()} depends on it: {used_by}. Compare the new source with Keras "
        f"{CHECKED_KERAS}'s, {recheck}, run tests/test_guarded.py and tests/test_distribution.py, then update "
        "the hash here and the keras pin in pyproject.toml.")
