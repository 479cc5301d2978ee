"""stage=export: a run's analyst as one plain model folder that transformers, vLLM or TGI load without PEFT or sectune.

    sectune stage=export export.model_dir=outputs/PIPELINE            # -> <run dir>/model/
    sectune stage=export export.model_dir=outputs/DATE/TIME export.dtype=bf16

The model is the one ``stage=infer`` would answer with in ``export.model_dir`` (RL → DPO → SFT, a pipeline's
validation-chosen policy first: :mod:`sectune.model_chain`). Its LoRA adapter is merged into the base it was trained on
(PEFT's ``merge_and_unload``; an LM head tied to the input embeddings gets its own copy first, so the merge changes the
head alone), loaded unquantized: folding an adapter into 4- or 8-bit weights is lossy, so an nf4/int8 run's adapter goes
on the full-precision base, which answers somewhat otherwise than the quantized model the run trained and evaluated (the
distance is measured and said, as for an export in another dtype than the run trained in, ``export.dtype``; by default
the run's). The folder holds safetensors weights, the tokenizer, ``generation_config.json`` with the run's decoding
settings (what ``generate`` and vLLM take as defaults), ``sectune_export.json`` (where it came from, the prompt around
the logs, the answers' JSON schema for a server's structured output, the checks below) and a model card (README.md).
Its chat template renders one user message, the log lines, as that prompt, so a chat endpoint sends what the analyst
trained on.

Nothing is kept that was not checked: on a fixed analyst prompt the merged model's logits are compared with the adapter's
on the same weights (the merge), and the saved folder, loaded back as a server would, with the merged model (the save:
a head tied on reload to the embeddings, a weight left out). Past ``export.max_logit_diff`` the folder is not written.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sectune.config import QuantizationConfig
from sectune.data import auth_logs
from sectune.errors import ConfigError, SectuneError, shown
from sectune.model_chain import choose_model, load_model, run_generation
from sectune.models import modeling
from sectune.runner import RunContext, environment, refuse_non_analyst, write_json_atomic, write_text_atomic
from sectune.training import distributed

#: what the check reads: an analyst prompt of a few auth-log lines (fixed, so two exports are checked alike)
PROBE_LOGS = ("Mar  3 10:15:01 host sshd[4242]: Failed password for invalid user admin from 203.0.113.9 port 52144 ssh2\n"
              "Mar  3 10:15:04 host sshd[4242]: Failed password for root from 203.0.113.9 port 52150 ssh2\n"
              "Mar  3 10:16:10 host sshd[4250]: Accepted publickey for alice from 198.51.100.7 port 40022 ssh2")
#: export.max_logit_diff's default, times the largest reference logit (at least 1): the rounding a merge into weights of
#: that dtype may add (bf16 and fp16 keep 8 and 11 bits of mantissa); a lost head or weight moves logits by whole units
RELATIVE_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}
EXPORT_FILE = "sectune_export.json"


def run(ctx: RunContext) -> dict:
    cfg, ec = ctx.cfg, ctx.cfg.export
    if not distributed.is_main_process():  # nothing to share: rank 0 exports alone
        return {"metrics": {}, "artifacts": {}}
    if ec.model_dir is None:
        raise ConfigError("export.model_dir is not set: give export.model_dir=<an sft, dpo or rl run dir or a pipeline dir>")
    if (ctx.run_dir / "model").resolve() == Path(str(ec.model_dir)).expanduser().resolve() / "model":
        raise ConfigError(f"hydra.run.dir is export.model_dir ({ctx.run_dir}): the export goes to a run dir of its own")
    choice = choose_model(ec.model_dir, base_fallback=False, key="export.model_dir")
    # a log-key model (dataset=hdfs) or a classifier: the analyst's chat template, answer schema and decoding would be
    # exported around it as succeeded (stage=infer refuses it alike)
    refuse_non_analyst(choice, ec.model_dir, "export.model_dir")
    for why in choice.skipped:
        print(f"sectune: warning: export: skipped {why}")
    gen = run_generation(cfg, choice, "export")
    trained = _trained_quantization(cfg, choice)

    # the dtype the run trained and evaluated in: a bf16 export of an fp32 run was checked against the adapter on bf16
    # weights alone, and said "within 0.13 of the adapter's" where 6% of next-token choices differed from the run's
    trained_dtype = _trained_dtype(cfg, choice)
    dtype = ec.dtype or trained_dtype  # by default the dtype the run trained and was evaluated in
    if dtype not in RELATIVE_TOLERANCE:
        raise ConfigError(f"export.dtype={dtype}{' (the run trained in it)' if ec.dtype is None else ''}: choose one of "
                          f"{', '.join(RELATIVE_TOLERANCE)}")
    # an fp32 run exported in bf16/fp16 is merged in fp32 (checked against its own fp32 model, the merge alone) and then
    # cast: the merge checked in bf16 held the dtype's rounding of the whole model (a 2-step tiny SFT run's bf16 export was
    # refused at 0.171 > 0.143, its bf16 adapter model itself 0.21 from the fp32 one); the rounding is said, not checked
    merge_dtype = "fp32" if trained == "none" and trained_dtype == "fp32" else dtype
    metrics: dict = {}
    if trained != "none" or merge_dtype != trained_dtype:  # the model the run trained and evaluated: how far the export is from it
        as_run = copy.deepcopy(cfg)
        as_run.model.dtype = trained_dtype
        quantized, tokenizer, _ = load_model(as_run, choice)
        probe = _probe(tokenizer, quantized)
        trained_logits = _logits(quantized, probe)
        del quantized
        modeling.release_memory()
    full = copy.deepcopy(cfg)
    full.model.dtype = merge_dtype
    full.quantization = OmegaConf.structured(QuantizationConfig())  # merged into 4- or 8-bit weights, an adapter is rounded
    model, tokenizer, ref = load_model(full, choice, as_trained=False)
    base = str((model.get_base_model() if hasattr(model, "get_base_model") else model).name_or_path)
    base = str(Path(base).resolve()) if Path(base).exists() else base  # rl/../sft/model: where it is
    probe = _probe(tokenizer, model)
    reference = _logits(model, probe)
    scale = max(1.0, reference.abs().max().item())
    limit = ec.max_logit_diff if ec.max_logit_diff is not None else RELATIVE_TOLERANCE[merge_dtype] * scale
    if merge_dtype != dtype:
        trained_logits = reference  # the run's own model: the adapter on its fp32 base
    if choice.kind == "adapter":
        from sectune.models.lora import untie_lora_bases

        untied = untie_lora_bases(model)
        model = model.merge_and_unload()
        metrics["untied_weights"] = untied
    merged = _logits(model, probe)  # a full-weight run's: its own (nothing merged; the save is what is checked)
    metrics["merge_max_logit_diff"] = (merged - reference).abs().max().item()
    _check(metrics["merge_max_logit_diff"], limit, "the merged model and the adapter on its base", ref)
    if merge_dtype != dtype:  # the export's own weights, which the saved folder must give back
        for p in model.parameters():  # weights only: .to() would also round buffers (rotary inv_freq) a load keeps in fp32
            p.data = p.data.to(modeling.DTYPES[dtype])
        model.config.dtype = modeling.DTYPES[dtype]
        merged = _logits(model, probe)
        metrics["merge_max_logit_diff_allowed"], metrics["merged_in"] = limit, merge_dtype
        limit = ec.max_logit_diff if ec.max_logit_diff is not None else RELATIVE_TOLERANCE[dtype] * scale

    out = ctx.run_dir / "model"
    # saved and checked beside model/, which it replaces only once checked: a re-export that failed its check had
    # deleted the earlier, checked export (and a folder without sectune_export.json was model/ meanwhile)
    staging = ctx.run_dir / f".{out.name}.export"
    model.generation_config = _generation_config(model, tokenizer, gen)
    tokenizer.chat_template = analyst_chat_template(tokenizer)
    modeling.save_pretrained_atomic(model, tokenizer, staging)
    try:
        device = model.device  # read back on the device it was merged on: the check compares weights, not two devices' kernels
        del model
        modeling.release_memory()
        saved = _load_plain(staging, dtype, cfg.model.get("trust_remote_code") is True, device)
        reloaded = _logits(saved, probe)
        del saved
        metrics["saved_max_logit_diff"] = (reloaded - merged).abs().max().item()
        metrics["max_logit_diff"] = (reloaded - reference).abs().max().item()
        metrics["top1_agreement"] = (reloaded.argmax(-1) == reference.argmax(-1)).float().mean().item()
        _check(metrics["saved_max_logit_diff"], limit, "the saved folder, loaded back, and the merged model", str(out))
        if trained != "none" or trained_dtype != dtype:
            metrics["max_logit_diff_vs_trained"] = (reloaded - trained_logits).abs().max().item()
            metrics["top1_agreement_vs_trained"] = (reloaded.argmax(-1) == trained_logits.argmax(-1)).float().mean().item()
            how = (f"trained on a quantization={trained} base; its adapter is merged into the unquantized weights ({dtype}), "
                   "which agree" if trained != "none" else f"trained in {trained_dtype}; exported in {dtype}, its weights agree")
            print(f"sectune: warning: export: the {choice.used} run {how} with the model it trained and evaluated on "
                  f"{metrics['top1_agreement_vs_trained']:.1%} of next-token choices of the check prompt (logits up to "
                  f"{metrics['max_logit_diff_vs_trained']:.3g} apart): evaluate the export before serving it")
        desc = _description(cfg, ec, choice, base, dtype, trained, gen, metrics, limit, tokenizer)
        write_json_atomic(staging / EXPORT_FILE, desc)
        write_text_atomic(staging / "README.md", model_card(desc, Path(str(ec.model_dir)).expanduser()))
        modeling.replace_dir(staging, out)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    # a full-weight run has no adapter to merge: its check is the saved folder's against the model it loaded
    against = "the adapter's" if choice.kind == "adapter" else "the run's model"
    print(f"sectune: export: the {choice.used} {choice.kind} of {ec.model_dir} as one model folder: {out} ({dtype}; logits "
          f"within {metrics['max_logit_diff']:.2g} of {against}; load it with AutoModelForCausalLM.from_pretrained or "
          f"serve it with vLLM; {EXPORT_FILE} holds its prompt and answer schema)")
    return {"metrics": metrics, "artifacts": {"model": "model", "export": f"model/{EXPORT_FILE}"}}


def analyst_chat_template(tokenizer) -> str:
    """A chat template that renders one user message, the log lines, as the prompt the analyst trained on: a server's
    chat endpoint (vLLM's /v1/chat/completions, ``apply_chat_template``) would otherwise wrap them in the base model's
    template (or have none), a prompt the model never saw. The BOS the tokenizer adds to plain text is written by the
    template, since servers tokenize a rendered chat without adding special tokens. An analyst trained inside its
    model's chat template (:mod:`sectune.chat_frame`) gets that frame around the prompt, as it was recorded."""
    from sectune.chat_frame import frame_of
    from sectune.inference import text_ids

    before, after = _prompt_parts(tokenizer)
    bos = frame_of(tokenizer) is None and tokenizer.bos_token_id is not None and text_ids(tokenizer, "x")[:1] == [tokenizer.bos_token_id]
    return ("{%- if messages | length != 1 or messages[0]['role'] != 'user' -%}"
            "{{ raise_exception('this analyst reads one user message: the log lines') }}{%- endif -%}"
            + ("{{ bos_token }}" if bos else "")
            + "{% raw %}" + before + "{% endraw %}{{ messages[0]['content'] | trim }}{% raw %}" + after + "{% endraw %}")


def _trained_quantization(cfg, choice) -> str:
    from sectune.runner import trained_quantization

    return str(trained_quantization(cfg, choice).quantization.name)


def _trained_dtype(cfg, choice) -> str:
    from sectune.run_records import _chosen_run_config

    run = _chosen_run_config(choice)
    theirs = OmegaConf.select(run, "model.dtype", default=None) if run is not None else None
    return str(theirs) if theirs in RELATIVE_TOLERANCE else str(cfg.model.dtype)


def _prompt_parts(tokenizer) -> tuple[str, str]:
    """The analyst's prompt before and after its log lines (``auth_logs.render_prompt``), inside the chat template's
    frame where the analyst trained in one (:mod:`sectune.chat_frame`)."""
    from sectune.chat_frame import frame_of

    marker = "\x00LOGS\x00"
    before, after = auth_logs.render_prompt(marker).split(marker)
    frame = frame_of(tokenizer)
    if frame is None:
        return before, after
    if frame.strip:  # the template trims the message, and so did training (sectune.chat_frame.framed_ids)
        before, after = before.lstrip(), after.rstrip()
    return frame.before + before, after + frame.after


def _probe(tokenizer, model) -> torch.Tensor:
    from sectune.inference import prompt_ids

    ids = torch.tensor([prompt_ids(tokenizer, auth_logs.render_prompt(PROBE_LOGS))])  # as infer tokenizes a prompt
    return ids[:, : int(getattr(model.config, "max_position_embeddings", ids.shape[1]) or ids.shape[1])]


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids.to(model.device)).logits.float().cpu()


