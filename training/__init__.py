"""Training and analysis of the predictive-coding network: pc-train and pc-analyze (docs/TRAINING.md)."""
