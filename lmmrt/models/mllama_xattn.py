"""Llama 3.2 Vision's cross-attention decoder layer (transformers' MllamaCrossAttentionDecoderLayer)
as an lmmrt gated block: RMSNorm -> q (RMS-normed per head) over the image keys (k RMS-normed per
head at project_media, grouped K/V heads) -> o, tanh-gated; RMSNorm -> SwiGLU MLP, tanh-gated.

The layers, gate folding (tanh(gate) folded into wo and ff_w2 at load) and media projection are
GatedCrossAttention's (style "mllama"); what differs is the mask (which tokens see what):
- a token sees the images text_time_first..text_time of its row, each image's valid tiles only
  (MediaContext.media_len), through masked_cross_attention's "range" mode;
- a token before the first image of a row that has images (text_time 0): transformers turns its
  all-masked row into an unmasked one, so it attends to every key of every image of its row,
  padding tiles included (a full softmax over them, not a uniform average), and its MLP branch is
  multiplied by full_text_row_masked_out_mask = 0;
- a row with no image: transformers skips the layer when no prompt has an image; lmmrt computes
  each row as if alone, so such a row passes through unchanged (its attention is zero, its MLP
  branch is off) also beside rows that have images.
"""

from __future__ import annotations

import torch

from lmmrt.kernels.masked_cross_attention import masked_cross_attention
from lmmrt.models.xattn import GatedCrossAttention, MediaContext


def tokens_before_media(media: MediaContext) -> torch.Tensor | None:
    """(B, T) bool: the tokens before the first image of rows that have images, or None when the
    call has none (the decode step never has: its token comes after every marker of its prompt).
    One host read, so call it once per forward call, not per block."""
    if not media.any_media:
        return None
    before = (media.text_time == 0) & (media.media_count > 0)[:, None]
    return before if bool(before.any()) else None


class MllamaCrossAttention(GatedCrossAttention):
    def forward(self, x: torch.Tensor, media: MediaContext, j: int, *,
                before_media: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D) through block j. before_media: tokens_before_media(media)."""
        if not media.any_media:
            return x  # transformers skips the layer when no prompt of the call has an image
        xc = self.cfg
        b, t, _ = x.shape
        if not self.skip_attn:
            q = self.q_norm(self.wq(self.attn_norm(x)).view(b, t, xc.heads, xc.head_dim))
            a = self._attend(q, media, j, before_media)
            branch = self._gate(self.attn_gate, self.wo(a.reshape(b, t, -1)))
            if self.skip_ff:
                return x + branch
            h, x = self.ff_norm.add(branch, x)  # residual add fused into the MLP's norm
        elif self.skip_ff:
            return x
        else:
            h = self.ff_norm(x)
        sees_image = (media.text_time > 0)[..., None].to(x.dtype)  # full_text_row_masked_out_mask
        return x + self._gate(self.ff_gate, self.ff_w2(self._ff_hidden(h))) * sees_image

    def _attend(self, q: torch.Tensor, media: MediaContext, j: int,
                before_media: torch.Tensor | None) -> torch.Tensor:
        """q (B, T, H, dh) -> (B, T, H, dh): each token's attention over the images it sees."""
        if media.gathered is not None:  # decode on the torch path: keys gathered once per batch
            return media.gathered.attend(q, j)
        k, v = media.kv[j]
        a = masked_cross_attention(q, k, v, media.text_time, media.media_start, media.media_count, mode="range",
                                   text_time_first=media.text_time_first, media_len=media.media_len,
                                   backend=self.backend)
        if before_media is None:
            return a
        # every image of the row (ordinals 1..media_count), every key of each (media_len not applied)
        last = torch.where(before_media, media.media_count[:, None].to(media.text_time.dtype), 0)
        every = masked_cross_attention(q, k, v, last, media.media_start, media.media_count, mode="range",
                                       text_time_first=torch.ones_like(last), backend=self.backend)
        return torch.where(before_media[..., None, None], every, a)
