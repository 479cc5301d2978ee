"""Tiny models built locally, so tests and the default run need no download.

A byte-level BPE tokenizer is trained with ``tokenizers`` on text from all the shipped data (auth
logs, HDFS, flows, prompts), a small random Llama or GPT-2 config is initialised, and both are
saved to ``<cache>/models/<name>-<hash>``. Callers then load that folder with
``AutoTokenizer/AutoModel….from_pretrained``: the very path a hub model takes. The hash covers
the spec and the corpus, so a changed spec or corpus never reuses a stale build.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from sectune.files import readable_weights

SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>", "unk_token": "<|unk|>"}

# Text the answers are made of, so JSON keys and verdicts become single tokens.
_VOCAB_HINTS = (
    '{"verdict":"malicious","failed_logins":0,"accepted_logins":0,"invalid_users":[],'
    '"targeted_users":[],"source_ips":[{"ip":"","failures":0}],"brute_force":false,'
    '"break_in_attempts":0,"summary":""} benign suspicious malicious true false null '
    "### Logs: ### Analysis: Label: Classify this IoT network flow. injection benign attack "
    "DDoS DoS Mirai Recon Spoofing Web WebAttack BruteForce Benign Malware Uploading anomaly normal"
)

_MAX_CORPUS_CHARS = 3_000_000


def corpus_texts(shared_data: Path) -> tuple[list[str], str]:
    """Text to train the tokenizer on, and where it came from ("real" or "synthetic")."""
    files = [
        "loghub_openssh_2k/OpenSSH_2k.log",
        "loghub_linux_2k/Linux_2k.log",
        "loghub_hdfs_2k/HDFS_2k.log",
        "ciciot2023_merged39_family_sample/CICIoT2023_sample.csv",
        "deepset_prompt_injections/train.jsonl",
        "deeplog_hdfs_sessions/hdfs_train",
    ]
    texts: list[str] = []
    for rel in files:
        p = shared_data / rel
        if p.is_file():
            text = p.read_text(encoding="utf-8", errors="replace")
            if p.suffix == ".jsonl":
                text = "\n".join(json.loads(line)["text"] for line in text.splitlines() if line.strip())
            texts.append(text[:600_000])
    source = "real"
    if not texts:
        source = "synthetic"
        import tempfile

        from sectune.data import synthetic_auth, synthetic_flows

        texts.append("\n".join(synthetic_auth.generate_auth_lines(4000, seed=0)))
        with tempfile.TemporaryDirectory() as tmp:
            csv = synthetic_flows.generate_cic_iot_46(2000, 0, Path(tmp) / "flows.csv")
            texts.append(Path(csv).read_text(encoding="utf-8"))
    texts.append(_VOCAB_HINTS * 20)
    return texts, source


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _fingerprint(spec: dict, family: str, texts: list[str]) -> str:
    spec = {k: v for k, v in spec.items() if not (k in ("extra_tokens", "chat_template") and not v)}  # older builds stay valid
    if spec.get("chat_template"):
        spec["chat_template"] = CHATML
    h = hashlib.sha256(json.dumps({"spec": spec, "family": family, "v": 3}, sort_keys=True).encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()[:12]


def train_tokenizer(texts: list[str], vocab_size: int, extra_tokens: list[str] | tuple = (), chat: bool = False):
    """Byte-level BPE on ``texts``; ``extra_tokens`` (e.g. an answer schema's keys) are then added
    as whole tokens, matched before the byte-level split, so ``failed_logins`` is one token, not
    ``failed`` ``_`` ``logins``: a domain vocabulary, as a real model's tokenizer has its own."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    budget, chunks = _MAX_CORPUS_CHARS, []
    for t in texts:
        chunks.extend(t[:budget].splitlines())
        budget -= min(len(t), budget)
    tok.train_from_iterator(chunks, trainer=trainer)
    if extra_tokens:
        tok.add_tokens([AddedToken(t, single_word=False, normalized=False) for t in extra_tokens])
    if chat:  # an instruct model's shape: ChatML's turn tokens (special) and template; EOS stays <|eos|>, as a base Qwen's
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=100_000, **SPECIAL_TOKENS)
    if chat:
        out.chat_template = CHATML
    return out


def _model_config(family: str, spec: dict, tokenizer):
    common = dict(
        # Wider than the usual 0.02: with tied embeddings a random model's logits are capped near
        # |h|·|e| ≈ 2.5 at 0.02, which no adapter can lift; at 0.1 LoRA can learn the task.
        initializer_range=spec.get("init_std", 0.1),
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=spec["hidden_size"],
            num_hidden_layers=spec["num_layers"],
            num_attention_heads=spec["num_heads"],
            num_key_value_heads=spec["num_kv_heads"],
            intermediate_size=spec["intermediate_size"],
            max_position_embeddings=spec["max_position_embeddings"],
            tie_word_embeddings=True,
            **common,
        )
    if family == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            n_embd=spec["hidden_size"],
            n_layer=spec["num_layers"],
            n_head=spec["num_heads"],
            n_inner=spec["intermediate_size"],
            n_positions=spec["max_position_embeddings"],
            **common,
        )
    from sectune.errors import ConfigError

    raise ConfigError(f"model.family={family!r}: a tiny model can be built for 'llama' or 'gpt2'")


def ensure_tiny_model(name: str, family: str, spec: dict, shared_data: Path, cache_dir: Path) -> Path:
    """Build (once) and return the folder holding the tiny model and its tokenizer."""
    texts, source = corpus_texts(shared_data)
    # model.name is a label, not a path: "../x" or "org/x" must not place the folder outside <cache>/models
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).lstrip(".") or "model"
    out = cache_dir / "models" / f"{safe}-{_fingerprint(spec, family, texts)}"
    if (out / "BUILD_INFO.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    if source == "synthetic":
        print(f"sectune: {shared_data} has no real data; the tiny tokenizer is trained on generated logs and flows")
    tokenizer = train_tokenizer(texts, spec["vocab_size"], spec.get("extra_tokens") or (), bool(spec.get("chat_template")))
    # The build's own seed, without touching the caller's RNG: a run that builds the model first
    # must train exactly like a run that finds it in the cache.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.get("seed", 0))
        model = AutoModelForCausalLM.from_config(_model_config(family, spec, tokenizer))
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    info = {"name": name, "family": family, "spec": spec, "corpus": source, "parameters": n_params}
    (tmp / "BUILD_INFO.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    readable_weights(tmp)  # a shared .cache: safetensors 0.8 saves owner-only
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process (a sweep job, another rank) finished first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return out
