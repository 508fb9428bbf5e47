"""The ports' tests: tiny reward models built from configs in the test, on CPU; nothing is downloaded.

Run from the repository's root (``python -m pytest -q`` collects them with the core's tests): its pytest settings put
the root on the path, whose ``tests.helpers.evaluation`` builds the tiny CLIP models both suites use.
"""

from __future__ import annotations

import torch

# The models are tiny and the machine's cores are shared: more than one intra-op thread only adds contention.
torch.set_num_threads(1)
