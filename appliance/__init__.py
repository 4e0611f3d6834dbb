"""Anomaly appliance: visual anomaly detection for production lines, torch-free at run time."""

import os

__version__ = "0.1.0"

# FAISS's OpenMP threads otherwise spin after every search, and on a two-core machine that
# spinning steals the cores from the Numba kernel and the OpenVINO inference that come next
# (measured: a 50k-patch PatchCore search went from 47 ms to 13 ms per frame). It must be set
# before libgomp is loaded, hence here, before any submodule imports faiss.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
