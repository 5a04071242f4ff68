"""Model families, one file each. Every module exports
`build(input_spec: InputSpec, *, <hyperparameters>) -> keras.Model`, selected in
`conf/architecture/NAME.yaml` by `_target_: architectures.NAME.build`. A module whose
model takes image and numeric `features` inputs with several labels also sets
`MULTIMODAL = True`.

Every model takes the dataset's raw images (e.g. uint8) and rescales them itself, so an
exported model needs none of this project's code to serve predictions. Importing this
package registers the custom layers and models with Keras, so a saved `.keras` file of
any family loads after `import architectures`.
"""

from architectures import attention, custom_dense, subclassed, weighted_ensemble  # noqa: F401  (registration)
from architectures.common import InputSpec

__all__ = ["InputSpec"]
