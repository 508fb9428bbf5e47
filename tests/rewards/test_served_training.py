"""Online training against ``trl-diffusion-sdpo reward-server`` running in a subprocess on localhost: the scores it
serves are the scorer's own on the sampled images; killed mid-run, the trainer retries, then saves a checkpoint of
the last optimizer step and stops with an error naming the server (nothing trains on a missing score), or, with the
server back within the retries, trains on."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch
from transformers import TrainerCallback

from tests.helpers import fresh_forks
from tests.helpers.common import worker_environment
from tests.helpers.online import lora_weights, make_trainer
from tests.helpers.served_rewards import ServerProcess, reward_server
from trl_diffusion_sdpo.demo.scorer import ColourRewardScorer
from trl_diffusion_sdpo.io.checkpoints import checkpoint_problem
from trl_diffusion_sdpo.rewards.functions import RemoteReward, RewardError


class ForkedServer(ServerProcess):
    """``trl-diffusion-sdpo reward-server`` in a process of its own, forked once the libraries are imported
    (``tests.helpers.fresh_forks``) instead of a fresh interpreter: the trainer only talks to it over HTTP, and a kill
    ends it alone."""

    def start(self, wait: bool = True) -> ForkedServer:
        command = ["-m", "trl_diffusion_sdpo", "reward-server", "--scorer", self.scorer]
        command += ["--port", str(self.port), "--log-level", "warning"]
        self.process = fresh_forks.start(command, stderr=2)
        if wait:
            self.wait_ready()
        return self


class WeightsPerStep(TrainerCallback):
    def __init__(self, trainer) -> None:
        self.trainer, self.after_step = trainer, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step[state.global_step] = lora_weights(self.trainer)


def record_generations(trainer) -> list:
    """Every finished generation, in order (a recorder around the stage's own ``finish``)."""
    finished = []
    finish = trainer.generation.finish

    def recording(pending):
        finished.append(finish(pending))
        return finished[-1]

    trainer.generation.finish = recording
    return finished


def assert_served_scores_are_the_scorers(generations) -> None:
    scorer = ColourRewardScorer()
    for generated in generations:
        images = [image for row in generated.images for image in row]
        prompts = [p for p in generated.prompts for _ in range(len(generated.images[0]))]
        expected = scorer(images, prompts).double().reshape(generated.rewards.shape)
        torch.testing.assert_close(generated.rewards, expected)


def test_online_training_scores_with_the_served_reward_and_stops_with_a_checkpoint_when_the_server_dies(tmp_path):
    # the trainer is built while the server starts
    with reward_server("colour", wait=False, kind=ForkedServer) as server:
        trainer = make_trainer(
            tmp_path, reward=server.url, max_steps=3, reward_retries=2, reward_timeout=30.0, save_strategy="steps"
        )
        server.wait_ready()
        trainer.args.save_steps = 100  # no scheduled save: the checkpoint below is the failure's
        weights = WeightsPerStep(trainer)
        trainer.add_callback(weights)
        generations = record_generations(trainer)
        remote = trainer.rewards.functions[0]
        assert isinstance(remote, RemoteReward)
        assert (remote.timeout, remote.retries) == (30.0, 2)  # the config's reward_timeout and reward_retries
        calls = []

        def then_kill(prompts, images, **columns):
            calls.append(len(images))
            scores = remote(prompts, images, **columns)
            server.kill()  # the first step's scores came back; the server then dies
            return scores

        trainer.rewards.functions[0] = then_kill
        with pytest.raises(RewardError) as raised:
            trainer.train()
    message = str(raised.value)
    assert f"Reward server {server.url} did not answer after 2 retries" in message
    checkpoint = os.path.join(trainer.args.output_dir, "checkpoint-1")
    assert f"Checkpoint {checkpoint} holds step 1" in message
    assert checkpoint_problem(checkpoint) == ""
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        assert json.load(f)["global_step"] == 1
    assert trainer.state.global_step == 1 and len(calls) == 2
    for name, value in lora_weights(trainer).items():  # nothing trained after the last score
        torch.testing.assert_close(value, weights.after_step[1][name], rtol=0, atol=0)
    assert len(generations) == 1
    assert_served_scores_are_the_scorers(generations)


@pytest.mark.slow
def test_a_server_back_within_the_retries_lets_training_go_on(tmp_path):
    with reward_server("colour", kind=ForkedServer) as server:
        trainer = make_trainer(tmp_path, reward=RemoteReward(server.url, retries=10, backoff=0.25), max_steps=3)
        generations = record_generations(trainer)
        remote = trainer.rewards.functions[0]
        restarted = []

        def kill_then_restart(prompts, images, **columns):
            if len(restarted) == 1:  # the second step: the server is down, and comes back after a second
                server.kill()
                restarter = threading.Thread(target=lambda: (time.sleep(1.0), server.start(wait=False)))
                restarter.start()
            restarted.append(len(images))
            return remote(prompts, images, **columns)

        trainer.rewards.functions[0] = kill_then_restart
        first_process = server.process
        trainer.train()
        # the second step's scores came from the restarted server: the call waited through the retries for it
        assert server.process is not first_process and server.process.poll() is None
        assert trainer.state.global_step == 3 and len(generations) == 3
        assert_served_scores_are_the_scorers(generations)


@pytest.mark.slow  # a two-process launch
def test_a_reward_failing_on_one_process_stops_every_process_at_the_same_step_with_one_checkpoint(tmp_path):
    """Process 1's second scoring returns a NaN; process 0's scores are fine. The failure is all-reduced: both stop
    before step 2, both take part in the checkpoint of step 1 (no process waits in a collective)."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(root / "examples" / "accelerate_configs" / "multi_gpu.yaml"), "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", str(port),
        str(root / "tests" / "rewards" / "reward_failure_worker.py"), str(tmp_path),
    ]  # fmt: skip
    env = worker_environment()
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    raised = [json.loads((tmp_path / f"raised-{rank}.json").read_text()) for rank in (0, 1)]
    assert "'red_minus_blue' returned nan as the score of image 0" in raised[1]["raised"]
    assert "A reward function failed on another process" in raised[0]["raised"]
    assert [r["global_step"] for r in raised] == [1, 1] and [r["calls"] for r in raised] == [2, 2]
    checkpoint = tmp_path / "model" / "checkpoint-1"
    assert all(f"Checkpoint {checkpoint} holds step 1" in r["raised"] for r in raised)
    assert checkpoint_problem(str(checkpoint)) == ""
