"""Converters from public checkpoint formats to lmmrt's (one weight map per source format)."""
