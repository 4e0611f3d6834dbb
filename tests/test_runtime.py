"""Process-wide threading: BLAS is kept to one thread (its spinning workers slow the backbone)."""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from appliance import runtime


def test_configure_keeps_blas_to_one_thread() -> None:
    np.ones((64, 64)) @ np.ones((64, 64))  # make sure NumPy's BLAS is loaded
    with threadpool_limits(2, user_api="blas"):  # whatever it was, configure sets it
        runtime.configure(2)
        # NumPy's BLAS; FAISS bundles its own, run by FAISS's OpenMP pool (``faiss.omp_set_num_threads``).
        blas = [p for p in threadpool_info() if p["user_api"] == "blas" and "faiss" not in p["filepath"]]
        assert blas and all(p["num_threads"] == 1 for p in blas)
