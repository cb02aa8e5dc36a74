"""PPO over two CPU processes (gloo) through `accelerate launch`: both ranks end with the same weights.

On a machine without GPUs, `--multi_gpu` only picks accelerate's torchrun launcher; the rl stage asks
accelerate for CPU processes when CUDA is absent, so the processes talk over gloo.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from cai.config import to_yaml
from cai.records import mark_done, read_jsonl
from cai.stages import stage_fingerprint
from tests.conftest import ROOT
from tests.test_rl_stage import subprocess_env


def test_two_processes_share_the_batch_and_agree_on_the_weights(tiny_config, tiny_model_dir, tmp_path):
    cfg = tiny_config("rl.reward=tests.test_rl_stage:letter_e_reward", "rl.steps=3", "rl.batch_size=4",
                      "rl.minibatch_size=2", "rl.learning_rate=1e-2", "rl.checkpoint_every=2", "rl.samples=2")
    sft_dir = Path(cfg.output_dir) / "sft"
    shutil.copytree(tiny_model_dir, sft_dir)
    mark_done(sft_dir, stage_fingerprint(cfg, "sft"))
    config_file = tmp_path / "rl.yaml"
    config_file.write_text(to_yaml(cfg))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               "-m", "cai", "rl", str(config_file)]
    done = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    out = Path(cfg.output_dir) / "rl"
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["processes"] == 2
    first, second = summary["rank_param_checksums"]
    assert first == second  # DDP kept the two copies of the policy and value model identical
    history = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in history] == [1, 2, 3]
    assert all(m["episodes"] == 8 for m in history)  # each process sampled its own 4 prompts
    assert done.stdout.count("[rl] step 3/3") == 1  # only the main process logs
    assert (out / "DONE").exists() and (out / "model.safetensors").exists()