def _load_plain(folder: Path, dtype: str, remote_code: bool, device: torch.device):
    """The folder as a server loads it: transformers alone, no PEFT, no sectune settings."""
    from transformers import AutoModelForCausalLM

    placed = {"device_map": {"": str(device)}} if device.type != "cpu" else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=modeling.DTYPES[dtype], trust_remote_code=remote_code, **placed)


def _check(diff: float, limit: float, what: str, where: str) -> None:
    if not math.isfinite(diff) or diff > limit:
        raise SectuneError(f"export: {what} answer the check prompt with logits up to {diff:.3g} apart (export.max_logit_diff "
                           f"allows {limit:.3g}): not exported ({where})")


def _generation_config(model, tokenizer, gen):
    """The run's decoding settings as transformers' GenerationConfig (``generate`` and vLLM read them as defaults)."""
    from transformers import GenerationConfig

    sampled = dict(temperature=float(gen.temperature), top_p=float(gen.top_p)) if gen.do_sample else {}
    return GenerationConfig(max_new_tokens=int(gen.max_new_tokens), do_sample=bool(gen.do_sample),
                            repetition_penalty=float(gen.repetition_penalty), **sampled,
                            eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                            bos_token_id=getattr(model.config, "bos_token_id", None))


def _description(cfg, ec, choice, base, dtype, trained, gen, metrics, limit, tokenizer) -> dict:
    validator = auth_logs._validator(cfg.infer.schema)
    before, after = _prompt_parts(tokenizer)
    return {
        "source": {"model_dir": str(ec.model_dir), "step": choice.used, "kind": choice.kind, "path": str(choice.path),
                   "base": base if choice.kind == "adapter" else None, "trained_quantization": trained},
        "dtype": dtype,
        "prompt": {"before_logs": before, "after_logs": after,
                   "note": "the log lines go between the two, stripped of leading and trailing blank space; the "
                           "tokenizer's chat template does so for one user message holding the lines. sectune reads a "
                           "control token's spelling inside a log line (an attacker's user name '</s>') as text; a server "
                           "that tokenizes the prompt with special tokens recognised reads it as that token"},
        "answer_schema": validator.schema,
        "generation": {k: gen[k] for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "repetition_penalty")},
        "checks": {**metrics, "max_logit_diff_allowed": limit},
        "environment": environment(str(cfg.train.device)),
    }


