"""A decode step with fixed shapes, replayed as a CUDA graph.

The eager decode step attends over a cache prefix that grows by one each step, and writes the new
K/V at a Python-int slot: shapes change, so it cannot be captured. This step instead attends over
the whole static cache with a mask computed on the device from a slot *tensor*, and writes K/V with
index_copy_ at that tensor slot: every step has the same shapes and addresses, so on CUDA it is
captured once into a CUDA graph and replayed (one launch per step instead of hundreds). Elsewhere,
or when capture is not possible, the same static step runs eagerly — which is how the CPU tests
prove it computes exactly what the eager decode does.

Capture needs every op of the step to be free of host syncs: the torch reference of the masked
cross-attention reads `media_count.max()` on the host, so graphs are used only when that op
resolves to a kernel (triton or cuda).
"""

from __future__ import annotations

import torch

from lmmrt.kernels import backend as _backend


def graph_capturable(model) -> bool:
    dev = model.device
    if dev.type != "cuda":
        return False
    # The cuda entry hands shapes it does not support (fp32, other head dims) to Triton when it is
    # installed, else to the torch reference, which is not capturable.
    return (_backend.resolve_name("masked_cross_attention", model.backend, dev) != "torch"
            and _backend.triton_available())


class StaticDecodeStep:
    def __init__(self, model, batch, cache, media, *, use_graph: bool):
        self.model, self.batch, self.cache, self.media = model, batch, cache, media
        dev = model.device
        B = batch.size
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.keys = torch.arange(cache.max_len, device=dev)
        self.use_graph = use_graph and graph_capturable(model)
        self.graph = None
        self.logits = None

    def _forward(self) -> torch.Tensor:
        module, pad = self.model.module, self.batch.pad
        positions = (self.slot - pad)[:, None]  # (B, 1)
        mask = (self.keys[None, :] >= pad[:, None]) & (self.keys[None, :] <= self.slot)
        ctx = module.decoder.context(positions, self.slot, self.cache.max_len, mask[:, None, None, :])
        return module(self.tokens, ctx, self.cache, self.media, logits_for="last")

    def _capture(self) -> None:
        # Warm up on a side stream (allocator and lazy initialisation), then capture. The warm-up
        # steps compute the real step for the current slot, so the cache holds correct values.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()

    def __call__(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        """tokens (B,) of this step, written at cache `slot` -> next-token logits (B, V)."""
        self.tokens.copy_(tokens[:, None])
        self.slot.fill_(slot)
        if not self.use_graph:
            return self._forward()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits
