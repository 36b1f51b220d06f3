"""Hand-assembled forwards of every model, one sequence, from the primitives and plain loops.

Nothing here imports ``minititans.models``: each model is rebuilt from the paper's
equations with explicit token loops, the one-token memory update (``memory_step``, Eqs.
13–14) and reads (``memory_forward``, Eq. 15), the reference delta rules, and attention
written as "which keys may row i see" (see ``naive_attention_rows``). The parameters are the
models' own dicts, so a test can run both on the same weights. ``chunk_size`` may be any b:
the memory then takes each token's surprise at the weights of its chunk's start (Eqs.
16–18), written here as a plain loop.
"""

import math

import numpy as np
from naive_memory import layer_rate
from scipy.special import erf

from minititans.linear_attention import gated_delta_rule
from minititans.memory import MemoryState, memory_forward, memory_step, surprise


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def silu(x):
    return x * sigmoid(x)


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def rms(g, x):
    return g * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def ln(p, x):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return p["g"] * (x - mu) / np.sqrt(var + 1e-6) + p["b"]


def l2n(x):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def conv_proj(p, x):
    """x W, then y_t = sum_j w_j * z_{t-j} + b with zeros before the start, token by token."""
    z = x @ p["lin"]["W"]
    if "conv" not in p:
        return z
    w, b = p["conv"]["w"], p["conv"]["b"]
    y = np.zeros_like(z)
    for t in range(len(z)):
        y[t] = b + sum(w[j] * z[t - j] for j in range(len(w)) if t - j >= 0)
    return y


def attention_rows(q, k, v, visible, num_heads):
    """softmax(q_i k_j / sqrt(d_h)) over the keys j in visible(i), head by head."""
    T, d = q.shape
    dh = d // num_heads
    out = np.zeros((T, v.shape[1]))
    for h in range(num_heads):
        c = slice(h * dh, (h + 1) * dh)
        for i in range(T):
            js = [j for j in range(k.shape[0]) if visible(i, j)]
            s = np.array([q[i, c] @ k[j, c] / math.sqrt(dh) for j in js])
            e = np.exp(s - s.max())
            out[i, c] = sum(wt * v[j, c] for wt, j in zip(e / e.sum(), js))
    return out


def window_rule(window, prefix):
    def visible(i, j):
        return j < prefix or (j <= i and (window is None or j > i - window))
    return visible


def attention_block(p, x, visible, cfg):
    q, k, v = (conv_proj(p["qkv"][n], x) for n in ("q", "k", "v"))
    return attention_rows(q, k, v, visible, cfg.num_heads) @ p["W_O"]["W"]


def gates(g, x, cfg):
    alpha = sigmoid(x @ g["w_alpha"] + g["b_alpha"])
    eta = sigmoid(x @ g["w_eta"] + g["b_eta"])
    theta = cfg.theta_max * sigmoid(x @ g["w_theta"] + g["b_theta"])
    if not cfg.forgetting:
        alpha = 0 * alpha
    if not cfg.momentum:
        eta = 0 * eta
    return alpha, eta, theta


def memory_qkv(p, x):
    q = l2n(silu(conv_proj(p["qkv"]["q"], x)))
    k = l2n(silu(conv_proj(p["qkv"]["k"], x)))
    v = silu(conv_proj(p["qkv"]["v"], x))
    return q, k, v


def memory_stream(p, x, cfg, state):
    """Eqs. 13–14 token by token, each token read after its own write (Eq. 15); with
    ``chunk_size`` b > 1 the surprise of token t is taken at the weights of its chunk's
    start M_{t'}, t' = t - t mod b (Eqs. 16–18), the chunks counted from this call's start."""
    q, k, v = memory_qkv(p, x)
    alpha, eta, theta = gates(p["gates"], x, cfg)
    ys = []
    for t in range(len(x)):
        if t % cfg.chunk_size == 0:
            start = state.params
        state = memory_write(state, start, k[t], v[t], alpha[t], eta[t], theta[t], cfg)
        ys.append(memory_forward(state.params, q[t]))
    return np.array(ys), state


