"""Model families, one file each. Every module exports
`build(input_spec: InputSpec, *, <hyperparameters>) -> keras.Model`, selected in
`conf/architecture/NAME.yaml` by `_target_: architectures.NAME.build`.

Every model takes the dataset's raw images (e.g. uint8) and rescales them itself, so an
exported model needs none of this project's code to serve predictions.
"""

from architectures.common import InputSpec

__all__ = ["InputSpec"]
