"""Keras callbacks of the pipeline, one file each.

User-selectable callbacks are configured in `conf/callbacks/` by `_target_`; the
pipeline adds `MLflowEpochLogger` to every run itself.
"""