def memory_write(state, start, k, v, alpha, eta, theta, cfg):
    """One token's write (Eqs. 13–14): its surprise at ``start``, the weights of its chunk's
    start (with ``chunk_size`` 1, the current weights: plain ``memory_step``)."""
    clip = cfg.max_grad_norm or None
    if cfg.chunk_size == 1 and np.ndim(theta) == 0 and np.ndim(alpha) == 0:
        return memory_step(state, k, v, alpha=alpha, eta=eta, theta=theta, max_grad_norm=clip)
    # by hand: the surprise at the chunk's start, theta one number or one per layer, alpha
    # one number or one per output channel
    assert state.anchor is None, "the hand-written write has no anchor"
    g = [np.asarray(w) for w in surprise(start, k[None], v[None])]
    if clip is not None:
        g = [w * min(1.0, clip / np.sqrt(sum(np.sum(u**2) for u in g))) for w in g]
    steps = list(theta) if np.ndim(theta) else [theta] * len(g)
    S = [eta * s - th * gi for s, gi, th in zip(state.momentum, g, steps)]
    M = [(1.0 - layer_rate(alpha, state.params, i)) * w + s
         for i, (w, s) in enumerate(zip(state.params, S))]
    return MemoryState(state.params.like(M), state.params.like(S))


def combine(p, y, m):
    return ln(p["ln_y"], y) * sigmoid(ln(p["ln_m"], m))


def persistent(p, x, cfg):
    return np.concatenate([p["P"], x]) if cfg.num_persistent else x


def lmm_block(p, h, cfg):
    x = rms(p["norm"]["g"], h)
    xt = persistent(p["persistent"], x, cfg)
    y, _ = memory_stream(p["memory"], xt, cfg, MemoryState.initial(p["memory"]["M0"]))
    y = y[cfg.num_persistent:]
    o = rms(p["out"]["gate"]["norm"]["g"], y) * sigmoid(x @ p["out"]["gate"]["W_g"])
    return h + o @ p["out"]["W_O"]["W"]


def mag_block(p, h, cfg):
    n_p = cfg.num_persistent
    x = rms(p["norm"]["g"], h)
    xt = persistent(p["persistent"], x, cfg)  # Eq. 26
    y = attention_block(p["attn"], xt, window_rule(cfg.window, n_p), cfg)  # Eq. 27
    m, _ = memory_stream(p["memory"], xt, cfg, MemoryState.initial(p["memory"]["M0"]))
    o = combine(p["combine"], y, m)  # Eq. 28
    return h + o[n_p:] @ p["W_O"]["W"]


def mal_block(p, h, cfg):
    n_p = cfg.num_persistent
    ht = persistent(p["persistent"], h, cfg)  # Eq. 29
    y = lmm_block(p["lmm"], ht, cfg.with_(num_persistent=0))  # Eq. 30
    o = y + attention_block(p["attn"], rms(p["attn_norm"]["g"], y),
                            window_rule(cfg.window, n_p), cfg)  # Eq. 31
    return o[n_p:]


def mac_block(p, h, cfg, order="paper"):
    """Eqs. 21–25 segment by segment.

    ``order="paper"``: retrieve with M_{t-1}, attend, store y_t, read M_t(y_t) and gate.
    Two wrong orders, for the test that must tell them apart: ``"store_first"`` writes the
    segment's *input* into the memory before retrieving and attending, and ``"store_input"``
    keeps the paper's order but writes the input S^(t) instead of y_t.
    """
    x = rms(p["norm"]["g"], h)
    T, C, n_p = len(x), cfg.segment_len, cfg.num_persistent
    mem, attn = p["memory"], p["attn"]
    qx = l2n(silu(conv_proj(mem["qkv"]["q"], x)))
    Qx, Kx, Vx = (conv_proj(attn["qkv"][n], x) for n in ("q", "k", "v"))
    state = MemoryState.initial(mem["M0"])
    written = []  # the stream the memory has been written with (its convs run along it)
    outs = []
    for s in range(0, T, C):
        seg = list(range(s, min(s + C, T)))
        n = len(seg)
        if order == "store_first":
            _, state = memory_stream(mem, x[seg], cfg, state)
        h_mem = np.array([memory_forward(state.params, qx[t]) for t in seg])  # Eq. 21
        h_mem = rms(p["memory_tokens"]["g"], h_mem)
        pre = np.concatenate([p["persistent"]["P"], h_mem]) if n_p else h_mem
        Q, K, V = (np.concatenate([pre @ attn["qkv"][name]["lin"]["W"], z[seg]])
                   for name, z in zip("qkv", (Qx, Kx, Vx)))  # Eq. 22

        def visible(i, j, n=n):
            if j < n_p:
                return True
            if j < n_p + n:  # memory token m = j - n_p
                m = j - n_p
                row = i - n_p - n if i >= n_p + n else i - n_p
                return (not cfg.memory_causal) or i < n_p or row >= m
            return i >= n_p + n and j <= i  # causal inside the segment

        y = x[seg] + attention_rows(Q, K, V, visible, cfg.num_heads)[n_p + n:] @ attn["W_O"]["W"]
        if order == "store_first":
            m = np.array([memory_forward(state.params, q) for q in memory_qkv(mem, y)[0]])
        else:
            src = x[seg] if order == "store_input" else y  # Eq. 24 writes y_t
            written.append(src)
            stream = np.concatenate(written)
            # the projections and gates along the whole written stream, so the convs see
            # its history; only this segment's tokens are new writes
            q, k, v = (z[-n:] for z in memory_qkv(mem, stream))
            a, e, th = (g[-n:] for g in gates(mem["gates"], stream, cfg))
            ms, st = [], state  # the memory as the previous segment left it
            for t in range(n):  # the chunks of Eqs. 16–18 start again with each segment
                if t % cfg.chunk_size == 0:
                    start = st.params
                st = memory_write(st, start, k[t], v[t], a[t], e[t], th[t], cfg)
                ms.append(memory_forward(st.params, q[t]))  # M*_t(y_t), Eq. 25
            state = st
            m = np.array(ms)
        outs.append(combine(p["combine"], y, m))  # Eq. 25
    return h + np.concatenate(outs) @ p["W_O"]["W"]


