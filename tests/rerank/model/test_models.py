"""Model sources: the offline Qwen2 tokenizer, tiny-qwen2, SmolLM2, hub ids (`load_model_and_tokenizer`, the stand-ins)."""
from __future__ import annotations

import json
import unicodedata

import pytest
import torch

from pipeline.errors import PipelineError
from rerank.model import standins
from rerank.model.sources import load_model_and_tokenizer, load_tokenizer
from rerank.model.standins import (
    QWEN_DEFAULT_SYSTEM,
    QWEN_SPLIT_PATTERN,
    QWEN_TIKTOKEN,
    SMOLLM2,
    TINY_QWEN2,
    init_tiny_qwen2,
    packaged_file,
)
from rerank.prompting.labels import encode
from tests.helpers.tokenizers import CACHE_DIR, TITLES, qwen_tokenizer, smollm2_tokenizer

# Known Qwen2/Qwen2.5 token ids (as the hub's Qwen/Qwen2.5-*-Instruct tokenizer gives them).
KNOWN_QWEN2_IDS = {
    "Hello world": [9707, 1879],
    "<|endoftext|>": [151643],
    "<|im_start|>": [151644],
    "<|im_end|>": [151645],
    "system": [8948],
    "user": [872],
    "assistant": [77091],
    "\n": [198],
    "你好": [108386],
    "10": [16, 15],  # digits are split one by one
}
# Qwen2.5's default system turn, as the hub tokenizer encodes it.
QWEN25_DEFAULT_SYSTEM_IDS = [151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950, 17847, 13, 151645, 198]


@pytest.mark.parametrize("text,ids", list(KNOWN_QWEN2_IDS.items()))
def test_qwen_tokenizer_gives_qwen2_ids(text, ids):
    assert encode(qwen_tokenizer(), text) == ids


def test_qwen_tokenizer_matches_tiktoken_reference():
    # tiktoken with Qwen's ranks and split pattern is how Qwen's own tokenizer encodes (after NFC).
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(packaged_file(*QWEN_TIKTOKEN)))
    specials = {t: qwen_tokenizer().convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    ref = tiktoken.Encoding("qwen-ref", pat_str=QWEN_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    texts = TITLES + ["I'm sure they'LL   go\n\n\tnow ", "3.14159 and 1,000,000", "e\u0301migre\u0301 café", "🎬🍿 emoji", "  "]
    for text in texts:
        want = ref.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        assert encode(qwen_tokenizer(), text) == want, text


def test_qwen_chat_template_is_qwen25_chatml():
    tok = qwen_tokenizer()
    user = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert encode(tok, text)[: len(QWEN25_DEFAULT_SYSTEM_IDS)] == QWEN25_DEFAULT_SYSTEM_IDS
    own = [{"role": "system", "content": "Be brief."}, *user]
    assert tok.apply_chat_template(own, tokenize=False).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert (tok.eos_token, tok.pad_token, tok.padding_side) == ("<|im_end|>", "<|endoftext|>", "left")


def test_tiny_qwen2_is_a_seeded_qwen2_sized_to_the_tokenizer():
    torch.manual_seed(123)
    before = torch.rand(1)
    model, tok = load_model_and_tokenizer(TINY_QWEN2, cache_dir=CACHE_DIR)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.float32
    assert model.config.vocab_size == len(tok) == 151646
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    # The cached weights are exactly the seeded recipe's, and building them left our RNG alone.
    fresh = init_tiny_qwen2(tok)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.tensor([encode(tok, "<|im_start|>user\nHello world<|im_end|>\n")])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_stand_in_cache_is_built_once_and_rebuilt_when_the_recipe_changes(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        (out / "weights.txt").write_text(str(len(calls)))

    folder = tmp_path / "m"
    assert standins._cached(folder, {"v": 1}, build) == folder
    standins._cached(folder, {"v": 1}, build)
    assert len(calls) == 1 and (folder / "weights.txt").read_text() == "1"
    standins._cached(folder, {"v": 2}, build)
    assert len(calls) == 2 and json.loads((folder / standins.BUILD_FILE).read_text()) == {"v": 2}

    def broken(out):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        standins._cached(tmp_path / "n", {"v": 1}, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no half-built folder left behind


def test_smollm2_tokenizer_is_chatml():
    tok = smollm2_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None and tok.padding_side == "left"
    assert len(tok) == 49152


def test_4bit_on_cpu_and_unsloth_are_clear_errors():
    with pytest.raises(PipelineError, match="load_in_4bit needs a CUDA GPU"):
        load_model_and_tokenizer(TINY_QWEN2, device="cpu", load_in_4bit=True, cache_dir=CACHE_DIR)
    # dropped from the GPU set (README, GPU): refused on any device, with why and the fix, in one line
    with pytest.raises(PipelineError, match=r"^reranker.backend 'unsloth' is not supported: .*logits_to_keep.*set reranker.backend=hf$"):
        load_model_and_tokenizer(TINY_QWEN2, device="cpu", backend="unsloth", cache_dir=CACHE_DIR)


def test_unreachable_hub_id_is_a_pipeline_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(PipelineError, match="'nobody/no-such-model-xyz'.*local model folder") as err:
        load_tokenizer("nobody/no-such-model-xyz", cache_dir=CACHE_DIR)
    assert "\n" not in str(err.value)
    with pytest.raises(PipelineError, match="no-such-model-xyz"):
        load_model_and_tokenizer("nobody/no-such-model-xyz", device="cpu", cache_dir=CACHE_DIR)


def test_missing_local_folder_and_package_are_pipeline_errors(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"), cache_dir=CACHE_DIR)
    with pytest.raises(PipelineError, match="not installed"):
        packaged_file("no-such-distribution-xyz", "x.bin")


def test_smollm2_loads_as_a_plain_fp32_checkpoint():
    model, tok = load_model_and_tokenizer(SMOLLM2, device="cpu", cache_dir=CACHE_DIR)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    saved = json.loads((CACHE_DIR / SMOLLM2 / "config.json").read_text())
    assert "quantization_config" not in saved
    assert encode(tok, "Hello world") == encode(smollm2_tokenizer(), "Hello world")
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1] :])


def test_backend_unsloth_is_refused_at_load_not_after_the_retriever():
    from pipeline.config import load_config

    with pytest.raises(PipelineError, match="reranker.backend 'unsloth' is not supported .*: use reranker.backend=hf"):
        load_config(None, ["reranker.backend=unsloth"])
