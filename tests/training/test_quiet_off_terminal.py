"""From Python as from the command line: a script whose output is not a terminal (a log file, a pipe) gets no
progress-bar redraws and none of the libraries' known noise, whichever bars it meets (loading a pipeline, training,
sampling after training); each training log is a line of its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S)[1]


def test_the_readme_python_example_writes_no_redraws_and_no_noise_into_a_log_file(tmp_path):
    # the README's script, shortened: 2 steps, 2 denoising steps
    script = (
        readme_example()
        .replace("max_steps=10", "max_steps=2")
        .replace("num_inference_steps=20", "num_inference_steps=2")
    )
    assert "max_steps=2" in script and "num_inference_steps=2" in script
    (tmp_path / "example.py").write_text(script)
    log = tmp_path / "log.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as out:
        done = subprocess.run(
            [sys.executable, "example.py"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600
        )
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    for noise in ("\r", "\x1b[A", "requires torchvision", "Failed to load", "Unable to import `torchao`"):
        assert noise not in text, (noise, text[-3000:])
    # the training's metrics printed as one line (transformers' PrinterCallback), not drawn into a bar
    assert len([line for line in text.splitlines() if line.startswith("{'train_runtime':")]) == 1, text[-3000:]
