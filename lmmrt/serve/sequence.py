"""One admitted request on the scheduler's side: its prompt on the device, media, cache row,
progress, sampler and text; and the per-row sampling of a step's logits.

Text is produced by lmmrt.runtime.text_output's row text (incremental detokenization, stop
strings held back until they cannot match), the same code as lmmrt.generate's, so the deltas of a
request add up to what generate returns for it.
"""

from __future__ import annotations

import time

import torch

from lmmrt.runtime.generation_args import GenerationArgs
from lmmrt.runtime.sampling import sample
from lmmrt.runtime.text_output import _RowText
from lmmrt.serve.requests import Delta, Finished, RequestHandle


class Sequence:
    """handle: the client's side; batch: the request built by lmmrt.runtime.batch (one row, no
    padding); args: its checked generation options; media_keys: content key of each media item."""

    def __init__(self, handle: RequestHandle, batch, ids: list[int], args: GenerationArgs, media_keys: list[str],
                 tokenizer, device):
        self.handle = handle
        self.batch = batch
        self.ids = ids
        self.tokens = batch.tokens
        self.text_time = batch.text_time
        self.media_keys = media_keys
        self.args = args
        self.row_text = _RowText(tokenizer, args)
        self.generator = None
        if args.temperature > 0 and args.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(args.seed)
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.slot = -1
        self.prefilled = 0  # prompt positions in the cache
        self.length = 0  # positions in the cache (prompt, then one per decode step)
        self.last_token = -1  # the token the next decode step feeds
        # media, set at admission: per block packed (k, v) of this request (cross-attention) or the
        # features of its markers in order (splice)
        self.media_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.features: torch.Tensor | None = None
        self.media_count_int = len(media_keys)
        self.media_start = torch.zeros(1, dtype=torch.int32, device=device)
        self.media_count = torch.tensor([self.media_count_int], dtype=torch.int32, device=device)
        # Mllama: each token's first image and each image's valid keys (None for other families)
        self.text_time_first = batch.text_time_first
        self.media_len = batch.media_len
        # decode tokens keep the media of the last prompt token (as lmmrt.generate does)
        self.decode_text_time = int(batch.text_time[0, -1])
        self.decode_text_time_first = None if batch.text_time_first is None else int(batch.text_time_first[0, -1])

    @property
    def prompt_len(self) -> int:
        return len(self.ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.row_text.token_ids)

    def accept(self, tid: int) -> bool:
        """Take the next token: emit its text; True when the request has finished (stop or length)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        n = self.completion_tokens + 1
        reason = "stop" if tid in self.args.stop_ids else ("length" if n >= self.args.max_new_tokens else None)
        piece = self.row_text.push(tid, reason)
        self.handle.emit(Delta(text=piece, token_ids=[tid]))
        self.last_token = tid
        return self.row_text.reason is not None

    def finish(self, reason: str | None = None, error: str | None = None) -> None:
        """Send the Finished event: the row text's own reason, or the one given (cancelled, error)."""
        self.handle.emit(Finished(finish_reason=reason or self.row_text.reason, prompt_tokens=self.prompt_len,
                                  completion_tokens=self.completion_tokens, error=error))


def sample_rows(logits: torch.Tensor, rows: list[tuple[int, Sequence]]) -> list[int]:
    """Each (row, sequence)'s next token from logits (n, V), with its own options: greedy rows
    in one argmax, each sampling row with its own generator (so a seeded request draws the same
    tokens whatever runs beside it). NAN_TOKEN for a row whose logits hold a NaN. One host sync."""
    greedy = sample(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None)
    picks = []
    for r, s in rows:
        a = s.args
        if a.temperature > 0:
            picks.append(sample(logits[r:r + 1], temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                                generator=s.generator)[0])
        else:
            picks.append(greedy[r])
    return torch.stack(picks).tolist() if picks else []


NAN_MESSAGE = ("the model produced NaN logits for this request: no token can be sampled; check the weights and "
               "the dtype (float16 can overflow)")
