"""What a run leaves on disk (an audit, session 44): no check file larger than the weights it checks."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sectune.stages import sft


def _model_and_tokenizer(vocab: int):
    """A one-layer Llama with a Llama-2-sized vocabulary and a word-level tokenizer of that many words."""
    words = {f"w{i}": i for i in range(vocab - 1)} | {"<unk>": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval(), tokenizer


def test_probe_logits_stay_small_on_a_large_vocabulary_and_a_reload_reproduces_them(tmp_path):
    # 32,000 tokens x 128 positions x fp32 was 16 MB per SFT run (66 MB on Llama 3's 128,256), beside an adapter of a few MB
    vocab = 32_000
    model, tokenizer = _model_and_tokenizer(vocab)
    text = " ".join(f"w{(i * 7919) % (vocab - 1)}" for i in range(200))  # longer than the probe's 128 tokens
    path = tmp_path / "checks" / "probe_logits.safetensors"
    sft.save_probe_logits(model, tokenizer, [text, "w1 w2"], path)

    assert path.stat().st_size < 64 * 1024, path.stat().st_size
    probe, k = load_file(str(path)), sft.PROBE_TOP_K
    assert probe["input_ids"].shape == (1, 128)
    assert probe["top_ids"].shape == probe["top_logits"].shape == (1, 128, k)
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    # the kept logits are each position's largest, and a reload reproduces them
    torch.testing.assert_close(logits.topk(k, dim=-1).values, probe["top_logits"])
    torch.testing.assert_close(logits.gather(-1, probe["top_ids"].long()), probe["top_logits"])