def swa_block(p, h, cfg):
    return h + attention_block(p["attn"], rms(p["norm"]["g"], h), window_rule(cfg.window, 0), cfg)


def transformer_block(p, h, cfg):
    return h + attention_block(p["attn"], rms(p["norm"]["g"], h), window_rule(None, 0), cfg)


def _linear_qkv(p, x):
    q = l2n(silu(conv_proj(p["qkv"]["q"], x)))
    k = l2n(silu(conv_proj(p["qkv"]["k"], x)))
    return q, k, silu(conv_proj(p["qkv"]["v"], x))


def _gated_out(p, y, x):
    o = rms(p["out"]["gate"]["norm"]["g"], y) * sigmoid(x @ p["out"]["gate"]["W_g"])
    return o @ p["out"]["W_O"]["W"]


def linear_attention_block(p, h, cfg):
    x = rms(p["norm"]["g"], h)
    q, k, v = _linear_qkv(p, x)
    M = np.zeros((k.shape[1], v.shape[1]))
    ys = []
    for t in range(len(x)):  # Eqs. 4–5: M_t = M_{t-1} + k_t^T v_t, y_t = q_t M_t
        M = M + np.outer(k[t], v[t])
        ys.append(q[t] @ M)
    return h + _gated_out(p, np.array(ys), x)


def gated_delta_block(p, h, cfg):
    x = rms(p["norm"]["g"], h)
    q, k, v = _linear_qkv(p, x)
    beta = sigmoid(x @ p["w_beta"] + p["b_beta"])
    alpha = sigmoid(x @ p["w_alpha"] + p["b_alpha"])
    return h + _gated_out(p, gated_delta_rule(q, k, v, beta, alpha), x)


BLOCKS = {"lmm": lmm_block, "mac": mac_block, "mag": mag_block, "mal": mal_block,
          "swa": swa_block, "transformer": transformer_block,
          "linear_attention": linear_attention_block, "gated_delta": gated_delta_block}


def naive_forward(params, tokens, cfg, **block_kwargs):
    """Logits (T, V) for one sequence of int tokens (T,)."""
    h = params["embed"]["E"][tokens]
    for layer in params["layers"]:
        h = BLOCKS[cfg.model](layer["mixer"], h, cfg, **block_kwargs)
        if "ffn" in layer:
            f = layer["ffn"]
            h = h + gelu(rms(f["norm"]["g"], h) @ f["W1"]["W"]) @ f["W2"]["W"]
    return rms(params["head"]["norm"]["g"], h) @ params["head"]["W"]["W"]


# --- token by token, keeping only what the past leaves behind --------------------------------
#
# A recurrent decoder written from the equations: each layer keeps explicit Python lists
# (the convolution's past inputs, the keys and values attention may still see) and the
# memory's MemoryState, and reads one token per call. It shares no code with the models'
# stream; comparing the two checks that stream's state holds everything the future needs.


def conv_step(p, x, hist):
    """One output of x W followed by the causal conv; ``hist`` (a list) keeps past x W."""
    z = x @ p["lin"]["W"]
    if "conv" not in p:
        return z
    hist.append(z)
    w, b = p["conv"]["w"], p["conv"]["b"]
    return b + sum(w[j] * hist[-1 - j] for j in range(len(w)) if j < len(hist))


