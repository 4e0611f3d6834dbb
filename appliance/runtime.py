"""Process-wide threading setup for the native runtimes that share two cores.

OpenVINO, Numba and FAISS each have a thread pool. Numba's threading layer is
chosen when its first parallel kernel runs; importing OpenVINO first makes its
bundled TBB available, and Numba on TBB shares the scheduler with OpenVINO
instead of adding an OpenMP pool that spins beside it. NumPy's BLAS is kept to
one thread (FAISS's own BLAS runs in FAISS's OpenMP pool): its workers spin after
each product, and one small product per frame took the next backbone inference
from about 45 to 85 ms; code that wants parallel BLAS work splits it over its own
threads. Call ``configure`` before any kernel runs (``bundle.load_bundle`` and
``training.fit`` do).
"""

from __future__ import annotations

import faiss
import numba
import openvino  # noqa: F401 - imported first on purpose: provides libtbb for numba's TBB layer
from threadpoolctl import threadpool_limits

#: Numba threading layers in order of preference (tbb: shares OpenVINO's scheduler).
THREADING_LAYERS = ["tbb", "omp", "workqueue"]

numba.config.THREADING_LAYER_PRIORITY = THREADING_LAYERS


def configure(threads: int | None) -> None:
    """Use at most ``threads`` threads in Numba kernels and FAISS searches (``None``: all cores), one in BLAS."""
    threadpool_limits(1, user_api="blas")
    if threads:
        numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
        faiss.omp_set_num_threads(int(threads))
