"""TRL's bitsandbytes switches (``--load_in_4bit``, ``--load_in_8bit``): accepted by ``train``, said so by every text,
and on a machine without a CUDA GPU refused in one line before the model loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.helpers import fresh_forks

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
@pytest.mark.parametrize(
    "switch", ["--load_in_4bit", pytest.param("--load_in_8bit", marks=pytest.mark.slow)]
)  # one switch by default: the same refusal
def test_bitsandbytes_switch_on_a_cpu_is_refused_in_one_line_before_the_model_loads(tmp_path, switch) -> None:
    # the model folder does not exist: reaching the loader would fail with another message
    code = "import sys; from trl_diffusion_sdpo.cli.main import main; sys.exit(main())"
    argv = ["train", "--model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", str(tmp_path / "no-data"),
            "--output_dir", str(tmp_path / "out"), switch, "--use_peft", "--use_cpu"]  # fmt: skip
    # a fresh process but for the libraries' imports, which print nothing (fresh_forks checks): its stderr is the
    # command's
    done = fresh_forks.run(["-c", code, *argv], timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert len(lines) == 1, lines
    assert re.fullmatch(
        rf"trl-diffusion-sdpo train: error: --base_quantization bnb-\w+ \({switch}\) .*CUDA GPU.*", lines[0]
    )
    assert "quanto-int4" in lines[0] and "no-model" not in lines[0]


def test_the_docs_refuse_only_what_the_command_refuses() -> None:
    """quickstart's refused options are train's REFUSED_OPTIONS; the bitsandbytes switches are accepted everywhere."""
    from trl_diffusion_sdpo.cli.train import REFUSED_OPTIONS, make_parser

    text = " ".join((ROOT / "docs" / "quickstart.md").read_text().split())
    refused = re.search(r"apply to language models \(([^)]*)\) are refused with an error", text)
    assert refused is not None
    assert re.findall(r"`(\w+)`", refused.group(1)) == list(REFUSED_OPTIONS)
    assert "`--load_in_4bit` and `--load_in_8bit` are accepted" in text
    assert "--load_in_4bit" in make_parser().format_help()
    quantization = " ".join((ROOT / "docs" / "quantization.md").read_text().split())
    assert (
        "`--load_in_4bit`, `--load_in_8bit` and `bnb-*` are refused in one line before the model loads" in quantization
    )
