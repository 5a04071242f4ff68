"""On-demand measurements that write the tables of docs/performance.md and docs/architectures.md.

Run each from the repository root as a module, e.g. `python -m benchmarks.overhead --docs`
(see each module's docstring). `benchmarks` is not installed with the project.

Every `python -m benchmarks.NAME` imports this package first, which imports TensorFlow
the way the entry points do (`pipeline.quiet`): without its CUDA-probing lines on a
machine with no GPU, `--help` included.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the benchmarks' own default: no C++ INFO lines

from pipeline import quiet  # noqa: E402

quiet.import_tensorflow()
