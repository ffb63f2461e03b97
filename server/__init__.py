"""The aggregation server: Flower ServerApp, strategies, checkpoints and the run's history."""
