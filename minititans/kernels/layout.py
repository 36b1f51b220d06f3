r"""How the kernels lay out the memory's weights, the tapes of rows, and their arguments.

**Weights.** The weights $(W_1, \dots, W_L)$ of one memory are packed into one flat
C-contiguous vector ``flat`` (``(P,)``, or ``(B, P_pad)`` for a batch), with ``shapes``
``(L, 2)`` int64 (fan-in, fan-out of each layer) and ``offsets`` ``(L + 1,)`` int64 so that
``W_i = flat[offsets[i]:offsets[i + 1]].reshape(shapes[i])`` (:func:`layer`, a view).
Momentum $S$ and every cotangent of the weights use the same layout.

**Tapes.** A forward pass over ``n`` rows keeps, per layer $i = 1..L$, the pre-activation
$z_i = h_{i-1} W_i$ ``(n, w_i)`` in a flat tape ``Z`` and $h_i = \sigma(z_i)$ for $i < L$ in
a flat tape ``H``. Layer ``i``'s block starts at ``n * zoff[i]`` (``n * hoff[i]`` in ``H``),
with ``zoff``, ``hoff`` the one-row offsets of :class:`Spec`; :func:`tape_view` gives it as
an ``(n, w_i)`` view. Tapes whose blocks have the fan-in widths (products with $W_i^\top$)
start at ``n * boff[i]``.

**Arguments.** Kernels take their arguments grouped in named tuples (numba compiles them
as structs): :class:`Spec` (the memory and its inner loss), :class:`Seq` (the sequence, its
gates and the forgetting anchor; also their cotangents), :class:`Tape` (what a forward
keeps), the rows of one forward pass (:class:`KeyRows`, :class:`QueryRows`) and the gate
products of a chunk (:class:`Coefficients`).
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic
from numba.np.arrayobj import make_array, populate_array

from .._checks import weight_bound
from ._jit import inline_kernel, kernel, specialise

ALIGN_BYTES = 64  # one cache line / one AVX-512 register: aligned rows load in one piece

Spec = namedtuple("Spec", [
    "shapes", "offsets",  # the weights layout
    "zoff", "hoff", "boff",  # one row's tape offsets: widths, hidden widths, fan-in widths
    "act_kind", "residual", "loss_kind", "p", "delta",  # the memory and its inner loss
    "clip",  # max global norm of a surprise, <= 0 for none
    "read_after",  # y_t = M_t(q_t) (True) or M_{t-1}(q_t)
    "bound",  # the weights have diverged past this magnitude (_checks.weight_bound)
])
# (T, d) rows, the gates (eta (T,); alpha (T, 1) or (T, C), a rate per output channel;
# theta (T, 1) or (T, L), a step per layer) and the anchor M̄ that Eq. 13 forgets towards:
# flat weights (P,), or (0,) for Eq. 13 as printed (forgetting towards 0; the kernels then
# do no anchor work)
Seq = namedtuple("Seq", "K V Q alpha eta theta anchor")
Tape = namedtuple("Tape", [
    "ckM", "ckS",  # the state (M, S) every `seg` tokens, one row each
    "KZ", "KH", "KD1", "KD", "KDH",  # keys: z, h, σ'(z), δ, δ_{i+1} W_{i+1}ᵀ, one slot a chunk
    "KP", "kln",  # keys: M(k) and (mean, rstd) of the LayerNorm, one row a token
    "QZ", "QH", "QD1", "qln",  # queries: z, h, σ'(z) a chunk, LayerNorm a token
    "unorm2", "uscale",  # per token: ‖u‖² and the clip scale
])
KeyRows = namedtuple("KeyRows", "X V Z H HD1 ln y D DH")  # n keys through the memory
QueryRows = namedtuple("QueryRows", "X Z H HD1 ln")  # n queries through the memory


def aligned_zeros(shape, dtype):
    """A C-contiguous zero array whose first element sits on a 64-byte boundary.

    Misaligned 512-bit loads and stores straddle two cache lines; on the benchmark machine
    the fused update loop ran 1.8x slower on misaligned weights.
    """
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    buf = np.zeros(n + ALIGN_BYTES // dtype.itemsize, dtype=dtype)
    start = (-buf.ctypes.data % ALIGN_BYTES) // dtype.itemsize
    return buf[start:start + n].reshape(shape)


def padded(n, dtype):
    """``n`` rounded up to a whole number of 64-byte lines of ``dtype``."""
    per_line = ALIGN_BYTES // np.dtype(dtype).itemsize
    return -(-int(n) // per_line) * per_line


def as_kernel_array(x, dtype):
    """``x`` as a C-contiguous, writeable array of ``dtype``, copied only when needed.

    Kernels are compiled per argument type, and numba types read-only and non-contiguous
    arrays differently: passing everything through here means no such input fails or
    compiles (and caches) another specialisation.
    """
    x = np.asarray(x)
    if x.dtype == dtype and x.flags.c_contiguous and x.flags.writeable:
        return x
    return np.array(x, dtype=dtype, order="C")


def pack_weights(weights, dtype, batched=False):
    """Pack ``[W_1, ..., W_L]`` (each ``(fan_in, fan_out)``) into the flat layout.

    With ``batched`` every ``W_i`` has a leading batch axis ``B`` and ``flat`` is
    ``(B, P_pad)``: each sequence's row starts on a 64-byte boundary (``P`` rounded up by
    :func:`padded`, the columns ``P:`` are zero).

    Returns:
        ``(flat (P,) or (B, P_pad), shapes (L, 2) int64, offsets (L + 1,) int64)``; ``flat``
        is a new 64-byte aligned array of ``dtype`` (:func:`aligned_zeros`).
    """
    lead = np.shape(weights[0])[:1] if batched else ()
    shapes = np.array([np.shape(w)[len(lead):] for w in weights], dtype=np.int64).reshape(-1, 2)
    offsets = np.zeros(len(shapes) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(shapes[:, 0] * shapes[:, 1])
    size = padded(offsets[-1], dtype) if batched else int(offsets[-1])
    flat = aligned_zeros(lead + (size,), dtype)
    for i, w in enumerate(weights):
        flat[..., offsets[i]:offsets[i + 1]] = np.asarray(w, dtype=dtype).reshape(lead + (-1,))
    return flat, shapes, offsets


def unpack_weights(flat, shapes, offsets):
    """The inverse of :func:`pack_weights` (also of the batched form): a list of new arrays."""
    lead = flat.shape[:-1]
    flat = flat[..., :offsets[-1]]
    return [flat[..., offsets[i]:offsets[i + 1]].reshape(lead + tuple(shapes[i])).copy()
            for i in range(len(shapes))]


def make_spec(shapes, offsets, dtype, act_kind, residual, loss_kind, p, delta, clip,
              read_after):
    """A :class:`Spec` with the one-row tape offsets and every number in the kernels' types."""
    t = np.dtype(dtype).type
    zero = np.zeros(1, dtype=np.int64)
    zoff = np.concatenate([zero, np.cumsum(shapes[:, 1])])
    hoff = np.concatenate([zero, np.cumsum(shapes[:-1, 1])])
    boff = np.concatenate([zero, np.cumsum(shapes[:, 0])])
    return Spec(shapes, offsets, zoff, hoff, boff, int(act_kind), bool(residual),
                int(loss_kind), t(p), t(delta), t(clip), bool(read_after),
                t(weight_bound(dtype, shapes.shape[0])))