def model_card(desc: dict, source: Path) -> str:
    """The folder's README.md (a hub model card): where the model came from, its prompt and answer schema, the held-out
    table its pipeline measured (every row, the classic baselines beside the policies, as recorded), and the caveats."""
    src, checks = desc["source"], desc["checks"]
    hub_base = src.get("base") if src.get("base") and not Path(str(src["base"])).expanduser().exists() else None
    lines = ["---", "library_name: transformers", *([f"base_model: {hub_base}"] if hub_base else []),
             "tags: [sectune, security, log-analysis, auth-logs]", "---", "",
             "# An auth-log analyst exported by sectune", "",
             f"The {src['step']} policy of `{src['model_dir']}` ({src['kind']} `{src['path']}`"
             + (f", merged into `{src['base']}`" if src.get("base") else "") + f"), saved in {desc['dtype']} by "
             f"`sectune stage=export` (sectune {desc['environment'].get('sectune', '?')}).", "",
             "## Prompt", "",
             "One user message holding the log lines; the tokenizer's chat template renders it as the prompt the model "
             "trained on:", "", "```", desc["prompt"]["before_logs"] + "<log lines>" + desc["prompt"]["after_logs"], "```", "",
             "The answer is one JSON object; `sectune_export.json` holds its JSON schema (`answer_schema`), for a server's "
             "structured output. " + ("Sampled" if desc["generation"]["do_sample"] else "Greedy") + " decoding as the run "
             "decoded: `generation_config.json`.", ""]
    table = _heldout_rows(source, src["step"])
    lines += ["## Held-out evaluation (recorded by the source pipeline)", ""] + (table or [
        "None recorded with this run: score it with `sectune stage=evaluate` on the source run before serving it.", ""])
    cast = f", merged in {checks['merged_in']}, then cast to {desc['dtype']}" if "merged_in" in checks else ""
    allowed = checks.get("merge_max_logit_diff_allowed", checks["max_logit_diff_allowed"])
    merge = (f"- The merged model's logits on a fixed analyst prompt are within {checks['merge_max_logit_diff']:.2g} of the "
             f"adapter's on the same weights (allowed: {allowed:.2g}{cast}); loaded back from this folder, within "
             if src["kind"] == "adapter" else "- A full-weight run (no adapter to merge): loaded back from this folder, its "
             "logits on a fixed analyst prompt are within ")
    whom = "the merged model" if src["kind"] == "adapter" else "the run's model"
    lines += ["## Checks and caveats", "",
              merge + f"{checks['saved_max_logit_diff']:.2g} of {whom}"
              f" (allowed: {checks['max_logit_diff_allowed']:.2g}).",
              *([(f"- Trained on a quantization={src['trained_quantization']} base and merged into the unquantized weights"
                  if src["trained_quantization"] != "none" else f"- Trained in another dtype than this folder's {desc['dtype']}")
                 + f": {checks['top1_agreement_vs_trained']:.1%} of next-token choices on the check prompt agree with the "
                 "model the run trained and evaluated; the table above is that model's."] if "top1_agreement_vs_trained" in checks else []),
              "- A log line is attacker-controlled text. sectune reads a control token's spelling inside it (a user name "
              "`</s>`) as text; a server that tokenizes the rendered prompt with special tokens recognised reads it as that "
              "token. The analysis is advice for an analyst, not a verdict to act on unread.", ""]
    return "\n".join(lines)


