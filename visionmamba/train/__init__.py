"""Training and evaluation: configs, one trainer base, classification and dense-prediction runs, metrics."""
