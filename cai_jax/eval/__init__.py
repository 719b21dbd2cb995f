"""Evaluations: multiple-choice evals, PM accuracy and calibration, Elo, Goodhart monitors."""