def new_memory_state(p_mem):
    return {"conv": {n: [] for n in "qkv"}, "mem": MemoryState.initial(p_mem["M0"])}


def memory_token(p_mem, x, cfg, st):
    """Eqs. 13–14 for one token x (d,), then the read M_t(q_t) (Eq. 15)."""
    q, k, v = (conv_step(p_mem["qkv"][n], x, st["conv"][n]) for n in "qkv")
    q, k, v = l2n(silu(q)), l2n(silu(k)), silu(v)
    alpha, eta, theta = gates(p_mem["gates"], x[None], cfg)
    st["mem"] = memory_step(st["mem"], k, v, alpha=alpha[0], eta=eta[0], theta=theta[0],
                            max_grad_norm=cfg.max_grad_norm or None)
    return memory_forward(st["mem"].params, q)


def new_attention_state():
    return {"conv": {n: [] for n in "qkv"}, "prefix": [], "keys": []}


def attention_token(p_attn, x, cfg, st, window, is_prefix=False):
    """Eq. 2 for one query: the prefix keys always, the last ``window`` keys (itself too)."""
    q, k, v = (conv_step(p_attn["qkv"][n], x, st["conv"][n]) for n in "qkv")
    (st["prefix"] if is_prefix else st["keys"]).append((k, v))
    recent = st["keys"] if window is None else st["keys"][-window:]
    return attend_one(q, st["prefix"] + recent, cfg) @ p_attn["W_O"]["W"]


def attend_one(q, kv, cfg):
    """softmax(q k_j / sqrt(d_h)) v_j over the (k_j, v_j) pairs ``kv``, head by head."""
    H = cfg.num_heads
    dh = len(q) // H
    y = np.zeros_like(q)
    for h in range(H):
        c = slice(h * dh, (h + 1) * dh)
        s = np.array([q[c] @ kj[c] for kj, _ in kv]) / math.sqrt(dh)
        e = np.exp(s - s.max())
        y[c] = sum(wt * vj[c] for wt, (_, vj) in zip(e / e.sum(), kv))
    return y


def gated_out(p, y, x):
    return _gated_out(p, y[None], x[None])[0]


