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


def test_doctor_says_what_the_cache_holds_and_that_it_may_be_deleted(tmp_path):
    # every dataset.split_seed, window length, source folder and tiny spec builds one more folder there, never deleted
    from sectune.stages.doctor import check_cache

    root = tmp_path / "cache"
    for rel, size in (("models/tiny_llama-aaa/model.safetensors", 3_000_000), ("datasets/auth_logs-s0/x.txt", 1_000_000),
                      ("datasets/auth_logs-s1/x.txt", 1_000_000), ("models/.tiny_llama-bbb.tmp99999999/model.safetensors", 500_000),
                      ("shared_data/loghub/OpenSSH_2k.log", 9_000_000)):  # the user's data, not a build
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"\0" * size)
    import os
    import time

    hours_ago = time.time() - 7200
    os.utime(root / "models" / ".tiny_llama-bbb.tmp99999999", (hours_ago, hours_ago))  # past any pid_max: no live process
    # a build going on now (review R): this process's own, and one another run started a minute ago; neither is "killed"
    (root / "models" / f".tiny_llama-ccc.tmp{os.getpid()}").mkdir()
    (root / "datasets" / ".auth_logs-s2.building-x1y2").mkdir()
    check = check_cache(root)
    assert check.status == "warn", check  # a killed build's folder is there
    import re

    assert 5.4 <= float(re.search(r"([\d.]+) MB on disk", check.detail).group(1)) <= 5.8, check.detail  # blocks, as du counts
    assert "3 built" in check.detail and "1 left by killed builds" in check.detail, check.detail
    assert "may be deleted" in check.detail and str(root / "models" / ".tiny_llama-bbb.tmp99999999") in check.fix
    assert "shared_data" not in check.detail + check.fix
    (root / "models" / ".tiny_llama-bbb.tmp99999999" / "model.safetensors").unlink()
    (root / "models" / ".tiny_llama-bbb.tmp99999999").rmdir()
    assert check_cache(root).status == "ok"
    assert "nothing built yet" in check_cache(tmp_path / "none").detail
