"""The benchmark scripts' tests: each runs a script at a tiny size or checks its arithmetic on a synthetic report.

They are not part of the package's suite (``python -m pytest`` collects ``tests/`` alone); run them with
``python -m pytest benchmarks/tests`` (``-m slow`` for the end-to-end runs).
"""

from __future__ import annotations

import torch

# The models are tiny and the machine's cores are shared: more than one intra-op thread only adds contention.
torch.set_num_threads(1)
