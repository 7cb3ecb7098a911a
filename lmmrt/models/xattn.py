"""GATED XATTN-DENSE (flamingo.md §4): text cross-attends to media latents through a mask, then a
feed-forward; both branches scaled by tanh gates.

Gates are constants at inference, so `fold_gates()` multiplies tanh(gate) into the last matrix of
each branch (per output row for vector gates) and marks branches whose gate is exactly zero, which
are then skipped. Media K/V are projected once per media item (`project_media`) into the media
cache; the attention reads them through lmmrt.kernels.masked_cross_attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmmrt.kernels.masked_cross_attention import masked_cross_attention
from lmmrt.models.config import ModelConfig
from lmmrt.models.layers import activation, make_norm


@dataclass
class MediaContext:
    """Per forward call: the media K/V of every block and which media each token sees.

    kv[j] = (k, v) each (N, L, KVH, dh), all sequences' media packed; text_time (B, T) media ordinal
    per token (0 = none); media_start, media_count (B,) each sequence's slice of the packed media.
    Mllama ("range" mask mode) adds text_time_first (B, T), the first media ordinal each token sees,
    and media_len (N,) int32, the valid keys of each media item (its tiles, not the padding tiles)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    text_time: torch.Tensor
    media_start: torch.Tensor
    media_count: torch.Tensor
    any_media: bool
    # Decode only: each row's media keys gathered once per batch (see GatheredMedia), used instead
    # of the masked op when that op would run its torch reference.
    gathered: GatheredMedia | None = None
    text_time_first: torch.Tensor | None = None
    media_len: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> MediaContext:
        """The context of the batch rows `rows` (a 1-D index tensor); the packed K/V (and media_len,
        one entry per packed media item) are shared."""
        return MediaContext(kv=self.kv, text_time=self.text_time[rows], media_start=self.media_start[rows],
                            media_count=self.media_count[rows], any_media=self.any_media,
                            gathered=None if self.gathered is None else self.gathered.select(rows),
                            text_time_first=None if self.text_time_first is None else self.text_time_first[rows],
                            media_len=self.media_len)


