r"""MAD's AutoEncoder backbone around any model of the library, for the compression task.

Compression asks a model to reproduce its input sequence. A next-token model sees every
token it is asked for, so it could copy its input and score 100%; MAD instead squeezes the
sequence through one vector. The model's blocks encode the sequence, only the last
position's vector $h_T$ goes on, and a non-expanding MLP decodes $h_T + p_t$ ($p_t$ a fixed
sinusoidal code) for every position $t$; the model's head turns it into logits:

$$\mathrm{logits}_t = \mathrm{head}(\mathrm{MLP}(h_T + p_t)).$$

A task whose ``autoencoder`` attribute is true (:class:`minititans.tasks.CompressionTask`)
gets this backbone from :func:`model_for`; ``minititans mad`` and ``minititans train`` both
build their models with it, and a checkpoint records which backbone it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..activations import gelu
from ..layers import init_linear, init_rms_norm, linear, rms_norm
from .blocks import head
from .config import ModelConfig
from .forward import check_params_fit, check_tokens, hidden_states, init
from .model import Model


def position_code(T: int, d: int):
    """Fixed sinusoidal codes ``(T, d)``: what MAD's decoder adds to tell positions apart."""
    pos = np.arange(T)[:, None]
    freq = np.exp(-math.log(10_000.0) * np.arange(0, d, 2) / d)[None]  # (1, d/2)
    code = np.zeros((T, d))
    code[:, 0::2] = np.sin(pos * freq)
    code[:, 1::2] = np.cos(pos * freq)[:, :d // 2]
    return code


@dataclass(frozen=True)
class AutoEncoder(Model):
    r"""MAD's AutoEncoder backbone around the model of ``config`` (module doc).

    ``init`` adds a ``"decoder"`` (two pre-norm GELU layers, $d \to d$) to the model's
    parameters; ``apply`` maps ``(T,)`` or ``(B, T)`` tokens to logits of the same length,
    each position decoded from the last one's vector alone. It reads whole sequences only:
    ``stream`` and ``generate`` raise.
    """

    backbone = "autoencoder"

    def init(self, rng) -> dict:
        d = self.config.d_model
        params = init(rng, self.config)
        params["decoder"] = {"n1": init_rms_norm(rng, d), "l1": init_linear(rng, d, d, True),
                             "n2": init_rms_norm(rng, d), "l2": init_linear(rng, d, d, True)}
        return params

    def apply(self, params, tokens):
        cfg = self.config
        tokens = check_tokens(tokens, cfg)
        if not isinstance(params, dict) or "decoder" not in params:
            raise TypeError("params must be the dict returned by AutoEncoder.init (with its "
                            "'decoder'), got "
                            + (f"keys {sorted(params)}" if isinstance(params, dict)
                               else type(params).__name__))
        check_params_fit({k: v for k, v in params.items() if k != "decoder"}, cfg)
        if tokens.ndim == 1:
            return self.apply(params, tokens[None])[0]
        h = hidden_states(params, tokens, cfg)  # (B, T, d)
        T = tokens.shape[1]
        z = h[:, -1:, :] + position_code(T, cfg.d_model)[None]  # (B, T, d): h_T + p_t
        p = params["decoder"]
        z = gelu(linear(p["l1"], rms_norm(p["n1"], z)))
        z = gelu(linear(p["l2"], rms_norm(p["n2"], z)))
        return head(params["head"], z)  # (B, T, V)

    def _whole_only(self, what):
        raise TypeError(f"an AutoEncoder decodes a whole sequence from its last position; it "
                        f"has no {what} (use apply)")

    def initial_state(self, batch_size: int) -> dict:
        self._whole_only("stream state")

    def stream(self, params, tokens, state):
        self._whole_only("stream")

    def generate(self, params, prompt, num_tokens: int, rng, temperature=1.0, top_k=None):
        self._whole_only("generate")


def model_for(config: ModelConfig, task) -> Model:
    """The model of ``config`` that ``task`` needs: an :class:`AutoEncoder` when the task
    says ``autoencoder`` (compression), else a plain next-token :class:`Model`."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    return AutoEncoder(config) if getattr(task, "autoencoder", False) else Model(config)
