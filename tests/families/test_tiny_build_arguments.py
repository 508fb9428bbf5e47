"""The shared keyword arguments of the tiny transformer builders (seed, tokenizer folder, max length): the builder's
own max-length default, torch seeded before anything is built, the folder resolved once, an unknown keyword
refused as a plain signature would refuse it, and a build given no folder leaving nothing behind."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch

from tests.helpers import fresh_forks
from tests.helpers.forking import run_forked
from trl_diffusion_sdpo.testing import build_tiny_flux_pipeline, build_tiny_qwen_image21_pipeline
from trl_diffusion_sdpo.testing.components import BuildArguments, _remove_process_folder, process_folder


def test_start_seeds_torch_and_resolves_the_folder_once(tmp_path):
    build = BuildArguments.start({"seed": 3}, max_length=16)
    drawn = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.rand(4))
    assert (build.seed, build.max_length) == (3, 16)
    assert build.tokenizer_dir is not None and os.path.isdir(build.tokenizer_dir)  # a fresh temporary folder
    given = BuildArguments.start({"tokenizer_dir": str(tmp_path), "max_length": 9}, max_length=16)
    assert (given.seed, given.tokenizer_dir, given.max_length) == (0, str(tmp_path), 9)


def test_builds_given_no_folder_leave_nothing_behind_when_their_process_exits():
    code = """
        import os
        from trl_diffusion_sdpo.testing import build_tiny_flux_pipeline, build_tiny_sd_pipeline
        from trl_diffusion_sdpo.testing.components import process_folder
        build_tiny_sd_pipeline(seed=0), build_tiny_flux_pipeline(seed=1)
        print(process_folder(), len(os.listdir(process_folder())))
    """
    done = fresh_forks.run(["-c", textwrap.dedent(code)], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    folder, builds = done.stdout.split()
    assert builds == "2" and os.path.basename(folder).startswith("tiny-tok-")
    assert not os.path.exists(folder)  # removed at the exit


def test_a_forked_child_neither_reuses_nor_removes_its_parents_folder():
    parent, parent_pid = process_folder(), os.getpid()

    def child() -> None:
        own = process_folder()
        assert own != parent and os.path.isdir(own)
        _remove_process_folder(parent_pid)  # the exit function inherited from the parent
        _remove_process_folder(os.getpid())  # its own, as its exit would (this child ends without exit functions)
        assert not os.path.exists(own)

    assert run_forked(child, timeout=60) == 0
    assert os.path.isdir(parent)


@pytest.mark.parametrize(
    "build, max_length", [(build_tiny_flux_pipeline, 16), (build_tiny_qwen_image21_pipeline, 64)], ids=["flux", "q21"]
)
def test_each_builder_keeps_its_own_max_length_default(build, max_length, tmp_path):
    pipe = build(tokenizer_dir=str(tmp_path))
    tokenizer = pipe.tokenizer if hasattr(pipe, "tokenizer") else pipe.processor.tokenizer
    assert tokenizer.model_max_length == max_length
    assert os.path.isdir(tmp_path / "tokenizer")


def test_an_unknown_keyword_is_refused(tmp_path):
    with pytest.raises(TypeError, match="max_lenght"):
        build_tiny_flux_pipeline(tokenizer_dir=str(tmp_path), max_lenght=8)


def test_every_registered_family_has_a_tiny_pipeline_builder():
    """TINY_PIPELINES names one builder per registered family, by the family's name (each built pipeline is checked to
    be its family's where it is built: tests/distributed/test_online_distributed.py)."""
    from trl_diffusion_sdpo.families import registered_families
    from trl_diffusion_sdpo.testing import TINY_PIPELINES

    assert set(TINY_PIPELINES) == {family.name for family in registered_families()}
    assert len(set(TINY_PIPELINES.values())) == len(TINY_PIPELINES)
