"""Training: one shared step (step.py) for pre-training and tuning, and their loops."""
