r"""One update rule, many models (Titans Appendix C, and the MIRAS view).

Titans' update, Eqs. 13–14, with a chosen memory, inner loss and gates, *is* several
well-known sequence models:

| preset | memory | loss | $\theta$ | $\eta$ | $\alpha$ | chunk | equals |
|---|---|---|---|---|---|---|---|
| ``linear_attention`` | matrix | $-\langle kW, v\rangle$ | 1 | 0 | 0 | 1 | Eqs. 4–5 |
| ``delta_rule`` | matrix | Eq. 12 | $\beta/2$ | 0 | 0 | 1 | DeltaNet |
| ``gated_delta_rule`` | matrix | Eq. 12 | $\beta/2$ | 0 | $\alpha$ | 1 | gated delta rule (1) |
| ``ttt_linear`` | matrix | Eq. 12 | $\theta$ | 0 | 0 | 16 | TTT-Linear (2) |
| ``titans_linear`` | matrix | Eq. 12 | $\theta$ | $\eta$ | $\alpha$ | 1 | Titans, $L_M = 1$ |
| ``titans_deep`` | MLP | Eq. 12 | $\theta$ | $\eta$ | $\alpha$ | 1 | Titans, $L_\mathcal{M}=2$ |
| ``miras_huber``, ``miras_lp`` | MLP | Huber, $\ell_p$ | ... | | | | MIRAS attentional biases |

(1) with Titans' placement of the gate (after the gradient); (2) without its LayerNorm.

Each preset starts from an empty memory, $\mathcal{M}_0(k) = 0$ (``init="zero_out"``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .models import init_memory
from .scan import memory_scan
from .update import MemoryState


@dataclass(frozen=True)
class MemoryRule:
    """A memory architecture, an inner loss and constant gates: one member of the family."""

    name: str
    description: str
    depth: int = 1            # L_M: 1 is a matrix memory
    loss: str = "l2"          # "l2" (Eq. 12), "dot", "huber", "lp"
    theta: float = 0.5        # inner step; the delta rule's β is 2θ
    eta: float = 0.0          # momentum decay (Eq. 14); 0 turns momentum off
    alpha: float = 0.0        # forgetting (Eq. 13); 0 turns forgetting off
    chunk_size: int = 1       # tokens sharing the chunk-start weights (Eqs. 16–18)
    expansion: int = 4        # hidden width = expansion * d_in for deep memories
    activation: str = "gelu"
    residual_norm: bool = False
    p: float = 3.0            # exponent of the lp loss
    delta: float = 1.0        # threshold of the Huber loss

    def with_(self, **changes) -> MemoryRule:
        """A copy with some fields changed (``rule.with_(eta=0.0)``)."""
        return replace(self, **changes)

    def init_state(self, rng, d_in: int, d_out: int, dtype=np.float64) -> MemoryState:
        """An empty memory ($\\mathcal{M}_0(k) = 0$, $S_0 = 0$) of this architecture."""
        params = init_memory(rng, d_in, d_out, depth=self.depth, expansion=self.expansion,
                             activation=self.activation, residual_norm=self.residual_norm,
                             init="zero_out", dtype=dtype)
        return MemoryState.initial(params)

    def scan(self, state: MemoryState, keys, values, queries, *, read: str = "after",
             backend: str = "reference"):
        """Run :func:`memory_scan` with this rule's loss, gates and chunk size."""
        return memory_scan(state, keys, values, queries, alpha=self.alpha, eta=self.eta,
                           theta=self.theta, chunk_size=self.chunk_size, read=read,
                           backend=backend, loss=self.loss, p=self.p, delta=self.delta)


PRESETS = {
    rule.name: rule
    for rule in (
        MemoryRule("linear_attention", "dot-product loss, θ=1: M_t = M_{t-1} + k_tᵀv_t",
                   loss="dot", theta=1.0),
        MemoryRule("delta_rule", "Eq. 12 with θ = β/2 = 0.5, no momentum, no forgetting",
                   theta=0.5),
        MemoryRule("gated_delta_rule", "the delta rule plus forgetting α",
                   theta=0.5, alpha=0.02),
        MemoryRule("ttt_linear", "plain gradient steps, gradients shared in chunks of 16",
                   theta=0.5, chunk_size=16),
        MemoryRule("titans_linear", "matrix memory with momentum and forgetting (Eqs. 13–14)",
                   theta=0.1, eta=0.5, alpha=0.001),
        MemoryRule("titans_deep", "2-layer MLP memory with momentum and forgetting",
                   depth=2, theta=0.1, eta=0.5, alpha=0.001),
        MemoryRule("miras_huber", "2-layer MLP memory, Huber attentional bias",
                   depth=2, loss="huber", delta=0.5, theta=0.1, eta=0.5, alpha=0.001),
        MemoryRule("miras_lp", "2-layer MLP memory, l_p attentional bias (p = 3)",
                   depth=2, loss="lp", p=3.0, theta=0.1, eta=0.5, alpha=0.001),
    )
}


def preset(name: str) -> MemoryRule:
    """The named :class:`MemoryRule` (see ``PRESETS``)."""
    if name not in PRESETS:
        raise ValueError(f"name must be one of {', '.join(sorted(PRESETS))}; got {name!r}")
    return PRESETS[name]
