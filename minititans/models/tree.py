"""Parameter trees: nested dicts, lists and tuples (including ``MemoryParams``) of float arrays.

:func:`tree_map` rebuilds a tree with a function applied to every leaf; :func:`ravel` turns
a tree into one flat vector and back (what the optimiser and the checkpoints work on).
The leaves are visited in a fixed order (dict keys sorted), so a flat vector means the same
thing for every tree of the same structure.
"""

from __future__ import annotations

import numpy as np
from autograd.extend import defvjp, primitive

from ..memory import MemoryParams


def tree_map(f, tree):
    """``tree`` with every leaf ``x`` replaced by ``f(x)`` (structure and metadata kept)."""
    if isinstance(tree, dict):
        return {k: tree_map(f, tree[k]) for k in sorted(tree)}
    if isinstance(tree, MemoryParams):
        return tree.like(tree_map(f, w) for w in tree)
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(f, x) for x in tree)
    return f(tree)


def tree_leaves(tree) -> list:
    """The leaves in the fixed order of :func:`tree_map`."""
    out = []
    tree_map(out.append, tree)
    return out


def as_float_arrays(tree):
    """Every leaf as a float64 NumPy array (Python floats become 0-d arrays)."""
    return tree_map(lambda x: np.asarray(x, dtype=np.float64), tree)


@primitive
def _split(vec, offsets, shapes):
    """The pieces of ``vec``: ``vec[offsets[i]:offsets[i + 1]]`` in ``shapes[i]``, a tuple."""
    return tuple(np.reshape(vec[offsets[i]:offsets[i + 1]], shape)
                 for i, shape in enumerate(shapes))


# the cotangent of the pieces, concatenated: one copy. (Slicing the box instead costs one
# scatter into a zero vector of the full size per leaf, a tenth of a small model's step.)
defvjp(_split, lambda ans, vec, offsets, shapes: lambda g: np.concatenate(
    [np.ravel(x) for x in g]) if len(g) else np.zeros(0))


def ravel(tree):
    """``(flat, unravel)``: all leaves in one vector ``(P,)``, and its inverse.

    Autograd differentiates through ``unravel``: the gradient of ``loss(unravel(flat))``
    is a flat vector in the same order.
    """
    leaves = [np.asarray(x, dtype=np.float64) for x in tree_leaves(tree)]
    shapes = tuple(x.shape for x in leaves)
    sizes = [x.size for x in leaves]
    offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum(sizes)]))
    flat = np.concatenate([x.ravel() for x in leaves]) if leaves else np.zeros(0)

    def unravel(vec):
        pieces = _split(vec, offsets, shapes)
        it = iter(pieces[i] for i in range(len(shapes)))
        return tree_map(lambda _: next(it), tree)

    return flat, unravel