class NaiveDecoder:
    """``step(token) -> logits (V,)`` for every model (``chunk_size`` 1; MAC with
    ``memory_causal``), one token per call."""

    def __init__(self, params, cfg):
        assert cfg.chunk_size == 1 and (cfg.model != "mac" or cfg.memory_causal)
        self.params, self.cfg = params, cfg
        self.states = [None] * len(params["layers"])

    def step(self, token):
        cfg = self.cfg
        h = self.params["embed"]["E"][token]
        for i, layer in enumerate(self.params["layers"]):
            first = self.states[i] is None
            if first:
                self.states[i] = self._new_state(layer["mixer"])
            h = getattr(self, "_" + cfg.model)(layer["mixer"], h, self.states[i], first)
            if "ffn" in layer:
                f = layer["ffn"]
                h = h + gelu(rms(f["norm"]["g"], h) @ f["W1"]["W"]) @ f["W2"]["W"]
        return rms(self.params["head"]["norm"]["g"], h) @ self.params["head"]["W"]["W"]

    def _new_state(self, p):
        m = self.cfg.model
        if m == "lmm":
            return new_memory_state(p["memory"])
        if m == "mag":
            return {"attn": new_attention_state(), "mem": new_memory_state(p["memory"])}
        if m == "mal":
            return {"attn": new_attention_state(), "mem": new_memory_state(p["lmm"]["memory"])}
        if m in ("swa", "transformer"):
            return new_attention_state()
        if m == "mac":
            return {"qx": [], "attn": {n: [] for n in "qkv"}, "memory_kv": [], "segment_kv": [],
                    "writer": new_memory_state(p["memory"]),
                    "start": MemoryState.initial(p["memory"]["M0"])}
        d = self.cfg.d_model
        return {"conv": {n: [] for n in "qkv"}, "W": np.zeros((d, d))}

    def _lmm(self, p, h, st, first, n_p=None):
        cfg = self.cfg
        n_p = cfg.num_persistent if n_p is None else n_p
        if first:  # Eq. 19: the persistent tokens are the memory's first writes
            for row in p["persistent"]["P"][:n_p]:
                memory_token(p["memory"], row, cfg, st)
        x = rms(p["norm"]["g"], h)
        return h + gated_out(p, memory_token(p["memory"], x, cfg, st), x)

    def _mag(self, p, h, st, first):
        cfg = self.cfg
        if first:  # Eq. 26: the persistent rows enter both branches first
            for row in p["persistent"]["P"][:cfg.num_persistent]:
                attention_token(p["attn"], row, cfg, st["attn"], cfg.window, is_prefix=True)
                memory_token(p["memory"], row, cfg, st["mem"])
        x = rms(p["norm"]["g"], h)
        y = attention_token(p["attn"], x, cfg, st["attn"], cfg.window)  # Eq. 27
        m = memory_token(p["memory"], x, cfg, st["mem"])
        return h + combine(p["combine"], y, m) @ p["W_O"]["W"]  # Eq. 28

    def _mal(self, p, h, st, first):
        cfg = self.cfg
        lmm = p["lmm"]

        def lmm_row(row):  # Eq. 30, the LMM block (no persistent tokens of its own)
            x = rms(lmm["norm"]["g"], row)
            return row + gated_out(lmm, memory_token(lmm["memory"], x, cfg, st["mem"]), x)

        if first:  # Eq. 29: the persistent rows go through the LMM, then are attention's prefix
            for row in p["persistent"]["P"][:cfg.num_persistent]:
                y = lmm_row(row)
                attention_token(p["attn"], rms(p["attn_norm"]["g"], y), cfg, st["attn"],
                                cfg.window, is_prefix=True)
        y = lmm_row(h)
        return y + attention_token(p["attn"], rms(p["attn_norm"]["g"], y), cfg, st["attn"],
                                   cfg.window)  # Eq. 31

    def _mac(self, p, h, st, first):
        """Eqs. 21–25 for one token: retrieve with the memory of the segment's start, attend
        to [p] ‖ the segment's memory tokens so far ‖ its tokens so far, write y_t, gate."""
        cfg = self.cfg
        mem, attn = p["memory"], p["attn"]
        x = rms(p["norm"]["g"], h)
        qx = l2n(silu(conv_step(mem["qkv"]["q"], x, st["qx"])))
        q, k, v = (conv_step(attn["qkv"][n], x, st["attn"][n]) for n in "qkv")
        h_mem = rms(p["memory_tokens"]["g"], memory_forward(st["start"].params, qx))  # Eq. 21
        lin = {n: attn["qkv"][n]["lin"]["W"] for n in "kv"}
        st["memory_kv"].append((h_mem @ lin["k"], h_mem @ lin["v"]))
        st["segment_kv"].append((k, v))
        P = p["persistent"]["P"][:cfg.num_persistent]
        kv = list(zip(P @ lin["k"], P @ lin["v"])) + st["memory_kv"] + st["segment_kv"]
        y = x + attend_one(q, kv, cfg) @ attn["W_O"]["W"]  # Eqs. 22–23
        m = memory_token(mem, y, cfg, st["writer"])  # Eq. 24, then M*_t(y_t)
        if len(st["segment_kv"]) == cfg.segment_len:  # the next segment retrieves from here
            st["start"], st["memory_kv"], st["segment_kv"] = st["writer"]["mem"], [], []
        return h + combine(p["combine"], y, m) @ p["W_O"]["W"]  # Eq. 25

    def _swa(self, p, h, st, first):
        return h + attention_token(p["attn"], rms(p["norm"]["g"], h), self.cfg, st,
                                   self.cfg.window)

    def _transformer(self, p, h, st, first):
        return h + attention_token(p["attn"], rms(p["norm"]["g"], h), self.cfg, st, None)

    def _linear(self, p, h, st, gated):
        x = rms(p["norm"]["g"], h)
        q, k, v = (conv_step(p["qkv"][n], x, st["conv"][n]) for n in "qkv")
        q, k, v = l2n(silu(q)), l2n(silu(k)), silu(v)
        if gated:  # Gated DeltaNet: decay, then the delta step at the decayed W
            beta = sigmoid(x @ p["w_beta"] + p["b_beta"])
            alpha = sigmoid(x @ p["w_alpha"] + p["b_alpha"])
            W = (1.0 - alpha) * st["W"]
            st["W"] = W - beta * np.outer(k, k @ W - v)
        else:  # Eqs. 4–5: M_t = M_{t-1} + k_t^T v_t
            st["W"] = st["W"] + np.outer(k, v)
        return h + gated_out(p, q @ st["W"], x)

    def _linear_attention(self, p, h, st, first):
        return self._linear(p, h, st, gated=False)

    def _gated_delta(self, p, h, st, first):
        return self._linear(p, h, st, gated=True)