def tape_view(tape, start, n, width):
    """Rows ``(n, width)`` of a flat C-contiguous ``tape`` from ``start``: a C-contiguous view.

    Inside the kernels this is :func:`_rows_view`, which builds the view directly: numba's
    general ``reshape`` costs about 35 ns a call, which the per-token loops would pay a few
    times a token.
    """
    return tape[start:start + n * width].reshape((n, width))


@intrinsic
def _rows_view(typingctx, tape, start, n, width):
    """The view of :func:`tape_view` for a 1-d C-contiguous array (shares its memory)."""
    if not (isinstance(tape, types.Array) and tape.ndim == 1 and tape.layout == "C"):
        return None
    view = tape.copy(ndim=2, layout="C")

    def codegen(context, builder, signature, args):
        src = make_array(signature.args[0])(context, builder, args[0])
        start, n, width = (context.cast(builder, v, t, types.intp)
                           for v, t in zip(args[1:], signature.args[1:]))
        itemsize = context.get_constant(
            types.intp, context.get_abi_sizeof(context.get_data_type(tape.dtype)))
        row_bytes = builder.mul(width, itemsize)
        out = make_array(view)(context, builder)
        populate_array(out, data=builder.gep(src.data, [start]),
                       shape=cgutils.pack_array(builder, [n, width]),
                       strides=cgutils.pack_array(builder, [row_bytes, itemsize]),
                       itemsize=itemsize, meminfo=src.meminfo, parent=src.parent)
        return impl_ret_borrowed(context, builder, view, out._getvalue())

    return view(tape, start, n, width), codegen


@specialise(tape_view)
def _tape_view_impl(tape, start, n, width):
    return lambda tape, start, n, width: _rows_view(tape, start, n, width)