def _heldout_rows(source: Path, step: str) -> list[str]:
    """The pipeline's held-out table as markdown (its heldout.json), the exported step's rows marked; [] where none."""
    import json

    try:
        table = json.loads((source / "heldout.json").read_text(encoding="utf-8"))
        rows, n = table["rows"], table.get("windows")
    except (OSError, ValueError, KeyError, TypeError):
        return []
    generated = isinstance(n, list) and n and all(isinstance(w, dict) and w.get("source") == "synthetic" for w in n)
    n = len(n) if isinstance(n, list) else n
    out = [f"{n} held-out test windows (never trained on); the policy was chosen on validation "
           f"({table.get('best_policy_chosen_on', 'its validation windows')}).", "",
           *(["**These windows are generated** (sectune's synthetic logs: the real ones were not found), so the numbers "
              "describe the pipeline, not an analyst of real logs.", ""] if generated else []),
           "| | verdict macro-F1 | verdict accuracy | field F1 | schema-valid |", "|---|---|---|---|---|"]
    for r in rows:
        mark = " (this model's policy)" if r.get("step") == step else ""
        cells = [f"{r[k]:.3f}" if isinstance(r.get(k), (int, float)) else "—"
                 for k in ("verdict_macro_f1", "verdict_accuracy", "field_f1", "schema_valid_rate")]
        out.append(f"| {shown(str(r.get('name', '?')))}{mark} | " + " | ".join(cells) + " |")
    return out + [""]
