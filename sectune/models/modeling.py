"""Tokenizer and model from the config: where the weights are, quantization, LoRA.

Every model, tiny or real, goes through ``from_pretrained(dir_or_hub_id)``. Real presets are
looked up in the local Hugging Face cache first; without network a missing model is one clear
error saying how to provide it (``model.name_or_path=/path/to/weights``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sectune.config import model_label, model_title
from sectune.console import new_head_quietly
from sectune.errors import ConfigError, ModelNotAvailableError
from sectune.models.lora import (GPT2_NAMES, _lora_layers, apply_lora, linear_module_names, merged_lora, quantized_module_count,
                                 trainable_parameters, untie_lora_bases)

#: the LoRA side lives in models/lora.py; the stages and the tests reach it through this module
__all__ = ["GPT2_NAMES", "_lora_layers", "apply_lora", "linear_module_names", "merged_lora",
           "quantized_module_count", "trainable_parameters", "untie_lora_bases", "model_label", "model_title"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": "auto"}


def _where(path: str, cfg: DictConfig) -> str:
    label = model_label(cfg.model)
    return f"model {path!r} ({label})" if label.startswith("model=") else f"model.name_or_path={path!r}"


def model_path(cfg: DictConfig) -> str:
    """The folder or hub id to load; builds the tiny model on first use."""
    m = cfg.model
    if m.name_or_path:
        return str(m.name_or_path)
    if m.tiny is None:
        raise ConfigError(f"model={m.name}: set model.name_or_path (a hub id or a local folder)")
    from sectune.models.tiny import ensure_tiny_model

    spec = OmegaConf.to_container(m.tiny, resolve=True)
    return str(ensure_tiny_model(m.name, m.family, spec, Path(cfg.paths.shared_data), Path(cfg.paths.cache_dir)))


def adapter_base(adapter_dir, cfg: DictConfig) -> str:
    """The weights a saved adapter belongs on: ``artifacts.base_model`` of the run that saved it (an RL
    or DPO adapter trained on an SFT run's full weights, ``lora=none``), else the configured model."""
    import json

    run_dir = Path(adapter_dir).parent
    try:
        rel = (json.loads((run_dir / "result.json").read_text(encoding="utf-8")).get("artifacts") or {}).get("base_model")
    except (OSError, ValueError, AttributeError):
        rel = None
    if rel:
        from sectune.training.checkpoints import damaged_safetensors

        folder = run_dir / rel
        if not (folder / "config.json").is_file():  # it fell back to the configured model: the adapter on other weights
            raise ConfigError(f"{run_dir / 'result.json'}: the adapter's base model, artifacts.base_model={rel}, is missing "
                              f"({folder / 'config.json'} not found): the adapter belongs on those weights only")
        if (damage := damaged_safetensors(folder)) is not None:
            raise ConfigError(f"{folder / damage[0]} (artifacts.base_model of {run_dir}) is damaged ({damage[1]})")
        return str(folder)
    configured = model_path(cfg)
    # else the local folder the adapter was trained on, where it differs from this command's model= (infer did this
    # alone: DPO and RL trained an SFT adapter on this command's base, and infer then ran their adapter on the SFT's:
    # an audit, session 36)
    try:
        trained_on = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        trained_on = None
    local = Path(str(trained_on)).expanduser() if trained_on else None
    if local is not None and (local / "config.json").is_file() and local.resolve() != Path(configured).expanduser().resolve():
        print(f"sectune: the adapter in {adapter_dir} goes on the weights it was trained on ({local}), not on "
              f"{model_label(cfg.model)} ({configured})")
        return str(local)
    return configured


def _hub_kwargs(cfg: DictConfig) -> dict:
    # only a real true turns it on: bool("false") is True, and a config read without the schema can hold a string
    return {"revision": cfg.model.revision, "trust_remote_code": cfg.model.get("trust_remote_code") is True}


@functools.lru_cache(maxsize=1)
def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (its host refuses or does not answer a TCP connection within ``timeout``), or None.
    Without network the download's own retries took ~50 s before the same error; behind a proxy nothing is probed."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{url.hostname} unreachable: {e.strerror or type(e).__name__}"


@contextlib.contextmanager
def _refused_unsafe(path: str, cfg: DictConfig):
    """Weights that only unpickling could load, or a model that needs its own code, are refused by torch and transformers
    (no code runs); the refusal is one line naming the model, not a traceback whose advice is the unsafe option
    (``weights_only=False``, ``trust_remote_code=True``: an audit, session 37)."""
    import pickle

    where = _where(path, cfg)
    try:
        yield
    except pickle.UnpicklingError:
        raise ModelNotAvailableError(
            f"{where}: its weights file holds pickled objects beyond tensors; sectune loads pickled weights with "
            "weights_only=True only, so it is refused (no code ran). Use a safetensors copy of weights you trust") from None
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ModelNotAvailableError(
            f"{where}: the model needs its own code (config.json's auto_map or an unknown model_type), which runs only "
            "with model.trust_remote_code=true: set it (in a preset) for a model whose code you trust") from None


def _from_pretrained(loader, path: str, cfg: DictConfig, tokenizer_only: bool = False, **kwargs):
    """Local cache first (fast, offline); then the hub; then a clear error. ``tokenizer_only``: a folder of a
    tokenizer's files will do (:func:`check_model_folder`)."""
    kwargs = {**_hub_kwargs(cfg), **kwargs}
    # one refusal for every way in (local folder, cache, hub): pickled code or a model's own code, one line
    with _refused_unsafe(path, cfg):
        if Path(path).is_dir():
            check_model_folder(Path(path), cfg, tokenizer_only)
            return loader(path, **kwargs)
        if looks_like_a_path(path):  # a hub id is owner/name: this is a folder that is not there (a typo, a deleted run)
            raise ModelNotAvailableError(f"{_where(path, cfg)}: no such folder"
                                         + (f" ({Path(path).expanduser()} is a file)" if Path(path).expanduser().is_file() else ""))
        try:
            return loader(path, local_files_only=True, **kwargs)
        except OSError:
            pass
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        why = "HF_HUB_OFFLINE is set" if offline else hub_unreachable()
        try:
            if why:
                raise OSError(why)
            return loader(path, **kwargs)
        except OSError as e:
            raise ModelNotAvailableError(
                f"{_where(path, cfg)} is not in the local Hugging Face cache and could not be "
                f"downloaded ({e.__class__.__name__}{': ' + why if why else ''}). Download it where "
                f"there is network (`hf download {path}`) or point to the weights with model.name_or_path=/path/to/folder"
            ) from None


def check_model_folder(folder: Path, cfg: DictConfig, tokenizer_only: bool = False) -> None:
    """A local folder given as a model must hold one (``config.json``; a tokenizer's files will do for a tokenizer):
    an adapter folder or a run dir otherwise reached transformers, which loaded an adapter onto its base behind the
    run's back (and trained 0 parameters) or failed with a tokenizer backend traceback."""
    if (folder / "config.json").is_file() or tokenizer_only and any((folder / n).is_file() for n in ("tokenizer_config.json", "tokenizer.json")):
        return
    where = f"model.name_or_path={folder}" if str(folder) == str(cfg.model.name_or_path) else str(folder)
    if (folder / "adapter_config.json").is_file():
        raise ConfigError(f"{where}: a LoRA adapter, not model weights. Start a stage from it with <stage>.init_from=<its run "
                          "dir> (dpo, rl, contrastive), or give full weights: the model/ of a run trained with lora=none")
    if (folder / "result.json").is_file():
        subs = [n for n in ("model", "adapter") if (folder / n).is_dir()]
        hint = (f"its full weights are {folder / 'model'}" if "model" in subs else
                "it saved a LoRA adapter (adapter/), not full weights: start from it with <stage>.init_from=<this run dir>, "
                "or train with lora=none to get model/" if "adapter" in subs else "it saved no weights")
        raise ConfigError(f"{where}: a sectune run dir, not a model folder; {hint}")
    raise ConfigError(f"{where}: not a model folder (no config.json)")


def looks_like_a_path(name: str) -> bool:
    """A local path rather than a hub id: absolute, home- or dot-relative, or more than one "/" (ids are owner/name)."""
    name = str(name)
    return name.startswith(("/", "~", "./", "../")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def load_tokenizer(cfg: DictConfig, path: str | None = None):
    from transformers import AutoTokenizer

    path = path or model_path(cfg)
    tok = _from_pretrained(AutoTokenizer.from_pretrained, path, cfg, tokenizer_only=True)
    if tok.pad_token is None:  # Llama/GPT-2 ship none; eos is the usual stand-in
        tok.pad_token = tok.eos_token
    _check_vocab(tok, Path(path) / "config.json")
    from sectune.chat_frame import attach, wanted

    attach(tok, wanted(cfg), str(path), cfg.model.get("chat_system"))
    return tok


def _check_vocab(tok, config_file: Path) -> None:
    """A tokenizer with ids past its model's embedding (a pad token added, the model never resized) failed mid-run with a
    bare IndexError, after the data was built (an audit, session 38): said before anything runs."""
    try:
        vocab = json.loads(config_file.read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return  # no config beside it (a hub id, an adapter folder): the model says what it holds when it loads
    if isinstance(vocab, int) and len(tok) > vocab:
        raise ConfigError(f"{config_file.parent}: its tokenizer has {len(tok)} tokens (pad {tok.pad_token!r} = id {tok.pad_token_id}) "
                          f"but config.json's vocab_size is {vocab}: ids from {vocab} on have no embedding (tokens added "
                          "without resizing the model?). Resize it (model.resize_token_embeddings(len(tokenizer)), then "
                          "save_pretrained) or drop the added tokens: sectune pads with eos where a tokenizer has no pad")


def tokenizer_for(cfg: DictConfig, folder, fallback: str | None = None):
    """The tokenizer saved with ``folder`` (the adapter or weights a stage starts from or answers with: an SFT
    run's may add tokens the configured model lacks, as the tiny preset's whole-token answer keys do), else
    ``fallback``'s (default: the configured model's)."""
    has = folder is not None and any((Path(folder) / n).is_file() for n in ("tokenizer_config.json", "tokenizer.json"))
    return load_tokenizer(cfg, str(folder) if has else fallback)


def quantization_config(cfg: DictConfig):
    q = cfg.quantization
    if q.name == "none":
        return None
    from transformers import BitsAndBytesConfig

    from sectune.config_checks import COMPUTE_DTYPES, check_quantization

    check_quantization(cfg)  # runner.run checked it already; here for callers that skip check_values
    if q.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=getattr(torch, COMPUTE_DTYPES[q.bnb_4bit_compute_dtype]),
        )
    if q.load_in_8bit:
        from sectune.config import QuantizationConfig

        unread = {k: q[k] for k in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")
                  if q[k] != getattr(QuantizationConfig, k)}
        if unread:  # not refused: a sweep over quantization=int8,nf4 shares its 4-bit settings (an audit, session 41)
            print(f"sectune: warning: {', '.join(f'quantization.{k}={v}' for k, v in unread.items())}: 4-bit settings; "
                  f"quantization={q.name} (8-bit) reads none of them", file=sys.stderr)
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(f"quantization={q.name}: set load_in_4bit or load_in_8bit")


def device_for(cfg: DictConfig) -> str:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want not in ("cpu", "cuda"):
        from sectune.config import device_choices

        raise ConfigError(f"train.device={want!r}: {device_choices(want)}")
    return want


def check_positions(config, max_seq_length, path: str) -> None:
    """``model.max_seq_length`` past the model's positions: an error where they are learned (GPT-2's embedding lookup
    fails at the first long batch, mid-run), a warning where they are rotary (it runs, past the trained context)."""
    limit = getattr(config, "max_position_embeddings", None)
    if not max_seq_length or not isinstance(limit, int) or int(max_seq_length) <= limit:
        return
    rotary = any(getattr(config, k, None) is not None for k in ("rope_theta", "rope_scaling", "rope_parameters"))
    if not rotary:
        raise ConfigError(f"model.max_seq_length={max_seq_length}: {path} has {limit} learned positions "
                          f"(max_position_embeddings); set model.max_seq_length<={limit}")
    print(f"sectune: warning: model.max_seq_length={max_seq_length} is past {path}'s max_position_embeddings={limit}: "
          "rotary positions run there, but beyond the context the model was trained on", file=sys.stderr)


def load_model(cfg: DictConfig, task: str = "causal_lm", num_labels: int | None = None, path: str | None = None):
    """The base model, quantized if asked; ``task`` is causal_lm or seq_cls."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = path or model_path(cfg)
    m = cfg.model
    if m.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={m.dtype!r}: choose one of {', '.join(DTYPES)}")
    kwargs: dict = {"dtype": DTYPES[m.dtype]}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    qconf = quantization_config(cfg)
    if qconf is not None:
        kwargs["quantization_config"] = qconf
    device = device_for(cfg)
    if m.device_map is not None:
        kwargs["device_map"] = OmegaConf.to_container(m.device_map) if OmegaConf.is_config(m.device_map) else m.device_map
        if m.max_memory:
            # a GPU index arrives from YAML/the command line as the string "0"; accelerate wants the int
            kwargs["max_memory"] = {int(k) if str(k).isdigit() else k: v for k, v in m.max_memory.items()}
        if m.offload_folder:
            kwargs["offload_folder"] = m.offload_folder
    elif qconf is not None:
        kwargs["device_map"] = {"": device}  # bitsandbytes quantizes while placing
    if task == "seq_cls":
        kwargs["num_labels"] = num_labels
        # a base model has no score head yet: transformers' report of it as "newly initialized" is dropped (console.py)
        with new_head_quietly() if not _is_sequence_classifier(path) else contextlib.nullcontext():
            model, info = _from_pretrained(AutoModelForSequenceClassification.from_pretrained, path, cfg, output_loading_info=True, **kwargs)
        # beside the new head, what the weights lacked (an MLM checkpoint's BERT pooler): apply_lora trains and saves it
        model._sectune_fresh = sorted({k.rsplit(".", 1)[0] for k in info.get("missing_keys") or ()
                                       if k.split(".")[0] not in ("score", "classifier")})
    else:
        model = _from_pretrained(AutoModelForCausalLM.from_pretrained, path, cfg, **kwargs)
    check_positions(model.config, m.max_seq_length, path)
    if getattr(model.config, "pad_token_id", None) is None and model.config.eos_token_id is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    if qconf is not None:
        from peft import prepare_model_for_kbit_training

        # bitsandbytes >= 0.50 on an AVX512-BF16 CPU repacks a Linear4bit's weight for its inference kernel
        # (gemv_4bit) at the first forward in eval mode without grad (the evaluation before training, a
        # generation) and never packs it back: every later training forward then runs gemv_4bit, which has no
        # autograd kernel, so no gradient flows through the quantized layers (torch only warns). A stage that
        # trains keeps the trainable layout; infer and evaluate only generate and keep the faster kernel.
        if str(OmegaConf.select(cfg, "stage.name", default="")) not in ("infer", "evaluate"):
            keep_training_4bit_layout(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    return model


def _is_sequence_classifier(path: str) -> bool:
    """Whether the folder ``path`` holds a saved ``…ForSequenceClassification`` (its score head is then in the weights,
    and a load report of it missing is news); False for a base model, a hub id or an unreadable config."""
    try:
        arch = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in arch)


def pad_like_tokenizer(model, tokenizer) -> None:
    """A sequence-classification head reads each row at its last token that is not ``config.pad_token_id``; the collator
    pads with the tokenizer's. Filled in from eos (:func:`load_model`), the two differ in Llama-3.x- and Qwen2.5-Instruct,
    and rows shorter than their batch's longest were classified at a pad (an audit, session 38)."""
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


def keep_training_4bit_layout(model) -> None:
    """Keep bitsandbytes' 4-bit layers in the layout training uses: on an AVX512-BF16 CPU the first forward in eval mode
    without grad otherwise repacks them for an inference kernel (see :func:`load_model`), which scores ~3% of a reward
    model's score spread away from the model its stage trained and validated."""
    for mod in model.modules():
        if getattr(mod, "support_avx512bf16_for_cpu", False):
            mod.support_avx512bf16_for_cpu = False


def release_memory() -> None:
    """Give back what a dropped model held (its last reference deleted by the caller): Python's cycles, and the CUDA
    allocator's cached blocks, so the next model loads into the memory this one freed."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def to_run_device(model, cfg: DictConfig):
    """For use outside Trainer (which places the model itself): move a model that ``from_pretrained``
    left on the CPU to the run's device (``train.device``; auto = CUDA when visible). Quantized and
    ``model.device_map`` models were placed while loading and are returned as they are."""
    if cfg.quantization.name != "none" or cfg.model.device_map is not None:
        return model
    return model.to(device_for(cfg))


def save_pretrained_atomic(model, tokenizer, out: Path) -> None:
    """safetensors adapter (or full model) + tokenizer; appears under ``out`` only when complete."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    from sectune.chat_frame import stop_at_turn_end

    stop_at_turn_end(model, tokenizer)  # a framed run's folder, served as it is, stops where its answers end
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    except BaseException:  # a full disk: the partial folder went on holding the room a retry needs (audit Z, session 39)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def replace_dir(tmp: Path, out: Path) -> None:
    """``tmp`` renamed to ``out`` (:func:`sectune.run_guard.replace_dir`: the old one deleted only once the new is in)."""
    from sectune.run_guard import replace_dir as replace

    replace(tmp, out)