@dataclass
class GatheredMedia:
    """The media keys one decode token of each row sees, gathered once per batch.

    A decode token's media never change, so instead of re-deriving them every step (a host read of
    media_count.max(), a gather of every image of the row, a dense mask) the runtime gathers them
    once: k[j], v[j] (B, KVH, K, dh) for block j, K the most keys any row sees, KVH dividing the
    query heads (grouped-query attention); mask (B, 1, 1, K) bool or None when every row sees all K;
    q_scale (B, 1, 1, 1) zero for an OpenFlamingo cumulative row before any media (zero scores: a
    uniform average), or None; out_scale (B, 1, 1, 1) zero for a row that sees no key (it attends
    to a stand-in key, then gets zeros), or None."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    mask: torch.Tensor | None
    q_scale: torch.Tensor | None
    out_scale: torch.Tensor | None

    def select(self, rows: torch.Tensor) -> GatheredMedia:
        def pick(t):
            return None if t is None else t[rows]

        return GatheredMedia(k=[k[rows] for k in self.k], v=[v[rows] for v in self.v], mask=pick(self.mask),
                             q_scale=pick(self.q_scale), out_scale=pick(self.out_scale))

    def attend(self, q: torch.Tensor, j: int) -> torch.Tensor:
        """q (B, 1, H, dh) -> (B, 1, H, dh): block j's cross-attention of the decode token."""
        B, _, H, dh = q.shape
        kvh = self.k[j].shape[1]
        # One query token: the H // kvh query heads of one kv head become that head's query rows
        # (head h = kv head h // (H // kvh)), so grouped K/V are read as they are, never repeated.
        q = q.reshape(B, kvh, H // kvh, dh)
        if self.q_scale is not None:
            q = q * self.q_scale
        out = F.scaled_dot_product_attention(q, self.k[j], self.v[j], attn_mask=self.mask)
        if self.out_scale is not None:
            out = out * self.out_scale
        return out.reshape(B, 1, H, dh)


class GatedCrossAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        xc, d = cfg.xattn, cfg.decoder.dim
        self.cfg = xc
        inner = xc.heads * xc.head_dim
        idefics = xc.style in ("idefics", "mllama")  # mllama blocks: IDEFICS's RMSNorms and SwiGLU
        norm_kind = "rms" if idefics else "ln"
        self.attn_norm = make_norm(norm_kind, d, xc.norm_eps)
        self.wq = nn.Linear(d, inner, bias=False)
        self.wkv = nn.Linear(xc.media_dim, 2 * xc.kv_heads * xc.head_dim, bias=False)  # k rows, then v rows
        self.wo = nn.Linear(inner, d, bias=False)
        if xc.qk_norm:
            self.q_norm = make_norm("rms", xc.head_dim, xc.norm_eps)
            self.k_norm = make_norm("rms", xc.head_dim, xc.norm_eps)
        gate_shape = (d,) if xc.gate_type == "vector" else (1,)
        self.attn_gate = nn.Parameter(torch.zeros(gate_shape))
        self.ff_gate = nn.Parameter(torch.zeros(gate_shape))
        self.ff_norm = make_norm(norm_kind, d, xc.norm_eps)
        if idefics:  # SwiGLU
            self.ff_w13 = nn.Linear(d, 2 * xc.ffn_dim, bias=False)
        else:  # GELU MLP
            self.ff_w1 = nn.Linear(d, xc.ffn_dim, bias=False)
        self.ff_w2 = nn.Linear(xc.ffn_dim, d, bias=False)
        # mllama: transformers builds the cross-attention layers' MLP with the text model's hidden_act
        self.act = activation(cfg.decoder.act if xc.style == "mllama" else "silu" if idefics else "gelu")
        self.backend = "torch"
        self.gates_folded = False
        self.skip_attn = False
        self.skip_ff = False

    @torch.no_grad()
    def fold_gates(self) -> None:
        """Fold tanh(gate) into wo and ff_w2 (exact up to rounding); skip zero-gate branches."""
        if self.gates_folded:
            return
        for gate, w in ((self.attn_gate, self.wo.weight), (self.ff_gate, self.ff_w2.weight)):
            g = torch.tanh(gate.float())
            # (1,) broadcasts; (D,) scales output rows. A new tensor, not copy_: the weight may share
            # memory with the caller's state dict (load_state_dict(assign=True)), which must not change.
            w.data = (w.float() * g[:, None]).to(w.dtype)
        self.skip_attn = bool((self.attn_gate == 0).all())
        self.skip_ff = bool((self.ff_gate == 0).all())
        self.gates_folded = True

    def project_media(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (N, L, media_dim) -> k, v each (N, L, kv_heads, dh), k normalized when qk_norm."""
        xc = self.cfg
        n, L, _ = latents.shape
        kv = self.wkv(latents.to(self.wkv.weight.dtype)).view(n, L, 2, xc.kv_heads, xc.head_dim)
        k, v = kv[:, :, 0], kv[:, :, 1]
        if xc.qk_norm:
            k = self.k_norm(k)
        return k.contiguous(), v.contiguous()

    def _gate(self, gate, x):
        return x if self.gates_folded else torch.tanh(gate.float()).to(x.dtype) * x

    def forward(self, x: torch.Tensor, media: MediaContext, j: int) -> torch.Tensor:
        xc = self.cfg
        b, t, _ = x.shape
        if media.any_media and not self.skip_attn:
            q = self.wq(self.attn_norm(x)).view(b, t, xc.heads, xc.head_dim)
            if xc.qk_norm:
                q = self.q_norm(q)
            if media.gathered is not None:
                a = media.gathered.attend(q, j)
            else:
                k, v = media.kv[j]
                a = masked_cross_attention(q, k, v, media.text_time, media.media_start, media.media_count,
                                           mode=xc.mask_mode, text_time_first=media.text_time_first,
                                           media_len=media.media_len, backend=self.backend)
            branch = self._gate(self.attn_gate, self.wo(a.reshape(b, t, -1)))
            if not self.skip_ff:  # residual add fused into the feed-forward's norm
                h, x = self.ff_norm.add(branch, x)
                return x + self._gate(self.ff_gate, self.ff_w2(self._ff_hidden(h)))
            x = x + branch
        # With no media anywhere in the batch every attention row is zero: the branch adds nothing.
        if not self.skip_ff:
            x = x + self._gate(self.ff_gate, self.ff_w2(self._ff_hidden(self.ff_norm(x))))
        return x

    def _ff_hidden(self, h: torch.Tensor) -> torch.Tensor:
        if self.cfg.style != "openflamingo":  # SwiGLU (idefics, mllama)
            g, u = self.ff_w13(h).chunk(2, dim=-1)
            return self.act(g) * u
        return self.act(self.ff_w1(h))
