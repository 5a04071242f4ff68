"""On-demand measurements that write the README's performance and architecture tables.

Run each from the repository root as a module, e.g. `python -m benchmarks.overhead --readme`
(see each module's docstring). `benchmarks` is not installed with the project.
"""
