r"""Reading a sequence in pieces, and sampling from a model: ``stream`` and ``generate``.

```python
state = initial_state(config, batch_size=1)
logits_a, state = stream(params, tokens[:100], state, config)
logits_b, state = stream(params, tokens[100:], state, config)   # == apply(params, tokens)
new_tokens = generate(params, prompt, 50, rng, config, temperature=0.8, top_k=5)
```

The state is a dict of arrays (``{"t": tokens read so far, "layers": [one per block]}``,
see :mod:`minititans.models.streaming` for what each block keeps). Calling :func:`stream`
on consecutive pieces gives the logits of one :func:`~minititans.models.forward.apply` on
the whole sequence:

* **exactly** (the same operations on the same numbers, up to the order of floating-point
  sums: at most $10^{-14}$ in float64, measured by ``python tests/test_stream.py``) for
  every split, wherever the pieces end, for the
  LMM, MAG, MAL, SWA, the transformer, linear attention, the gated delta rule and MAC with
  ``memory_causal=True`` (the default). A piece that ends inside a memory chunk
  (``chunk_size``) is exact too: the next piece replays the chunk's first tokens from the
  chunk-start weights (:func:`minititans.models.streaming.memory_stream`).
* MAC with ``memory_causal=False`` is not causal inside a segment (a token sees memory
  tokens read with later queries, :func:`minititans.attention.mac_mask`): there stream equals
  apply when every piece ends at a segment boundary (a multiple of ``segment_len``), and a
  piece ending inside a segment gives the logits of a sequence that stops there.

With plain arrays (no autograd box) no graph over the parameters is built: the baselines
run in plain NumPy, the reference memory differentiates only its inner loss (Eq. 8, by
autograd: that is how the reference defines the surprise), and ``backend="numba"`` runs the
memory (and windowed attention over 2048 keys or more) on the numba kernels with no
autograd at all. Windowed attention never forms a $T \times T$ matrix
(:func:`minititans.attention.causal_attention`).
"""

from __future__ import annotations

import math
import numbers

import numpy as onp
from autograd.tracer import getval

from .._checks import check_int
from .blocks import embed, ffn, head
from .config import ModelConfig
from .forward import STREAM_LAYERS, check_params_fit, check_tokens, reference_params


def state_after(config: ModelConfig, batch_size: int, t: int) -> dict:
    """Zeros of the shapes a stream state has after ``t`` tokens (``t = 0``: the initial one)."""
    state_of, _ = STREAM_LAYERS[config.model]
    params = reference_params(config)
    return {"t": onp.asarray(t, dtype=onp.int64),
            "layers": [{"mixer": state_of(block["mixer"], config, batch_size, t)}
                       for block in params["layers"]]}


