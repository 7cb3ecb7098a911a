"""The runtime: batching, caches (KV, media K/V), sampling, the generate loop."""
