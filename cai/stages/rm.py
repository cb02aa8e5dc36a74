"""Stage 4, the reward model (Bai et al. 2022, section 4.1): a preference model trained on AI labels.

1. Load `prefs/dataset/` and refuse it, in one line, if a column is missing or an answer is empty.
2. Train the reward model (`cai.reward_training.train_reward_model`, shared with the rl stage's rounds):
   a. hold out about `rm.eval_fraction` of the pairs (seeded), split by prompt: a prompt's pairs are
      all held out or all trained on;
   b. the SFT model with a scalar head (`AutoModelForSequenceClassification`, `num_labels=1`), trained
      with TRL's RewardTrainer. The loss is the binary cross-entropy between
      sigma(r_chosen - r_rejected) and the soft label `label_prob` (`soft_label_loss`); with
      `rm.hard_labels` it is TRL's own Bradley-Terry loss, -log sigma(r_chosen - r_rejected).
      Checkpoints go to `rm/checkpoints/`; a killed run resumes from the last one;
   c. normalisation: the mean and standard deviation of the raw reward over the SFT model's own samples
      (`prefs/samples.jsonl`), saved to `rm/normalization.json`, so that the RL stage reads rewards with
      mean 0 and standard deviation 1 on the policy it starts from;
   d. held-out metrics (`rm/metrics.json`): accuracy, calibration against the soft labels, and the
      reward distribution; then the model and tokenizer are saved to `rm/`.
"""

from __future__ import annotations

from pathlib import Path

from cai.chat import ANSWER_TEMPLATE
from cai.config import Config
from cai.errors import CaiError
from cai.preferences import check_preference_dataset
from cai.records import read_jsonl
from cai.reward_training import train_reward_model
from cai.stages import open_stage, require_done
from cai.templates import Templates


def run(cfg: Config) -> Path:
    import datasets

    sft_dir = require_done(cfg, "sft", "rm")
    prefs_dir = require_done(cfg, "prefs", "rm")

    # 1. The preference dataset, checked before anything is written.
    dataset_path = prefs_dir / "dataset"
    try:
        dataset = datasets.load_from_disk(str(dataset_path))
    except (FileNotFoundError, ValueError) as err:
        raise CaiError(f"{dataset_path}: cannot read the preference dataset ({err})") from None
    check_preference_dataset(dataset, str(dataset_path), need_label_prob=not cfg.rm.hard_labels)
    samples = [(s["prompt"], a) for s in read_jsonl(prefs_dir / "samples.jsonl") for a in s["answers"] if a.strip()]
    Templates(cfg.templates).render(ANSWER_TEMPLATE, prompt="x")

    stage = open_stage(cfg, "rm")
    if stage.done:
        return stage.path

    # 2. Train on the labels, normalise on the SFT model's own samples, write rm/.
    metrics = train_reward_model(cfg, dataset, stage.path, start_from=sft_dir, normalize_on=samples,
                                 records=read_jsonl(prefs_dir / "records.jsonl"))
    accuracy = metrics["held_out"].get("accuracy")
    shown = f", held-out accuracy {accuracy:.2f} on {metrics['held_out']['pairs']} pairs" if accuracy is not None else ""
    return stage.finish(f"{metrics['train_pairs']} pairs, {metrics['steps']} steps, train loss {metrics['train_loss']:.3f}{shown}")
