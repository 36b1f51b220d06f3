"""``minititans bench``: how fast the numba kernels are, against this machine's own matmul peak.

One run measures, in one process: the single-thread float32 and float64 NumPy matmul peak
(a 512 x 512 GEMM, best of several), then for each kernel its tokens/s, GFLOP/s, fraction
of that peak and its speedup over the readable reference path. BLAS runs single-threaded
(threadpoolctl when installed, else the run re-executes itself with
``OPENBLAS_NUM_THREADS=1``); numba kernels run on one thread except in the batch rows.

FLOPs are counted, not measured: per token and per weight matrix ``(f, o)`` of the memory,
``2fo`` key forward, ``2fo`` surprise, ``2fo`` backprop to the layer input (not for the first
layer), ``2fo`` query read and ``4fo`` for Eqs. 13–14, i.e. ``22 d h`` for a depth-2 memory
``(d, h), (h, d)``. The chunked form does more arithmetic than that; it is counted the same.

The reference is slow, so it runs on a shorter sequence (``T_ref`` in the table) and its
tokens/s are compared with the kernel's. "% peak" divides by the matmul peak measured again
right after the row (under the same machine load); the header shows the peak of the start.

The model rows (:mod:`minititans.bench.models`, the result's ``"models"`` key) time the
needle experiment's models: a training step (loss + gradient) and inference
(``model.apply``), reference against numba in the same run.
"""

from .kernels import HEADLINE, run_bench
from .models import ModelBenchSettings, run_model_bench
from .report import format_models, format_table, goals, machine_noise
from .stream import STREAM_GATES, format_stream, run_stream
from .timing import SINGLE_THREAD_ENV, single_threaded_blas

__all__ = ["HEADLINE", "SINGLE_THREAD_ENV", "STREAM_GATES", "ModelBenchSettings",
           "format_models", "format_stream", "format_table", "goals", "machine_noise",
           "run_bench", "run_model_bench", "run_stream", "single_threaded_blas"]
