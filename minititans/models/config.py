"""The one configuration of every model: a frozen dataclass with the paper's defaults noted.

Static choices (sizes, switches, backend) live here, never inside the parameter tree, so
the parameters stay a pytree of float arrays that autograd differentiates and ``.npz``
checkpoints store. Each field says which models read it; the paper's value (arXiv v1, or
[NeurIPS] where only that version gives it) is in the comment, next to the miniature default.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from .._checks import check_choice, check_int

MODEL_NAMES = ("lmm", "mac", "mag", "mal", "swa", "transformer", "linear_attention",
               "gated_delta")
"""The models ``ModelConfig.model`` may name: the four Titans, then the baselines."""
TITANS = ("lmm", "mac", "mag", "mal")
"""The Titans of Section 4 (the models with a neural memory)."""


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and switches of one model (``model`` picks which one; see ``MODEL_NAMES``)."""

    model: str = "lmm"             # lmm | mac | mag | mal | swa | transformer | linear_attention
    #                                | gated_delta
    vocab_size: int = 32           # set by the task; the paper uses a 32K-token tokenizer
    d_model: int = 32              # paper: 768 at ~400M params
    num_layers: int = 1            # paper: 12-24 blocks; one block is enough for one needle
    num_heads: int = 2             # attention heads (paper: 16 at 400M)
    ffn_expansion: int = 2         # feed-forward width / d_model after each block; 0: none
    conv_kernel: int = 4           # [NeurIPS] depthwise causal conv, kernel 4; 0: "w/o conv"
    num_persistent: int = 4        # N_p persistent tokens, Eq. 19 (Titans only); 0: ablation
    window: int = 16               # sliding-window size, Eqs. 27 and 31 (MAG, MAL, SWA)
    segment_len: int = 16          # MAC segment C, Eqs. 21–25 (paper: 512)
    memory_depth: int = 2          # L_M; paper default 2; 1 is the "linear memory" ablation
    memory_expansion: int = 2      # hidden width / d_model of a deep memory ([NeurIPS]: 4)
    memory_activation: str = "gelu"  # [NeurIPS]: GELU inside the memory MLP
    chunk_size: int = 16           # tokens sharing the chunk-start weights, Eqs. 16–18
    #                                ([NeurIPS]: 16); 1 is the exact token loop
    momentum: bool = True          # False: eta = 0, the "w/o momentum" ablation (Eq. 10 off)
    forgetting: bool = True        # False: alpha = 0, the "w/o weight decay" ablation
    alpha_init: float = 0.01       # alpha at initialisation (gates.ALPHA_INIT): forget 1% of
    #                                the memory per token until the gate learns otherwise
    theta_init: float = 0.02       # theta at initialisation (gates.THETA_INIT)
    theta_max: float = 0.1         # the largest inner step the theta gate can give
    theta_per_layer: bool = False  # [NeurIPS] Appendix B.3: a data-dependent theta for each
    #                                memory layer (L_M >= 2) instead of one per token
    alpha_per_channel: bool = False  # [NeurIPS] channel-wise forgetting: a data-dependent
    #                                alpha for each output channel of the memory's layers
    max_grad_norm: float = 0.0     # clip the memory's inner gradient, each token's surprise,
    #                                to this norm (memory_scan's max_grad_norm; 0: off); deep
    #                                memories with momentum can diverge without it
    anchored_memory: bool = False  # forget towards the learned M_0 instead of 0 (our remedy
    #                                for long streams, docs/design-decisions.md); False: Eq. 13
    memory_causal: bool = True     # MAC: memory token m visible only from segment token m on
    backend: str = "reference"     # memory scan: "reference" (NumPy+autograd) or "numba"

    def __post_init__(self):
        check_choice("model", self.model, MODEL_NAMES)
        check_choice("backend", self.backend, ("reference", "numba"))
        for f in fields(self):
            val = getattr(self, f.name)
            if f.type == "int":
                minimum = 0 if f.name in ("ffn_expansion", "conv_kernel", "num_persistent") else 1
                # stored as a Python int, so NumPy integers compare equal and serialise
                object.__setattr__(self, f.name, check_int(f.name, val, minimum=minimum))
            elif f.type == "bool" and not isinstance(val, bool):
                raise TypeError(f"{f.name} must be True or False, got {val!r}")
            elif f.type == "float":
                # any real number (Python, NumPy float32 or float64) but not a bool
                if isinstance(val, (bool, np.bool_)) or not isinstance(val, numbers.Real):
                    raise TypeError(f"{f.name} must be a float, got {val!r}")
                object.__setattr__(self, f.name, float(val))
        check_choice("memory_activation", self.memory_activation, ("gelu", "silu"))
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by "
                             f"num_heads={self.num_heads}")
        if not 0 < self.alpha_init < 1:
            raise ValueError(f"alpha_init must be in (0, 1), got {self.alpha_init!r}")
        if not self.theta_max > 0 or self.theta_max == float("inf"):
            raise ValueError(f"theta_max must be a finite float > 0, got {self.theta_max!r}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {self.max_grad_norm!r}")
        if not 0 < self.theta_init < self.theta_max:
            raise ValueError(f"need 0 < theta_init < theta_max, got {self.theta_init!r} and "
                             f"{self.theta_max!r}")
        if self.theta_per_layer and self.memory_depth < 2:
            raise ValueError(f"theta_per_layer needs a deep memory (memory_depth >= 2), got "
                             f"memory_depth={self.memory_depth}")
        for name in ("theta_per_layer", "alpha_per_channel"):
            if getattr(self, name) and self.backend == "numba" and self.chunk_size > 1:
                raise ValueError(f"{name} needs chunk_size=1 on the numba backend, got "
                                 f"chunk_size={self.chunk_size}")

    def with_(self, **changes) -> ModelConfig:
        """A copy with some fields changed (``config.with_(momentum=False)``)."""
        return replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        data = json.loads(text)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(sorted(unknown))}")
        return cls(**data)
