"""attribution-assets: gradient-based training-data attribution as a Dagster asset graph.

Importing the package makes thread pools sleep instead of spinning while they wait for work
(unless the environment already says otherwise): a pool that busy-waits takes a core from
every other process on the machine, and two pipelines on the same cores then run many
times slower. These variables are read when an OpenMP runtime or OpenBLAS loads, so they
take effect only if this package is imported before torch, FAISS and NumPy load them.
"""

import os

for _name, _value in (
    ("OMP_WAIT_POLICY", "PASSIVE"),  # GNU and LLVM/Intel OpenMP (torch, FAISS, MKL, OpenBLAS-omp)
    ("KMP_BLOCKTIME", "0"),  # Intel/LLVM OpenMP: sleep at once after a parallel region
    ("OPENBLAS_THREAD_TIMEOUT", "4"),  # OpenBLAS pthreads (NumPy): spin 2^4 cycles, then sleep
):
    os.environ.setdefault(_name, _value)
del _name, _value
