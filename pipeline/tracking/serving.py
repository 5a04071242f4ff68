"""MLflow pyfunc that serves an exported Keras SavedModel with named inputs and outputs.

Logged as a model from code (`mlflow.pyfunc.log_model(python_model=<this file>)`): MLflow
copies this file into the model, so reloading it needs only TensorFlow and MLflow, none
of this project. Used for multi-input models, which `mlflow.keras` cannot export: its
`serve` endpoint takes one positional tensor per input and would bind the second input
to `training`.

    model = mlflow.pyfunc.load_model("models:/synthetic_multimodal-multi_io@champion")
    model.predict({"image": uint8_images, "features": float32_features})
    # -> {"binary": (N, 1) float32, "category": (N, 3) float32}
"""

import mlflow
import numpy as np


class SavedModelPredictor(mlflow.pyfunc.PythonModel):
    """Calls the SavedModel's `serve` endpoint with a dict of named input arrays."""

    def load_context(self, context):
        import tensorflow as tf

        self._model = tf.saved_model.load(context.artifacts["saved_model"])

    def predict(self, context, model_input, params=None):
        import tensorflow as tf

        outputs = self._model.serve({name: tf.convert_to_tensor(value) for name, value in model_input.items()})
        return {name: np.asarray(tensor) for name, tensor in outputs.items()}


mlflow.models.set_model(SavedModelPredictor())
