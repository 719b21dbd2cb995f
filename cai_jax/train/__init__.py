"""Training: train state and optimizer, one step function per objective, and the loops."""
