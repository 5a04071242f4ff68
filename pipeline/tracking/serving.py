"""MLflow pyfunc that serves an exported Keras SavedModel with named inputs.

Logged as a model from code (`mlflow.pyfunc.log_model(python_model=<this file>)`): MLflow
copies this file into the model, so reloading it needs only TensorFlow and MLflow, none
of this project. Used where `mlflow.keras` cannot export: multi-input models (its
`serve` endpoint takes one positional tensor per input and would bind the second input
to `training`) and tables, whose model takes one input per column.

    model = mlflow.pyfunc.load_model("models:/synthetic_multimodal-multi_io@champion")
    model.predict({"image": uint8_images, "features": float32_features})
    # -> {"binary": (N, 1) float32, "category": (N, 3) float32}

    model = mlflow.pyfunc.load_model("models:/wine-mlp@champion")
    model.predict(pandas.read_csv("new_wines.csv"))   # -> (N, classes) float32
"""

import mlflow
import numpy as np


class SavedModelPredictor(mlflow.pyfunc.PythonModel):
    """Calls the SavedModel's `serve` endpoint with a dict of named input arrays, made
    from a DataFrame's columns for a table (`model_config["columns"]`: column name ->
    the model's input)."""

    def load_context(self, context):
        import tensorflow as tf

        self._model = tf.saved_model.load(context.artifacts["saved_model"])
        self._columns = dict((context.model_config or {}).get("columns") or {})

    def predict(self, context, model_input, params=None):
        import tensorflow as tf

        if self._columns:  # a table: a DataFrame of the CSV's columns, each a (N, 1) input
            inputs = {key: _column(model_input[name]) for name, key in self._columns.items()}
        else:
            inputs = {name: tf.convert_to_tensor(value) for name, value in model_input.items()}
        outputs = self._model.serve(inputs)
        if isinstance(outputs, dict):
            return {name: np.asarray(tensor) for name, tensor in outputs.items()}
        return np.asarray(outputs)


def _column(values):
    """One column as the model's (N, 1) input: text as strings, anything else as float32."""
    import tensorflow as tf

    values = np.asarray(values)
    if values.dtype.kind in "OSU":
        return tf.constant([["" if v is None else str(v)] for v in values], dtype=tf.string)
    return tf.constant(values.astype(np.float32).reshape(-1, 1))


mlflow.models.set_model(SavedModelPredictor())
