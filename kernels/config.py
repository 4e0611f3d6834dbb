"""Tuning constants shared by the kernels: one place to change them."""

#: fastmath lets LLVM reassociate the float sums in distance loops (vectorises them).
FASTMATH = True
#: Compile results are cached on disk (NUMBA_CACHE_DIR) so a restart does not recompile.
CACHE = True
#: Greedy k-center: number of plain iterations whose centres become the pruning clusters.
CORESET_CLUSTERS = 1024
#: Greedy k-center: regroup the rows around all centres so far each time their count grows this much.
CORESET_REGROUP = 3
#: Greedy k-center over partitions: the threaded rounds reach these fractions of k before a serial finish.
CORESET_ROUNDS = (0.3, 0.8, 0.95, 0.99)
#: Rows per chunk when streaming a projection, so memory stays bounded.
CHUNK_ROWS = 65536
#: Positions processed together by the PaDiM kernels (one AVX-512 register of float32).
POSITION_BLOCK = 16
