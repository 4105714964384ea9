"""Experiments on the detector: datasets, cached feature extraction, training, evaluation, calibration, plots.

Imports `pipeline.core`; the core never imports the lab.
"""
