"""The DVC pipeline: typed params, stage bodies, the sweep, MLflow tracking, report, CLI."""