def initial_state(config: ModelConfig, batch_size: int) -> dict:
    """The state of ``batch_size`` fresh sequences: nothing read yet.

    The memories start at the learned $\\mathcal{M}_0$ of the parameters passed to
    :func:`stream` (the state holds zeros until then), every cache is empty.
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    return state_after(config, check_int("batch_size", batch_size, minimum=1), 0)


def _shapes(tree, path="state"):
    """``{path: shape}`` of every leaf of a tree of dicts and lists."""
    if isinstance(tree, dict):
        out = {}
        for key in sorted(tree):
            out.update(_shapes(tree[key], f"{path}[{key!r}]"))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, x in enumerate(tree):
            out.update(_shapes(x, f"{path}[{i}]"))
        return out
    return {path: onp.shape(getval(tree))}


def check_state(state, config: ModelConfig, batch_size: int) -> int:
    """Raise unless ``state`` is a stream state of ``config`` for ``batch_size`` sequences.

    The check is by structure and shapes: two models whose states have the same arrays
    (linear attention and the gated delta rule; SWA and the transformer before ``window``
    tokens) cannot be told apart.

    Returns:
        ``t``, the number of tokens the state has read.
    """
    if not isinstance(state, dict) or set(state) != {"t", "layers"}:
        raise TypeError("state must be the dict returned by initial_state / Model.initial_state "
                        f"or by a previous stream call (keys t, layers), got "
                        f"{type(state).__name__}")
    t = onp.asarray(getval(state["t"]))
    if t.shape != () or t.dtype.kind not in "iu" or t < 0:
        raise ValueError(f"state['t'] must be an integer >= 0 (tokens read so far), got {t!r}")
    t = int(t)
    got, want = _shapes(state), _shapes(state_after(config, batch_size, t))
    if got.keys() != want.keys():
        raise ValueError(f"state does not fit the model (model={config.model!r}, "
                         f"num_layers={config.num_layers}): it has the entries of another "
                         "model or config; start from Model.initial_state(batch_size)")
    batches = {s[0] for k, s in got.items() if len(s) and k != "state['t']"}
    if batches and batches != {batch_size}:
        raise ValueError(f"state was made for batch size {sorted(batches)[0]}, but the tokens "
                         f"have batch size {batch_size}")
    for key, shape in want.items():
        if got[key] != shape:
            raise ValueError(f"state does not fit the model (model={config.model!r}, "
                             f"d_model={config.d_model}) after {t} tokens: {key} has shape "
                             f"{got[key]}, expected {shape}; was it made for another config?")
    return t


def stream(params, tokens, state, config: ModelConfig):
    """Logits of the next piece of a sequence, and the state to continue from.

    Args:
        params: from ``init(rng, config)``.
        tokens: ``(T,)`` (with a state of batch size 1) or ``(B, T)`` integer tokens.
        state: from :func:`initial_state` or the previous call.

    Returns:
        ``(logits, state)``: logits ``(T, V)`` or ``(B, T, V)``, as ``apply`` would give them
        at these positions of the whole sequence.
    """
    tokens = check_tokens(tokens, config)
    check_params_fit(params, config)
    single = tokens.ndim == 1
    tokens = tokens[None] if single else tokens
    t = check_state(state, config, tokens.shape[0])
    _, layer_stream = STREAM_LAYERS[config.model]
    h = embed(params["embed"], tokens)  # (B, T, d)
    layers = []
    for block, block_state in zip(params["layers"], state["layers"]):
        h, mixer = layer_stream(block["mixer"], h, config, block_state["mixer"], t)
        layers.append({"mixer": mixer})
        if "ffn" in block:
            h = ffn(block["ffn"], h)
    logits = head(params["head"], h)  # (B, T, V)
    new_state = {"t": onp.asarray(t + tokens.shape[1], dtype=onp.int64), "layers": layers}
    return (logits[0] if single else logits), new_state


def _check_generate_args(num_tokens, rng, temperature, top_k, vocab_size):
    num_tokens = check_int("num_tokens", num_tokens, minimum=0)
    if not isinstance(rng, onp.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not math.isfinite(temperature) or not temperature > 0):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    if top_k is not None:
        top_k = check_int("top_k", top_k, minimum=1)
        if top_k > vocab_size:
            raise ValueError(f"top_k must be <= vocab_size={vocab_size} (or None), got {top_k}")
    return num_tokens, float(temperature), top_k


def sample(logits, rng, temperature: float = 1.0, top_k=None):
    """One token per row of ``logits`` ``(B, V)``: from softmax(logits / temperature) over
    the ``top_k`` largest (all if None; logits tied with the k-th largest are kept too);
    ``top_k=1`` is the argmax, the first one on a tie (the rng is not used)."""
    logits = onp.asarray(getval(logits), dtype=onp.float64)
    if top_k == 1:
        return onp.argmax(logits, axis=-1)
    z = logits / temperature
    if top_k is not None:  # drop everything below the k-th largest logit of each row
        kth = -onp.sort(-z, axis=-1)[:, top_k - 1:top_k]
        z = onp.where(z >= kth, z, -onp.inf)
    p = onp.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    u = rng.random((z.shape[0], 1))
    # inverse CDF; the clip guards the last bin against cumsum rounding below u
    return onp.minimum((onp.cumsum(p, axis=-1) < u).sum(axis=-1), z.shape[-1] - 1)


def generate(params, prompt, num_tokens: int, rng, config: ModelConfig, temperature=1.0,
             top_k=None):
    """Sample ``num_tokens`` tokens after ``prompt``, on top of :func:`stream`.

    The prompt is read with one ``stream`` call, then each sampled token is fed back one at
    a time, so the cost per new token is that of one token (a KV cache, the memory's state),
    not of the whole sequence again.

    Args:
        params: from ``init(rng, config)``.
        prompt: ``(T,)`` or ``(B, T)`` integer tokens, ``T >= 1``.
        num_tokens: how many tokens to sample (``>= 0``).
        rng: a ``numpy.random.Generator``.
        temperature: ``> 0``; the logits are divided by it.
        top_k: None (all tokens) or ``1 <= top_k <= vocab_size``; ``top_k=1`` is greedy.

    Returns:
        The sampled tokens only, ``(num_tokens,)`` or ``(B, num_tokens)`` (int64).
    """
    num_tokens, temperature, top_k = _check_generate_args(num_tokens, rng, temperature, top_k,
                                                          config.vocab_size)
    prompt = check_tokens(prompt, config, name="prompt")
    check_params_fit(params, config)
    single = prompt.ndim == 1
    prompt = prompt[None] if single else prompt
    out = onp.zeros((prompt.shape[0], num_tokens), dtype=onp.int64)
    if num_tokens:
        logits, state = stream(params, prompt, initial_state(config, prompt.shape[0]), config)
        for i in range(num_tokens):
            if i:
                logits, state = stream(params, out[:, i - 1:i], state, config)
            out[:, i] = sample(logits[:, -1], rng, temperature, top_k)
    return out[0] if single else out
