"""Hydra finds sweepers only under the `hydra_plugins` namespace: this package holds the
project's own, `hparams_search=optuna` (conf/hparams_search/optuna.yaml)."""
