"""Next-token selection: greedy, temperature, top-k, top-p, repetition penalty; seeded.

Everything stays on the device with no host sync (so a decode step can be queued while the
previous step's tokens travel to the host): sampling is gpt-fast's exponential race instead of
torch.multinomial, and a row whose logits hold a NaN gets the token NAN_TOKEN, which the caller
turns into an error once the tokens reach the host.
"""

from __future__ import annotations

import torch

NAN_TOKEN = -1  # a row whose logits hold a NaN: no token can be chosen honestly


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as in HF): seen tokens' positive logits are divided, negative multiplied.
    logits (B, V) float; seen (B, V) bool."""
    if penalty == 1.0:
        return logits
    pen = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, pen, logits)


def exponential_race(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of the categorical distribution probs (B, V): argmax(p_i / E_i) with
    E_i ~ Exponential(1) i.i.d. picks i with probability p_i (E_i / p_i is Exponential(p_i), and the
    smallest of independent exponentials is i with probability p_i / sum p). No host sync, unlike
    torch.multinomial. Zero-probability tokens are never picked (p / E = 0 < any positive ratio)."""
    noise = torch.empty_like(probs, dtype=torch.float32).exponential_(1.0, generator=generator)
    noise.clamp_(min=torch.finfo(torch.float32).tiny)  # a draw of exactly 0 would make 0 / 0 = NaN
    return (probs.float() / noise).argmax(dim=-1)


def sample(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) float32 -> token ids (B,) on the same device; NAN_TOKEN for a row with a NaN
    logit. temperature 0 is greedy (argmax), and so is a temperature so small that a finite logit
    divided by it overflows to +-inf: its softmax would be NaN, and the distribution it stands for is
    the greedy one (all the mass on the top token)."""
    greedy = logits.argmax(dim=-1)
    if temperature <= 0.0:
        tokens = greedy
    else:
        scaled = logits / temperature
        overflow = (scaled.isinf() & logits.isfinite()).any(dim=-1)
        if top_k > 0 and top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # drop a token when the mass before it already reaches top_p; the top token always stays,
            # also when top_p is below float32's smallest number (0 >= top_p in float32)
            drop = probs.cumsum(dim=-1) - probs >= top_p
            drop[:, 0] = False
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
        tokens = torch.where(overflow, greedy, exponential_race(torch.softmax(scaled, dim=-1), generator))
    # argmax picks a row's first NaN when it has one (NaN compares greater than any number), so
    # reading the logit at the greedy token finds every NaN row without another pass over the vocab
    has_nan = logits.gather(-1, greedy[:, None]).squeeze(-1).isnan()
    return torch.where(has_nan, NAN_TOKEN, tokens)
