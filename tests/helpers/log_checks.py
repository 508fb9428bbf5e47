"""What a command's output written to a file must not hold: a progress bar (carriage-return redraws, cursor-up
escapes, tqdm's ``NN%|`` and rate fragments) or library noise a user cannot act on."""

from __future__ import annotations

import re

# A redraw, a cursor-up escape, or the "NN%|" / "it/s]" / "s/it]" of a tqdm line.
BAR = re.compile(r"\r|\x1b\[A|\d+%\||it/s\]|s/it\]")
NOISE = ("No LoRA keys associated", "torch_dtype", "FutureWarning")


def assert_plain(text: str, command: str) -> None:
    """``text`` (a command's stdout and stderr) holds no progress bar and none of :data:`NOISE`."""
    bar = BAR.search(text)
    assert bar is None, f"{command}: a progress bar in the log: {text[max(0, bar.start() - 200) : bar.end() + 80]!r}"
    for noise in NOISE:
        assert noise not in text, f"{command}: {noise!r} in the log:\n{text[-3000:]}"
