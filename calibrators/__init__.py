"""Calibration data and statistics: text sources, reproducible windows, mergeable per-Linear
statistics, and the layer-wise calibrator that streams one decoder block at a time."""
