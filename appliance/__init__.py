"""Anomaly appliance: visual anomaly detection for production lines, torch-free at run time."""

__version__ = "0.1.0"