@inline_kernel
def layer(flat, shapes, offsets, i):
    """$W_i$ as a ``(fan_in, fan_out)`` C-contiguous view into ``flat`` (``(P,)`` or longer)."""
    return tape_view(flat, offsets[i], shapes[i, 0], shapes[i, 1])


# Loops rather than slice assignments: numba compiles them much faster, and they vectorise.

@kernel
def copy(src, dst):
    """``dst[:] = src`` for 1-d arrays."""
    for i in range(src.shape[0]):
        dst[i] = src[i]


@kernel
def copy_rows(src, dst):
    """``dst = src`` for 2-d arrays of one shape."""
    for r in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[r, j] = src[r, j]


@kernel
def add_scaled(src, c, dst):
    """``dst += c * src`` for 1-d arrays (the length of ``src``)."""
    for i in range(src.shape[0]):
        dst[i] += c * src[i]


@kernel
def add_rows(src, dst):
    """``dst += src`` for 2-d arrays of one shape."""
    for r in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[r, j] += src[r, j]


@inline_kernel
def key_rows(seq, tape, t0, n, c, r0):
    """:class:`KeyRows` of the keys ``t0 .. t0 + n - 1``: their tapes are slot ``c`` of the
    chunk tapes and rows ``r0 ..`` of the per-token ones (``c = r0 = t0`` for one token a
    slot)."""
    return KeyRows(seq.K[t0:t0 + n], seq.V[t0:t0 + n], tape.KZ[c], tape.KH[c], tape.KD1[c],
                   tape.kln[r0:r0 + n], tape.KP[r0:r0 + n], tape.KD[c], tape.KDH[c])


@inline_kernel
def query_rows(seq, tape, t0, n, c, r0):
    """:class:`QueryRows` of the queries ``t0 .. t0 + n - 1`` (slots as :func:`key_rows`)."""
    return QueryRows(seq.Q[t0:t0 + n], tape.QZ[c], tape.QH[c], tape.QD1[c], tape.qln[r0:r0 + n])


def new_tape(shapes, T, b, dtype, seg=None, take=None, batch=None):
    """The arrays of a :class:`Tape` for ``T`` tokens in chunks of ``b`` (``b = 1``: the token
    loop), each row 64-byte aligned.

    With ``seg`` (tokens between checkpoints) every chunk gets its own slot and the state is
    kept every ``seg`` tokens: what the VJP needs. Without, the tape is only the scan's
    workspace: two key slots and one query slot (the token loop alternates between them) and
    no checkpoint. ``take(shape, dtype)`` allocates (default :func:`aligned_zeros`). Key
    slots get one extra: the token loop reads the key after the last into it. ``batch``:
    every array gets that leading axis (one tape a sequence, :func:`tape_of`).
    """
    lead = () if batch is None else (batch,)
    alloc = take or aligned_zeros
    take = lambda shape, dtype: alloc(lead + shape, dtype)  # noqa: E731
    P = int(np.prod(shapes, axis=1).sum())
    z, h, d_out = int(shapes[:, 1].sum()), max(int(shapes[:-1, 1].sum()), 1), int(shapes[-1, 1])
    if seg is None:
        n_ck, n_k, n_q, n_t = 0, 2 if b == 1 else 1, 1, max(b, 2)
    else:
        n_ck, n_k, n_t = -(-T // seg), -(-T // b) + 1, T + 1
        n_q = n_k

    def rows(n, width):  # n slots, each starting on a 64-byte boundary
        return take((n, padded(width, dtype)), dtype)

    return Tape(rows(n_ck, P), rows(n_ck, P), rows(n_k, b * z), rows(n_k, b * h),
                rows(n_k, b * h), rows(n_k, b * z), rows(n_k, b * h), take((n_t, d_out), dtype),
                take((n_t, 2), dtype), rows(n_q, b * z), rows(n_q, b * h), rows(n_q, b * h),
                take((n_t, 2), dtype), take((n_t,), dtype), take((n_t,), dtype))


Coefficients = namedtuple("Coefficients", "E G Gr coef")  # of a chunk: (b, b) x 3, (b, 5)


def new_coefficients(b, dtype):
    """Zeroed :class:`Coefficients` for chunks of ``b`` tokens."""
    return Coefficients(*(np.zeros((b, b), dtype) for _ in range(3)), np.zeros((b, 5), dtype))


@kernel
def tape_of(tape, s):
    """Sequence ``s`` of a tape made with a ``batch`` axis."""
    return Tape(tape.ckM[s], tape.ckS[s], tape.KZ[s], tape.KH[s], tape.KD1[s], tape.KD[s],
                tape.KDH[s], tape.KP[s], tape.kln[s], tape.QZ[s], tape.QH[s], tape.QD1[s],
                tape.qln[s], tape.unorm2[s], tape.uscale[s])
