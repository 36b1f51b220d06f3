"""The forward pass of every model on a whole sequence: ``init`` and ``apply``.

A model is: token embedding, ``num_layers`` blocks (the mixer of ``config.model`` plus a
feed-forward layer, each pre-norm with a residual), a final norm and a linear head.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from autograd.tracer import getval

from .._checks import check_rng
from . import baselines, lmm, mac, mag, mal
from .blocks import embed, ffn, head, init_embedding, init_ffn, init_head
from .config import ModelConfig
from .tree import as_float_arrays, tree_leaves

# model name -> (init one block, apply one block)
LAYERS = {
    "lmm": (lmm.init_layer, lmm.layer),
    "mac": (mac.init_layer, mac.layer),
    "mag": (mag.init_layer, mag.layer),
    "mal": (mal.init_layer, mal.layer),
    "swa": (baselines.init_attention_layer, baselines.swa_layer),
    "transformer": (baselines.init_attention_layer, baselines.transformer_layer),
    "linear_attention": (baselines.init_linear_layer, baselines.linear_attention_layer),
    "gated_delta": (baselines.init_linear_layer, baselines.gated_delta_layer),
}

# model name -> (a block's state after t tokens, stream one block)
STREAM_LAYERS = {
    "lmm": (lmm.layer_state, lmm.layer_stream),
    "mac": (mac.layer_state, mac.layer_stream),
    "mag": (mag.layer_state, mag.layer_stream),
    "mal": (mal.layer_state, mal.layer_stream),
    "swa": (baselines.attention_layer_state, baselines.attention_layer_stream),
    "transformer": (baselines.attention_layer_state, baselines.attention_layer_stream),
    "linear_attention": (baselines.linear_layer_state, baselines.linear_layer_stream),
    "gated_delta": (baselines.linear_layer_state, baselines.linear_layer_stream),
}

DISPLAY_NAMES = {"lmm": "LMM", "mac": "MAC", "mag": "MAG", "mal": "MAL", "swa": "SWA",
                 "transformer": "Transformer", "linear_attention": "Linear attention",
                 "gated_delta": "Gated DeltaNet"}


def init(rng, config: ModelConfig) -> dict:
    """Initial parameters of the model named by ``config.model``.

    Returns:
        ``{"embed": {"E": (vocab_size, d_model)}, "layers": [{"mixer": the layer's tree,
        "ffn": init_ffn (when ffn_expansion)}] * num_layers, "head": {"norm": {"g": (d,)},
        "W": {"W": (d, vocab_size)}}}``; each model's ``init_layer`` lists its mixer's keys.
    """
    check_rng(rng)
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    init_layer, _ = LAYERS[config.model]
    params = {"embed": init_embedding(rng, config), "layers": [], "head": None}
    for _ in range(config.num_layers):
        block = {"mixer": init_layer(rng, config)}
        if config.ffn_expansion:
            block["ffn"] = init_ffn(rng, config)
        params["layers"].append(block)
    params["head"] = init_head(rng, config)
    return as_float_arrays(params)


@lru_cache(maxsize=64)
def reference_params(config: ModelConfig) -> dict:
    """``init(default_rng(0), config)``: a parameter tree whose shapes every tree of
    ``config`` has (they do not depend on the rng). Cached; do not modify it."""
    return init(np.random.default_rng(0), config)


@lru_cache(maxsize=64)
def _param_shapes(config: ModelConfig) -> tuple:
    return tuple(np.shape(w) for w in tree_leaves(reference_params(config)))


def check_params_fit(params, config: ModelConfig) -> None:
    """Raise if ``params`` is not a parameter tree of ``config`` (e.g. from another config)."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    if not isinstance(params, dict) or set(params) != {"embed", "layers", "head"}:
        raise TypeError("params must be the dict returned by init(rng, config) (keys embed, "
                        f"layers, head), got {type(params).__name__}")
    want = _param_shapes(config)
    got = tuple(np.shape(getval(w)) for w in tree_leaves(params))
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                     min(len(got), len(want)))
        detail = (f"leaf {first} has shape {got[first]}, expected {want[first]}"
                  if first < min(len(got), len(want))
                  else f"{len(got)} arrays, expected {len(want)}")
        raise ValueError(f"params do not fit config (model={config.model!r}, "
                         f"d_model={config.d_model}, vocab_size={config.vocab_size}): {detail}; "
                         "were they made for another config?")


def hidden_states(params, tokens, config):
    """The last block's output ``(B, T, d)`` for ``(B, T)`` int tokens (before the head)."""
    _, layer = LAYERS[config.model]
    h = embed(params["embed"], tokens)  # (B, T, d)
    for block in params["layers"]:
        h = layer(block["mixer"], h, config)
        if "ffn" in block:
            h = ffn(block["ffn"], h)
    return h


def _apply_batch(params, tokens, config):
    return head(params["head"], hidden_states(params, tokens, config))  # (B, T, V)


def check_tokens(tokens, config: ModelConfig, name: str = "tokens"):
    """Integer tokens ``(T,)`` or ``(B, T)`` with ``B, T >= 1`` in ``[0, vocab_size)``."""
    tokens = np.asarray(tokens)
    if tokens.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {tokens.dtype}")
    if tokens.ndim not in (1, 2) or 0 in tokens.shape:
        raise ValueError(f"{name} must have shape (T,) or (B, T) with B, T >= 1, got "
                         f"{tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= config.vocab_size:
        raise ValueError(f"{name} must be in [0, {config.vocab_size}), got "
                         f"[{tokens.min()}, {tokens.max()}]")
    return tokens


def apply(params, tokens, config: ModelConfig):
    """Next-token logits: ``(T,)`` -> ``(T, V)``, or ``(B, T)`` -> ``(B, T, V)``.

    Every sequence of a batch has its own memory (the scan loops over the batch).
    """
    tokens = check_tokens(tokens, config)
    check_params_fit(params, config)
    if tokens.ndim == 1:
        return _apply_batch(params, tokens[None], config)[0]
    return _apply_batch(params, tokens, config)
