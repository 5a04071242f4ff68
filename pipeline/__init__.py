"""Training spine: config schema, data, optimizer, MLflow tracking and the entry points.

Entry points:
    python -m pipeline.train [overrides...]
    python -m pipeline.evaluate model=models:/NAME@ALIAS
"""
