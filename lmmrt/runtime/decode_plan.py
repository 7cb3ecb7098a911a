"""Plan once, run many: what every forward call of one batch shares, computed once per batch.

The contexts of the prompt forward and of each eager decode step (positions, masks only where the
batch needs them, the RoPE tables from cached inverse frequencies, the ALiBi bias in the model
dtype with the mask folded in), and the media keys each decode token sees, gathered once for the
torch cross-attention path instead of per block and per step.
"""

from __future__ import annotations

import torch

from lmmrt.kernels import backend as _backend
from lmmrt.models.decoder import StepContext
from lmmrt.models.xattn import GatheredMedia, MediaContext
from lmmrt.runtime.batch import Batch


class DecodePlan:
    def __init__(self, module, batch: Batch):
        self.decoder = module.decoder
        self.pad = batch.pad
        T = batch.tokens.shape[1]
        # Rows of one length need no mask at all: SDPA's causal prefill and a maskless decode.
        self.padded = any(n != T for n in batch.lengths)
        self.keys = None

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (a 1-D index tensor): finished rows dropped."""
        self.pad = self.pad[rows]

    def prefill_context(self, T: int) -> StepContext:
        dev = self.pad.device
        slots = torch.arange(T, device=dev)
        positions = (slots[None, :] - self.pad[:, None]).clamp(min=0)
        if not self.padded:
            return self.decoder.context(positions, 0, T, None, causal=True)
        key_ok = slots[None, :] >= self.pad[:, None]  # (B, T)
        causal = slots[:, None] >= slots[None, :]  # (T, T)
        mask = key_ok[:, None, :] & causal[None]
        mask = mask | torch.eye(T, dtype=torch.bool, device=dev)[None]  # pad rows see themselves: no NaN
        return self.decoder.context(positions, 0, T, mask[:, None])

    def decode_context(self, slot: int) -> StepContext:
        """The eager step writing one token per row at the int cache `slot`."""
        positions = (slot - self.pad)[:, None]
        mask = None
        if self.padded:
            if self.keys is None or self.keys.shape[0] <= slot:
                self.keys = torch.arange(2 * (slot + 1), device=self.pad.device)
            mask = (self.keys[None, :slot + 1] >= self.pad[:, None])[:, None, None, :]
        return self.decoder.context(positions, slot, slot + 1, mask)


class EagerDecode:
    """The eager decode step of one batch: (tokens (B,), int slot) -> logits (B, V). Rows whose
    generation has finished can be dropped (`select`), so they stop costing work."""

    def __init__(self, module, batch: Batch, cache, media: MediaContext):
        self.module, self.cache, self.media = module, cache, media
        self.plan = DecodePlan(module, batch)

    def __call__(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        # a NaN row's token -1 reads as token 0 (the row raises on the host anyway)
        return self.module(tokens.clamp(min=0)[:, None], self.plan.decode_context(slot), self.cache, self.media,
                           logits_for="last")

    def worth_compacting(self, steps_left: int) -> bool:
        """Dropping rows costs a copy of the live rows' cache, about what one step reads: always
        worth it with a step to go."""
        return steps_left > 0

    def select(self, rows: torch.Tensor) -> None:
        """Keep the batch rows `rows`: their KV cache rows are copied out (the pool's buffer is not
        written), so this is worth it only when many rows have finished."""
        self.cache = type(self.cache)(self.cache.k.index_select(1, rows), self.cache.v.index_select(1, rows))
        self.media = self.media.select(rows)
        self.plan.select(rows)


def _seen_media(mode: str, t: int, first: int, start: int, count: int) -> tuple[int, int, bool]:
    """(first packed media item, how many, uniform) a decode token of one row sees (the op's rules:
    lmmrt/kernels/masked_cross_attention.py)."""
    if mode == "cumulative":
        # OpenFlamingo: a row before any media averages all its media uniformly
        return start, (count if t == 0 else max(min(t, count), 0)), t == 0 and count > 0
    if mode == "range":
        lo, hi = max(first, 1), min(t, count)
        return start + lo - 1, (hi - lo + 1 if t >= 1 and lo <= hi else 0), False
    return start + t - 1, (1 if 1 <= t <= count else 0), False


def gather_media(module, media: MediaContext, backend: str) -> GatheredMedia | None:
    """Each row's decode-time media keys, gathered once per batch, for the torch path of the
    cross-attention (the kernels read the packed cache directly and need none of it: None).
    media.text_time (B, 1) is the decode token's media ordinal (that of the last prompt token);
    a context with text_time_first (Mllama) uses the "range" rule, else the model's mask_mode;
    media.media_len, when set, cuts each media item's keys. K/V keep their (grouped) kv heads."""
    if not media.any_media or not module.xattn:
        return None
    dev = media.text_time.device
    if _backend.resolve_name("masked_cross_attention", backend, dev) != "torch":
        return None
    mode = "range" if media.text_time_first is not None else module.cfg.xattn.mask_mode
    # One host read per batch (the plan), never per step.
    tt = media.text_time[:, 0].tolist()
    ttf = tt if media.text_time_first is None else media.text_time_first[:, 0].tolist()
    start, count = media.media_start.tolist(), media.media_count.tolist()
    seen = [_seen_media(mode, *row) for row in zip(tt, ttf, start, count)]
    most = max(n for _, n, _ in seen)
    if most == 0:
        return None
    idx = torch.tensor([[first + min(i, max(n - 1, 0)) if n else 0 for i in range(most)] for first, n, _ in seen],
                       device=dev)  # (B, most): a row with fewer media repeats one, masked below
    valid = torch.tensor([[i < n for i in range(most)] for _, n, _ in seen], device=dev)
    ks, vs = [], []
    for k, v in media.kv:  # (N, L, KVH, dh) each
        B, L = idx.shape[0], k.shape[1]
        ks.append(k[idx].reshape(B, most * L, *k.shape[2:]).transpose(1, 2).contiguous())
        vs.append(v[idx].reshape(B, most * L, *v.shape[2:]).transpose(1, 2).contiguous())
    L = media.kv[0][0].shape[1]
    key_ok = valid[:, :, None].expand(-1, -1, L)
    if media.media_len is not None:
        key_ok = key_ok & (torch.arange(L, device=dev) < media.media_len.to(dev)[idx][:, :, None])
    key_ok = key_ok.reshape(-1, most * L)  # (B, most * L)
    empty = ~key_ok.any(dim=1)  # rows that see no key
    mask = None
    if not bool(key_ok.all()):
        # a row that sees nothing keeps its first (stand-in) key so its softmax stays finite
        first_key = torch.arange(most * L, device=dev) == 0
        mask = (key_ok | empty[:, None] & first_key)[:, None, None, :]
    dtype = ks[0].dtype
    q_scale = torch.tensor([0.0 if u else 1.0 for _, _, u in seen], dtype=dtype, device=dev).view(-1, 1, 1, 1) \
        if any(u for _, _, u in seen) else None
    out_scale = (~empty).to(dtype).view(-1, 1, 1, 1) if bool(empty.any()) else None
    return GatheredMedia(k=ks, v=vs, mask=mask, q_scale=q_scale, out_scale=out_scale)
