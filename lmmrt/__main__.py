import os
import sys

from lmmrt.cli import main

status = main()
if "lmmrt.parallel.group" in sys.modules and sys.modules["lmmrt.parallel.group"].started_a_group():
    # Under torchrun, after a tensor-parallel run: the output is complete and the group has ended, but
    # torch's gloo worker threads can still be releasing tensors when the interpreter finalizes, which
    # aborts the process ("terminate called without an active exception", seen in core dumps in about
    # 1 run of 30). Nothing is left to clean up: end here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(status or 0))
raise SystemExit(status)
