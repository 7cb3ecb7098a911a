"""lmmrt benchmarks: a timing harness, kernel microbenchmarks, end-to-end generation, reports.

`python -m bench.run --smoke` runs everything at tiny shapes on the CPU; bench/device.sh runs it
at real model shapes on a GPU. See bench/README.md.
"""
