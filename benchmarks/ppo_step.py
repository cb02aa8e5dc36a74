"""One PPO step, cai's own loop against TRL 1.12.0's `trl.experimental.ppo.PPOTrainer`, side by side.

    .venv/bin/python benchmarks/ppo_step.py                          # small model and SmolLM2-135M, LoRA on and off
    .venv/bin/python benchmarks/ppo_step.py --models small --lora on --steps 5

TRL removed its PPOTrainer in 2026; 1.12.0 is the last release with it. The script installs it once in
its own virtual environment (`--trl-venv`, default /tmp/cai-bench-trl112) with the same torch,
transformers, accelerate, peft and datasets versions as this one, so that only the trainer differs.

Equal settings for both: the same policy, a reward model and a value model initialised from it (a
sequence-classification model with one output, saved from the policy), the same prompts, rollouts per
step (`--batch`), answer length (`--answer`, stopping at EOS), PPO epochs (`--epochs`), one minibatch
per epoch in micro-batches of `--micro` (gradient accumulation), temperature 0.7, fixed KL coefficient
0.05, learning rate 1e-5, float32. cai runs the whole `cai rl` stage; TRL runs `PPOTrainer.train()`.

Each trainer runs in its own process with `--threads` torch threads (default 1), and the two run at the
same time (`--one-at-a-time` to run them in turn), so that on a shared machine both see the same load.
Reported: seconds per PPO step (mean over the steps after the first, which warms up), CPU seconds per
step (the process's own, which other load barely changes), answer tokens sampled per second, and peak
memory: on CUDA the peak of `torch.cuda.max_memory_allocated`; on CPU the process's peak resident memory
(`ru_maxrss`) and the same minus the resident memory after imports (what the models and training add).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINNED = ("torch", "transformers", "accelerate", "peft", "datasets")
SETTINGS = dict(temperature=0.7, kl_coef=0.05, learning_rate=1e-5, lora_r=16, lora_alpha=32)


def rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return rss_mib()


def gpu_peak_mib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


# --------------------------------------------------------------------------------------------------
# The TRL 1.12 environment


def ensure_trl_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import trl; assert trl.__version__ == '1.12.0'; from trl.experimental.ppo import PPOTrainer"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    from importlib.metadata import version

    pins = [f"{name}=={version(name).split('+')[0]}" for name in PINNED]
    print(f"[bench] installing trl==1.12.0 with {' '.join(pins)} into {venv}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "trl==1.12.0", *pins], check=True)
    subprocess.run(probe, check=True)
    return python


# --------------------------------------------------------------------------------------------------
# Models and prompts, shared by both trainers


def prepare(work: Path, model: str, seed: int = 0) -> tuple[Path, Path, list[str]]:
    """(policy folder, reward-model folder, prompts) for a model name: `small` (a random 4-layer Llama,
    ~3M parameters, on the tests' tokenizer) or anything cai's model loader resolves."""
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from cai.config import load_config
    from cai.models import load_tokenizer, resolve_model
    from cai.promptsets import split_prompts

    policy_dir = work / f"{model}-policy"
    if not policy_dir.exists():
        if model == "small":
            from tests.tiny import make_tiny_tokenizer

            tokenizer = make_tiny_tokenizer()
            config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
            torch.manual_seed(seed)
            LlamaForCausalLM(config).save_pretrained(policy_dir)
            tokenizer.save_pretrained(policy_dir)
        else:
            source = resolve_model(model, os.path.expanduser("~/.cache/cai"))
            shutil.copytree(source, policy_dir)
            load_tokenizer(str(policy_dir), "~/.cache/cai").save_pretrained(policy_dir)  # left padding, pad != EOS
    rm_dir = work / f"{model}-rm"
    if not rm_dir.exists():
        torch.manual_seed(seed + 1)
        rm = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
        rm.config.pad_token_id = load_tokenizer(str(policy_dir), "~/.cache/cai").pad_token_id
        rm.save_pretrained(rm_dir)
        load_tokenizer(str(policy_dir), "~/.cache/cai").save_pretrained(rm_dir)
        (rm_dir / "normalization.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
        (rm_dir / "DONE").write_text("benchmark\n")
    split = split_prompts(load_config(None).data, seed)["rl"]
    return policy_dir, rm_dir, [p.text for p in split["red_team"] + split["helpful"]]


# --------------------------------------------------------------------------------------------------
# Workers: one trainer, one process, one JSON line


def cai_worker(a) -> dict:
    import accelerate, datasets, peft, torch, transformers  # noqa: E401, F401 -- imported before the baseline, as in TRL's worker

    sys.path.insert(0, str(ROOT))
    from cai.config import load_config
    from cai.records import mark_done, read_jsonl
    from cai.stages import rl

    baseline = current_rss_mib()
    out = Path(a.out)
    (out / "sft").parent.mkdir(parents=True, exist_ok=True)
    os.symlink(a.policy, out / "sft")
    mark_done(out / "sft", "benchmark")  # writes DONE into the policy folder: harmless
    os.symlink(a.rm, out / "rm")
    cfg = load_config(None, [
        f"output_dir={out}", f"policy.model={a.policy}", "policy.dtype=float32", "rl.reward=rm",
        f"rl.steps={a.steps}", f"rl.batch_size={a.batch}", f"rl.minibatch_size={a.batch}",
        f"rl.grad_accum={a.batch // a.micro}", f"rl.ppo_epochs={a.epochs}", f"rl.max_new_tokens={a.answer}",
        f"rl.temperature={SETTINGS['temperature']}", "rl.adaptive_kl=false", f"rl.kl_coef={SETTINGS['kl_coef']}",
        f"rl.learning_rate={SETTINGS['learning_rate']}", "rl.reward_clip=null", "rl.checkpoint_every=100000",
        "rl.samples=0", f"rl.lora={a.lora}", f"rl.lora_r={SETTINGS['lora_r']}", f"rl.lora_alpha={SETTINGS['lora_alpha']}",
    ])
    cpu: list[float] = []
    step = rl.ppo_step

    def timed_step(*args, **kwargs):
        started = time.process_time()
        metrics = step(*args, **kwargs)
        cpu.append(time.process_time() - started)
        return metrics

    rl.ppo_step = timed_step
    rl.run(cfg)
    steps = read_jsonl(out / "rl" / "metrics.jsonl")[1:]
    seconds = [m["seconds"] for m in steps]
    tokens = [m["answer_length"] * m["episodes"] for m in steps]
    return dict(seconds=seconds, cpu=cpu[1:], tokens=tokens, peak_rss=rss_mib(), baseline_rss=baseline,
                gpu_peak=gpu_peak_mib())


def trl_worker(a) -> dict:
    import accelerate, datasets, peft, torch, transformers  # noqa: E401, F401
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    baseline = current_rss_mib()
    tokenizer = AutoTokenizer.from_pretrained(a.policy)
    tokenizer.padding_side = "left"
    prompts = json.loads(Path(a.prompts).read_text())
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    dataset = datasets.Dataset.from_dict({"input_ids": [tokenizer(t, add_special_tokens=False).input_ids for t in texts]})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32)
    ref = None if a.lora else AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(a.rm, num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(a.rm, num_labels=1, dtype=torch.float32)
    peft_config = None
    if a.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=SETTINGS["lora_r"], lora_alpha=SETTINGS["lora_alpha"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")

    # Count the answer tokens each step samples (up to and including EOS; pads after it are not answers).
    counted: list[int] = []
    original = ppo_module.batch_generation

    def counting_generation(model, queries, chunk, pad_token_id, generation_config):
        query_responses, logits = original(model, queries, chunk, pad_token_id, generation_config)
        responses = query_responses[:, queries.shape[1]:]
        eos = responses == tokenizer.eos_token_id
        after_eos = (eos.long().cumsum(1) - eos.long()) > 0
        counted.append(int(((responses != pad_token_id) & ~after_eos).sum()))
        return query_responses, logits

    ppo_module.batch_generation = counting_generation

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks, self.cpu = [], []

        def on_train_begin(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_step_end(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())
            self.cpu.append(time.process_time())

    timer = StepTimer()
    config = PPOConfig(
        output_dir=a.out, per_device_train_batch_size=a.micro, gradient_accumulation_steps=a.batch // a.micro,
        num_mini_batches=1, num_ppo_epochs=a.epochs, response_length=a.answer, stop_token="eos",
        local_rollout_forward_batch_size=a.batch, total_episodes=a.batch * a.steps,
        temperature=SETTINGS["temperature"], kl_coef=SETTINGS["kl_coef"], learning_rate=SETTINGS["learning_rate"],
        missing_eos_penalty=None, num_sample_generations=0, report_to="none", save_strategy="no", logging_steps=1,
        bf16=False, fp16=False, seed=0, dataloader_num_workers=0, use_cpu=device == "cpu", disable_tqdm=True,
    )
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=dataset, eval_dataset=dataset, peft_config=peft_config,
                         callbacks=[timer])
    trainer.train()
    seconds = [b - a_ for a_, b in zip(timer.marks, timer.marks[1:])][1:]
    cpu = [b - a_ for a_, b in zip(timer.cpu, timer.cpu[1:])][1:]
    return dict(seconds=seconds, cpu=cpu, tokens=counted[1:], peak_rss=rss_mib(), baseline_rss=baseline,
                gpu_peak=gpu_peak_mib())


# --------------------------------------------------------------------------------------------------
# The driver


def start_worker(python: str, trainer: str, policy: Path, rm: Path, prompts: Path, lora: bool, a, work: Path):
    out = Path(tempfile.mkdtemp(prefix=f"{trainer}-", dir=work))
    command = [python, str(Path(__file__).resolve()), "--worker", trainer, "--policy", str(policy), "--rm", str(rm),
               "--prompts", str(prompts), "--out", str(out), "--steps", str(a.steps), "--batch", str(a.batch),
               "--micro", str(a.micro), "--answer", str(a.answer), "--epochs", str(a.epochs)]
    if lora:
        command.append("--with-lora")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1",
           "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    log = out.with_suffix(".log")
    with open(log, "w") as sink:  # a file, not a pipe: a worker never waits for the driver to read
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    return process, out, log


def finish_worker(trainer: str, process, out: Path, log: Path) -> dict:
    process.wait()
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        raise SystemExit(f"{trainer} worker failed:\n{text[-4000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(lines[-1][len("RESULT "):])


def row(model: str, lora: bool, trainer: str, r: dict, a) -> dict:
    step = sum(r["seconds"]) / len(r["seconds"])
    return dict(model=model, lora=lora, trainer=trainer, step_s=step, cpu_s=sum(r["cpu"]) / len(r["cpu"]),
                tokens_s=sum(r["tokens"]) / sum(r["seconds"]),
                peak_mib=r["gpu_peak"] if r["gpu_peak"] is not None else r["peak_rss"],
                added_mib=None if r["gpu_peak"] is not None else r["peak_rss"] - r["baseline_rss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="small,smollm2-135m-instruct", help="comma-separated: small, or cai model names")
    parser.add_argument("--lora", choices=["on", "off", "both"], default="both")
    parser.add_argument("--steps", type=int, default=4, help="PPO steps per run; the first is not timed")
    parser.add_argument("--batch", type=int, default=8, help="rollouts per step")
    parser.add_argument("--micro", type=int, default=4, help="micro-batch size (gradient accumulation)")
    parser.add_argument("--answer", type=int, default=32, help="longest answer, tokens")
    parser.add_argument("--epochs", type=int, default=2, help="PPO epochs per step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trainer process (OMP_NUM_THREADS)")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="run the two trainers one after the other (default: at the same time, so that both "
                        "share whatever else loads the machine)")
    parser.add_argument("--trl-venv", default="/tmp/cai-bench-trl112")
    parser.add_argument("--work", default=None, help="folder for models and runs (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    # worker mode
    parser.add_argument("--worker", choices=["cai", "trl"])
    for name in ("--policy", "--rm", "--prompts", "--out"):
        parser.add_argument(name)
    parser.add_argument("--with-lora", action="store_true")
    a = parser.parse_args()
    if a.worker:
        a.lora = a.with_lora
        result = cai_worker(a) if a.worker == "cai" else trl_worker(a)
        print("RESULT " + json.dumps(result), flush=True)
        return

    trl_python = ensure_trl_venv(Path(a.trl_venv))
    work = Path(a.work or tempfile.mkdtemp(prefix="cai-ppo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    modes = {"on": [True], "off": [False], "both": [False, True]}[a.lora]
    rows = []
    for model in a.models.split(","):
        policy, rm, prompts = prepare(work, model)
        prompts_file = work / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        for lora in modes:
            trainers = (("cai", sys.executable), ("trl-1.12", str(trl_python)))
            started = time.time()
            running = {}
            for trainer, python in trainers:
                running[trainer] = start_worker(python, trainer.split("-")[0], policy, rm, prompts_file, lora, a, work)
                if a.one_at_a_time:
                    running[trainer] = finish_worker(trainer, *running[trainer])
            for trainer, _ in trainers:
                result = running[trainer] if a.one_at_a_time else finish_worker(trainer, *running[trainer])
                rows.append(row(model, lora, trainer, result, a))
                r = rows[-1]
                print(f"[bench] {model} lora={lora} {trainer}: {r['step_s']:.2f} s/step ({r['cpu_s']:.2f} CPU s), "
                      f"{r['tokens_s']:.1f} tok/s, peak {r['peak_mib']:.0f} MiB ({time.time() - started:.0f}s)", flush=True)
    print(f"\nsettings: {a.batch} rollouts/step, micro-batch {a.micro}, answers <= {a.answer} tokens, {a.epochs} PPO "
          f"epochs, {a.steps} steps ({a.steps - 1} timed); {a.threads} torch thread(s) per process, "
          f"{os.cpu_count()} cores\n")
    added = rows[0]["added_mib"] is not None
    print("| model | LoRA | trainer | s / PPO step | CPU s / step | answer tokens / s | peak memory (MiB) |"
          + (" added by models + training (MiB) |" if added else "") + " step time vs TRL | memory vs TRL |")
    print("|---|---|---|---:|---:|---:|---:|" + ("---:|" if added else "") + "---:|---:|")
    for r in rows:
        peer = next(x for x in rows if x["model"] == r["model"] and x["lora"] == r["lora"] and x["trainer"] == "trl-1.12")
        key = "added_mib" if added else "peak_mib"
        print(f"| {r['model']} | {'yes' if r['lora'] else 'no'} | {r['trainer']} | {r['step_s']:.2f} | {r['cpu_s']:.2f} | "
              f"{r['tokens_s']:.1f} | {r['peak_mib']:.0f} |" + (f" {r['added_mib']:.0f} |" if added else "")
              + f" {r['step_s'] / peer['step_s']:.2f}x | {r[key] / peer[key]:.2f}x |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
