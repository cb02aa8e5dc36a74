"""configs/accelerate/: every file loads with accelerate's own loader and opens with its command; DDP
and FSDP run `sft`, `rm` and PPO over two CPU processes (gloo) and save models that load. The DeepSpeed
files are validated, not run: DeepSpeed needs GPUs (docs/scale.md says so).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from cai.config import to_yaml
from cai.records import mark_done
from tests.conftest import ROOT
from tests.fakes import ScriptedLabeler
from tests.test_rl_stage import subprocess_env

CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def test_the_four_launch_configs_are_shipped():
    assert {p.stem for p in CONFIGS} >= {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_launch_config_loads_and_opens_with_its_command(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(path))
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# accelerate launch --config_file configs/accelerate/{path.name} -m cai ")
    for stage in ("sft", "rm", "rl"):
        assert f"-m cai {stage} " in path.read_text()
    expected = {"ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP,
                "deepspeed_zero2": DistributedType.DEEPSPEED, "deepspeed_zero3": DistributedType.DEEPSPEED}
    assert config.distributed_type == expected[path.stem]
    if path.stem == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # a saved model loads whole
    if path.stem.startswith("deepspeed"):
        stage = int(path.stem[-1])
        assert config.deepspeed_config["zero_stage"] == stage
        # accelerate's own plugin accepts the settings (it needs no GPU to build)
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin(zero_stage=stage, gradient_clipping=config.deepspeed_config["gradient_clipping"],
                                 zero3_init_flag=config.deepspeed_config["zero3_init_flag"])
        assert plugin.deepspeed_config["zero_optimization"]["stage"] == stage


def launch(config_file: str, stage: str, run_config: Path) -> subprocess.CompletedProcess:
    """The shipped launch config on 2 processes without mixed precision; without CUDA they run on the CPU
    and talk over gloo (cai's stages and TRL's trainers ask accelerate for the CPU when CUDA is absent)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0",
               "-m", "cai", stage, str(run_config)]
    return subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)


def changed_parameters(before_dir, after_dir) -> int:
    before = AutoModelForCausalLM.from_pretrained(before_dir)
    after = AutoModelForCausalLM.from_pretrained(after_dir)
    return sum(not torch.equal(a, b) for (_, a), (_, b) in zip(before.named_parameters(), after.named_parameters()))


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_sft_rm_and_ppo_on_two_cpu_processes(name, tiny_config, tiny_model_dir, tmp_path, monkeypatch):
    from cai.stages import sl

    monkeypatch.setattr(sl, "build_labeler", lambda cfg, shared_models=None, role=None: ScriptedLabeler())
    cfg = tiny_config("sft.learning_rate=1e-2", "sft.epochs=1", "sft.batch_size=2", "sft.save_steps=1000",
                      "rl.reward=tests.test_rl_stage:letter_e_reward", "rl.steps=2", "rl.batch_size=2",
                      "rl.minibatch_size=2", "rl.learning_rate=1e-2", "rl.samples=0")
    sl.run(cfg)
    run_config = tmp_path / "run.yaml"
    run_config.write_text(to_yaml(cfg))
    config_file = f"configs/accelerate/{name}.yaml"

    done = launch(config_file, "sft", run_config)
    assert done.returncode == 0, done.stderr[-4000:]
    sft_dir = Path(cfg.output_dir) / "sft"
    assert (sft_dir / "DONE").exists()
    assert changed_parameters(tiny_model_dir, sft_dir) > 5  # trained, and saved whole: it loads
    metrics = json.loads((sft_dir / "metrics.json").read_text())
    assert metrics["steps"] == math.ceil(metrics["examples"] / (2 * 2))  # two processes of 2 examples per step

    from cai.stages import prefs

    monkeypatch.setattr(prefs, "build_labeler", lambda cfg, shared_models=None, role=None: ScriptedLabeler())
    prefs.run(cfg)
    done = launch(config_file, "rm", run_config)
    assert done.returncode == 0, done.stderr[-4000:]
    rm_dir = Path(cfg.output_dir) / "rm"
    assert (rm_dir / "DONE").exists() and (rm_dir / "normalization.json").exists()
    AutoModelForSequenceClassification.from_pretrained(rm_dir)  # saved whole: it loads

    done = launch(config_file, "rl", run_config)
    assert done.returncode == 0, done.stderr[-4000:]
    rl_dir = Path(cfg.output_dir) / "rl"
    summary = json.loads((rl_dir / "metrics.json").read_text())
    assert summary["processes"] == 2 and (rl_dir / "DONE").exists()
    assert changed_parameters(sft_dir, rl_dir) > 0


# -------------------------------------------------------------------------------------------------
# rl.vllm: TRL's GRPO/RLOO generation on vLLM, passed through (GPU only; checked here on CPU)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_rl_vllm_reaches_trl_config(algorithm, mode):
    from trl import GRPOConfig, RLOOConfig

    from cai.config import load_config
    from cai.stages.rl_trl import vllm_arguments

    rl = load_config(None, [f"rl.algorithm={algorithm}", f"rl.vllm={mode}", "rl.vllm_server_url=http://10.0.0.5:8000"]).rl
    config_cls = GRPOConfig if algorithm == "grpo" else RLOOConfig
    args = config_cls(output_dir="unused", bf16=False, **vllm_arguments(rl))
    assert args.use_vllm and args.vllm_mode == mode
    if mode == "server":
        assert args.vllm_server_base_url == "http://10.0.0.5:8000"
    assert vllm_arguments(load_config(None, []).rl) == {}  # off by default: TRL generates with transformers


def test_rl_vllm_refused_without_a_gpu_or_for_other_algorithms(tiny_config, monkeypatch):
    from cai.errors import CaiError
    from cai.stages import rl_trl

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CaiError, match=r"rl.vllm=colocate needs CUDA GPUs"):
        rl_trl.run(tiny_config("rl.algorithm=grpo", "rl.vllm=colocate"))
    for algorithm in ("dpo", "ppo"):
        with pytest.raises(CaiError, match=rf"rl.vllm=server applies to rl.algorithm=grpo or rloo, not {algorithm}"):
            tiny_config(f"rl.algorithm={algorithm}", "rl.vllm=server")


# -------------------------------------------------------------------------------------------------
# The multi-node Slurm script (docs/slurm_accelerate.sh), with srun, scontrol and accelerate stubbed


def test_slurm_script_gives_each_node_its_rank_and_the_main_address(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        # A real allocation can list hundreds of nodes: the script must read the first without making
        # scontrol die of SIGPIPE under `set -o pipefail` (which `| head -n 1` did, now and then, in CI)
        "scontrol": 'printf "gpu-node-07\\ngpu-node-08\\n"; seq 1 100000 | sed "s/^/gpu-spare-/"',
        # srun runs its command once per node, as Slurm would, with that node's SLURM_NODEID
        "srun": 'shift; for node in 0 1; do SLURM_NODEID=$node "$@"; done',
        "accelerate": 'echo "node $SLURM_NODEID: accelerate $*"',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_NNODES": "2"}
    done = subprocess.run(["bash", "docs/slurm_accelerate.sh", "rl", "configs/full.yaml", "rl.algorithm=grpo"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        assert line.startswith(f"node {rank}: accelerate launch --config_file configs/accelerate/fsdp.yaml")
        assert f"--machine_rank {rank} " in line and "--num_machines 2 --num_processes 16" in line
        assert "--main_process_ip gpu-node-07 --main_process_port 29500" in line
        assert line.endswith("-m cai rl configs/full.yaml rl.algorithm=grpo")
