"""The model object: a :class:`~minititans.models.ModelConfig` with its functions as methods."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .forward import DISPLAY_NAMES, apply, init
from .stream import generate, initial_state, stream


@dataclass(frozen=True)
class Model:
    """A model: ``init``, ``apply`` on a whole sequence, ``stream`` in pieces, ``generate``."""

    config: ModelConfig
    # what a checkpoint records to rebuild it: "lm" (this class) or "autoencoder"
    backbone = "lm"

    def init(self, rng) -> dict:
        return init(rng, self.config)

    def apply(self, params, tokens):
        return apply(params, tokens, self.config)

    def initial_state(self, batch_size: int) -> dict:
        """The stream state of ``batch_size`` sequences before any token (see :func:`stream`)."""
        return initial_state(self.config, batch_size)

    def stream(self, params, tokens, state):
        """``(logits, state)`` of the next piece; consecutive pieces equal one ``apply``."""
        return stream(params, tokens, state, self.config)

    def generate(self, params, prompt, num_tokens: int, rng, temperature=1.0, top_k=None):
        """``num_tokens`` sampled tokens after ``prompt``; ``top_k=1`` is greedy."""
        return generate(params, prompt, num_tokens, rng, self.config, temperature=temperature,
                        top_k=top_k)

    @property
    def name(self) -> str:
        return DISPLAY_NAMES[self.config.model]
