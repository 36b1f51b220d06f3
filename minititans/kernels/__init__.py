"""Numba twins of the hot loops (the ``backend="numba"`` of :func:`minititans.memory_scan`).

A one-way chain; each module imports only the ones above it:

* :mod:`._jit` — the one helper that owns every compilation option.
* :mod:`.layout` — packed weights, tapes, aligned arrays, the named tuples of arguments.
* :mod:`.scalars` — activations and their derivatives, float32 exp/erf, the inner loss.
* :mod:`.rows` — rows through the memory: forward, output, LayerNorm backward, the
  surprise (Eq. 8), its clip, the update (Eqs. 13–14), the divergence search.
* :mod:`.hvp` — Hessian-vector products of the inner loss, for the VJP.
* :mod:`.token` — the token loop (Eqs. 13–14) and its VJP; :mod:`.chunk` — the chunked scan
  (Eqs. 16–18) and its VJP.
* :mod:`.vjp` — the scan as an autograd primitive; :mod:`.scan` — the entry points.
* :mod:`.attention` — sliding-window softmax attention, linear attention, the delta rule.
* :mod:`.delta_vjp` — linear attention and the delta rules as an autograd primitive with
  a reverse-time numba VJP (what the baselines train with on the numba backend).

Each kernel has a readable reference twin elsewhere in the package and a parity test in
``tests/``. Nothing here imports the rest of ``minititans`` (only ``minititans._checks``),
and ``import minititans`` imports none of it: ``memory_scan`` does when the numba backend
is asked for.
"""
