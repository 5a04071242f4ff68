"""On-demand measurements that write the tables of docs/performance.md and docs/architectures.md.

Run each from the repository root as a module, e.g. `python -m benchmarks.overhead --docs`
(see each module's docstring). `benchmarks` is not installed with the project.
"""
