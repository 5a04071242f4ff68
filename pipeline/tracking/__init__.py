"""Everything the pipeline writes to MLflow. The package re-exports the training run's
functions from `runs` (the connection to the store, what a training run records, and the
one place a run is opened and closed), so callers write `tracking.start_run(...)`. Its
other modules: `registry` (the SavedModel export and the champion alias), `provenance`
(code, command, libraries, data), `report` (figures and the `.keras` file of a run),
`sweep`, `sweep_job`, `sweep_resume` and `sweep_summary` (one parent run per Hydra
sweep), `optuna_*` (the Optuna search's study, trials and parent run), `model_card`, and
`serving` (the pyfunc model that serves multimodal SavedModels).
"""

from pipeline.tracking.runs import (
    MAX_PARAM_LENGTH,
    RunNames,
    close_orphans,
    connect,
    flatten,
    log_config,
    log_config_file,
    log_dataset,
    log_model_summary,
    registered_model_name,
    run_description,
    start_run,
)

__all__ = [
    "MAX_PARAM_LENGTH",
    "RunNames",
    "close_orphans",
    "connect",
    "flatten",
    "log_config",
    "log_config_file",
    "log_dataset",
    "log_model_summary",
    "registered_model_name",
    "run_description",
    "start_run",
]
