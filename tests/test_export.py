"""stage=export: a run's adapter merged into its base as one plain model folder (safetensors, tokenizer, the run's
decoding settings, its prompt and answer schema) that transformers loads without PEFT, checked before it is kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose
from sectune import runner
from sectune.data import auth_logs
from sectune.models import modeling

EXPORT = ["stage=export", "logger=none"]
LOGS = "Mar  4 01:02:03 gw sshd[77]: Failed password for invalid user oracle from 192.0.2.44 port 4001 ssh2"


def sft_step(root: Path, extra: tuple = (), seed: int = 0) -> Path:
    """A succeeded sft run dir whose adapter moves the model (PEFT starts lora_B at 0: merging that changes nothing)."""
    cfg = compose(["stage=sft", "logger=none", *extra])
    path = modeling.model_path(cfg)
    torch.manual_seed(seed)
    model = modeling.apply_lora(modeling.load_model(cfg, path=path), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    modeling.save_pretrained_atomic(model, modeling.load_tokenizer(cfg, path), root / "adapter")
    (root / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, root / ".hydra" / "config.yaml")
    (root / "result.json").write_text(json.dumps({"stage": "sft", "status": "succeeded", "metrics": {},
                                                  "artifacts": {"adapter": "adapter"}}))
    return root


def export(step: Path, run_dir: Path, extra: tuple = ()) -> tuple[int, dict]:
    code, _ = runner.run(compose([*EXPORT, f"export.model_dir={step}", *extra]), run_dir)
    return code, json.loads((run_dir / "result.json").read_text())


def logits(model, text: str) -> torch.Tensor:
    tok = modeling.load_tokenizer(compose(EXPORT))
    with torch.no_grad():
        return model(**tok(auth_logs.render_prompt(text), return_tensors="pt")).logits.float()


def adapter_logits(step: Path, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the adapter on its base, the base alone) on the analyst prompt of ``text``."""
    from peft import PeftModel

    cfg = compose(EXPORT)
    model = PeftModel.from_pretrained(modeling.load_model(cfg, path=modeling.model_path(cfg)), str(step / "adapter")).eval()
    with_adapter = logits(model, text)
    with model.disable_adapter():
        return with_adapter, logits(model, text)


def plain(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, int, dict]:
    root = tmp_path_factory.mktemp("export")
    step = sft_step(root / "sft", ("generation.repetition_penalty=1.05",))
    return (step, root / "out", *export(step, root / "out"))


def test_the_exported_folder_answers_as_the_adapter_does_without_peft(exported):
    step, out, code, result = exported
    assert code == 0 and result["status"] == "succeeded", result.get("error")
    folder = out / result["artifacts"]["model"]
    assert not (folder / "adapter_config.json").exists() and (folder / "model.safetensors").is_file()
    with_adapter, base = adapter_logits(step, LOGS)  # a prompt other than the check's
    got = logits(plain(folder), LOGS)
    assert (with_adapter - base).abs().max() > 1e-2  # the adapter matters here, so the merge is what is checked
    assert torch.allclose(got, with_adapter, atol=1e-4, rtol=0)
    assert result["metrics"]["max_logit_diff"] < 1e-4 and result["metrics"]["top1_agreement"] == 1.0


def test_the_export_carries_the_runs_decoding_prompt_and_schema(exported):
    _, out, _, result = exported
    folder = out / "model"
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["repetition_penalty"] == 1.05 and gen["do_sample"] is False and gen["max_new_tokens"] == 160
    desc = json.loads((out / result["artifacts"]["export"]).read_text())
    assert desc["prompt"]["before_logs"] + LOGS + desc["prompt"]["after_logs"] == auth_logs.render_prompt(LOGS)
    assert desc["answer_schema"] == auth_logs._validator().schema
    assert desc["source"]["step"] == "sft" and desc["source"]["path"] == str(exported[0] / "adapter")
    assert desc["checks"]["max_logit_diff"] == result["metrics"]["max_logit_diff"]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "None recorded with this run" in card
    assert desc["prompt"]["before_logs"] + "<log lines>" + desc["prompt"]["after_logs"] in card


def test_an_adapter_on_a_tied_lm_head_is_merged_into_the_head_alone(tmp_path):
    # the tiny model ties lm_head to the input embeddings: merged into the shared weight, the adapter moved the
    # embeddings too (logits 3.2 apart: refused by the check); untied first, the export answers as the adapter does
    step = sft_step(tmp_path / "sft", ("lora.target_modules=[q_proj,v_proj,lm_head]",))
    code, result = export(step, tmp_path / "out")
    assert code == 0, result.get("error")
    assert result["metrics"]["untied_weights"] == 1
    assert json.loads((tmp_path / "out" / "model" / "config.json").read_text())["tie_word_embeddings"] is False
    with_adapter, _ = adapter_logits(step, LOGS)
    assert torch.allclose(logits(plain(tmp_path / "out" / "model"), LOGS), with_adapter, atol=1e-4, rtol=0)


def test_a_pipelines_dpo_adapter_is_exported_on_the_sft_weights_it_was_trained_on(tmp_path):
    # make run's shape: SFT trains full weights (lora=none), DPO an adapter on them (its artifacts.base_model); the
    # pipeline's newest usable policy is exported, merged into those weights, not into the configured base model
    from peft import PeftModel

    cfg = compose(["stage=dpo", "logger=none"])
    path = modeling.model_path(cfg)
    torch.manual_seed(1)
    sft = modeling.load_model(cfg, path=path)
    with torch.no_grad():
        for p in sft.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    pipe = tmp_path / "pipe"
    modeling.save_pretrained_atomic(sft, modeling.load_tokenizer(cfg, path), pipe / "sft" / "model")
    dpo = modeling.apply_lora(sft, cfg)
    with torch.no_grad():
        for name, p in dpo.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    modeling.save_pretrained_atomic(dpo, modeling.load_tokenizer(cfg, path), pipe / "dpo" / "adapter")
    for step, artifacts in (("sft", {"model": "model"}), ("dpo", {"adapter": "adapter", "base_model": "../sft/model"})):
        (pipe / step / "result.json").write_text(json.dumps({"stage": step, "status": "succeeded", "artifacts": artifacts}))
    (pipe / "result.json").write_text(json.dumps({"stage": "pipeline", "status": "succeeded", "artifacts": {}}))
    rows = [{"name": "SFT+DPO", "step": "dpo", "verdict_macro_f1": 0.9, "verdict_accuracy": 0.88, "field_f1": 0.67,
             "schema_valid_rate": 0.95}, {"name": "TF-IDF + LR (verdict only)", "step": None, "verdict_macro_f1": 0.882}]
    (pipe / "heldout.json").write_text(json.dumps({"rows": rows, "windows": 43, "best_policy": "SFT+DPO"}))
    code, result = export(pipe, tmp_path / "out")
    assert code == 0, result.get("error")
    card = (tmp_path / "out" / "model" / "README.md").read_text()  # the model card: the pipeline's table, as recorded
    assert "| SFT+DPO (this model's policy) | 0.900 | 0.880 | 0.670 | 0.950 |" in card
    assert "| TF-IDF + LR (verdict only) | 0.882 | — | — | — |" in card and "43 held-out test windows" in card
    assert "These windows are generated" not in card
    windows = [{"id": f"w{i}", "source": "synthetic", "verdict": "benign"} for i in range(3)]  # a clone without ../shared
    (pipe / "heldout.json").write_text(json.dumps({"rows": rows, "windows": windows}))
    assert export(pipe, tmp_path / "out2")[0] == 0
    assert "3 held-out test windows" in (card := (tmp_path / "out2" / "model" / "README.md").read_text())
    assert "**These windows are generated**" in card
    desc = json.loads((tmp_path / "out" / "model" / "sectune_export.json").read_text())
    assert desc["source"]["step"] == "dpo" and Path(desc["source"]["base"]).resolve() == (pipe / "sft" / "model").resolve()
    on_sft = PeftModel.from_pretrained(modeling.load_model(cfg, path=str(pipe / "sft" / "model")), str(pipe / "dpo" / "adapter"))
    want = logits(on_sft.eval(), LOGS)
    assert torch.allclose(logits(plain(tmp_path / "out" / "model"), LOGS), want, atol=1e-4, rtol=0)
    assert (want - adapter_logits(step=pipe / "dpo", text=LOGS)[0]).abs().max() > 1e-2  # on the base model it would differ


def lossy_save(monkeypatch) -> None:
    """modeling.save_pretrained_atomic made to lose a weight (zeroed) after it saves."""
    from safetensors.torch import load_file, save_file

    real = modeling.save_pretrained_atomic

    def lossy(model, tokenizer, out):
        real(model, tokenizer, out)
        weights = load_file(out / "model.safetensors")
        name = next(k for k in weights if "o_proj" in k)
        weights[name] = torch.zeros_like(weights[name])
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})

    monkeypatch.setattr(modeling, "save_pretrained_atomic", lossy)


def test_a_folder_that_does_not_load_back_as_merged_is_not_kept(tmp_path, monkeypatch):
    # a save that loses part of the model (a head tied on reload, a weight left out) is what the second check is for
    step = sft_step(tmp_path / "sft")
    lossy_save(monkeypatch)
    code, result = export(step, tmp_path / "out")
    assert code != 0 and result["status"] == "failed"
    assert "the saved folder, loaded back, and the merged model" in result["error"] and "not exported" in result["error"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if "model" in p.name) == []


def test_a_re_export_that_fails_its_check_keeps_the_earlier_export(exported, tmp_path, monkeypatch):
    # the failed attempt's folder had replaced the earlier, checked model/ and was then deleted: the export was gone
    import shutil

    step, out, _, _ = exported
    run_dir = tmp_path / "out"
    shutil.copytree(out, run_dir)
    before = {p.name: p.read_bytes() for p in (run_dir / "model").iterdir()}
    lossy_save(monkeypatch)
    code, _ = runner.run(compose([*EXPORT, f"export.model_dir={step}"]), run_dir)
    assert code != 0
    assert {p.name: p.read_bytes() for p in (run_dir / "model").iterdir()} == before
    assert json.loads((run_dir / "result.json").read_text())["status"] == "succeeded"  # the earlier record, put back
    assert "not exported" in json.loads((run_dir / "result.failed.json").read_text())["error"]


def test_an_nf4_run_is_merged_unquantized_and_its_distance_from_the_trained_model_is_said(tmp_path, capsys):
    step = sft_step(tmp_path / "sft")
    saved = OmegaConf.load(step / ".hydra" / "config.yaml")
    saved.quantization = compose(["quantization=nf4"]).quantization  # the run trained on a 4-bit base
    OmegaConf.save(saved, step / ".hydra" / "config.yaml")
    code, result = export(step, tmp_path / "out")
    assert code == 0, result.get("error")
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert "quantization_config" not in config  # full-precision weights, not the 4-bit ones the adapter trained on
    m = result["metrics"]
    assert m["max_logit_diff"] < 1e-4 and 0 <= m["top1_agreement_vs_trained"] <= 1 and m["max_logit_diff_vs_trained"] > 0
    assert "trained on a quantization=nf4 base" in capsys.readouterr().out
    desc = json.loads((tmp_path / "out" / "model" / "sectune_export.json").read_text())
    assert desc["source"]["trained_quantization"] == "nf4"


@pytest.mark.parametrize("extra, key", [((), "export.model_dir"), (("export.model_dir=/x", "export.dtype=int8"), "export.dtype"),
                                        (("export.model_dir=/x", "export.max_logit_diff=-1"), "export.max_logit_diff")])
def test_bad_export_settings_are_refused_naming_the_key(tmp_path, extra, key):
    code, _ = runner.run(compose([*EXPORT, *extra]), tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    assert code != 0 and result["error"].startswith(key)


def test_infer_on_an_export_run_names_the_run_it_came_from(exported, tmp_path):
    step, out, _, _ = exported
    code, _ = runner.run(compose(["stage=infer", "logger=none", f"infer.model_dir={out}", f"infer.input_file={step / 'result.json'}"]),
                         tmp_path)
    error = json.loads((tmp_path / "result.json").read_text())["error"]
    assert code != 0 and error.startswith(f"infer.model_dir={out}: a stage=export run") and f"infer.model_dir={step}," in error


def test_the_exported_chat_template_renders_the_log_lines_as_the_trained_prompt(exported):
    from transformers import AutoTokenizer

    from sectune.inference import text_ids

    _, out, _, _ = exported
    tok = AutoTokenizer.from_pretrained(out / "model")
    rendered = tok.apply_chat_template([{"role": "user", "content": "\n" + LOGS + "\n\n"}], tokenize=False, add_generation_prompt=True)
    # a server tokenizes the rendered chat without adding special tokens: the ids must be the ones infer feeds the analyst
    assert tok(rendered, add_special_tokens=False)["input_ids"] == text_ids(tok, auth_logs.render_prompt(LOGS))
    with pytest.raises(Exception, match="one user message"):
        tok.apply_chat_template([{"role": "user", "content": LOGS}, {"role": "assistant", "content": "{}"}], tokenize=False)


def test_the_chat_template_writes_the_bos_a_tokenizer_adds_to_plain_text():
    # Llama's tokenizers add a BOS to plain text, and servers add none to a rendered chat: the template must write it
    from tokenizers.processors import TemplateProcessing

    from sectune.inference import text_ids
    from sectune.stages.export import analyst_chat_template

    tok = modeling.load_tokenizer(compose(EXPORT))
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert text_ids(tok, "x")[0] == tok.bos_token_id
    tok.chat_template = analyst_chat_template(tok)
    rendered = tok.apply_chat_template([{"role": "user", "content": LOGS}], tokenize=False)
    assert tok(rendered, add_special_tokens=False)["input_ids"] == text_ids(tok, auth_logs.render_prompt(LOGS))


def test_a_run_with_no_usable_model_is_refused_without_naming_infers_fallback(tmp_path):
    # export never falls back to the base model: "and infer.base_fallback=false" sent the user to a setting of another stage
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "result.json").write_text(json.dumps({"stage": "sft", "status": "failed", "artifacts": {}}))
    code, result = export(tmp_path / "sft", tmp_path / "out")
    assert code != 0 and result["error"].startswith(f"export.model_dir={tmp_path / 'sft'}: no usable model (sft: the run did not succeed")
    assert "base_fallback" not in result["error"]


def test_a_log_key_model_is_not_exported_as_an_analyst(tmp_path):
    # an HDFS SFT run (next log key, no JSON analyses) was exported with the analyst's chat template and answer schema
    step = sft_step(tmp_path / "sft", ("dataset=hdfs",))
    code, result = export(step, tmp_path / "out")
    assert code != 0 and result["error"].startswith(f"export.model_dir={step}: ") and "trained on dataset=hdfs" in result["error"]
    assert not (tmp_path / "out" / "model").exists()


def test_an_export_in_another_dtype_says_how_far_it_is_from_the_model_the_run_evaluated(tmp_path, capsys):
    # checked only against the adapter on bf16 weights, a bf16 export of an fp32 run said "within 0.13 of the adapter's"
    # where its next-token choices differed from the run's own model on 6% of the check prompt
    step = sft_step(tmp_path / "sft")
    code, result = export(step, tmp_path / "out", ("export.dtype=bf16",))
    assert code == 0, result.get("error")
    m = result["metrics"]
    assert m["max_logit_diff_vs_trained"] > 0 and 0 <= m["top1_agreement_vs_trained"] <= 1
    assert "the sft run trained in fp32; exported in bf16" in capsys.readouterr().out
    assert "max_logit_diff_vs_trained" not in export(step, tmp_path / "fp32")[1]["metrics"]  # the run's own dtype: nothing to say


def test_a_bf16_export_of_an_fp32_run_is_checked_against_the_fp32_adapter(tmp_path):
    # two bf16-rounded models (the adapter on bf16 weights, and the merge) stray from each other by up to twice the
    # rounding either has: this sound export was refused at 0.159 against 0.146 allowed (helper F's five adapters)
    step = sft_step(tmp_path / "sft", ("lora=r16_all_linear",), seed=5)
    code, result = export(step, tmp_path / "out", ("export.dtype=bf16",))
    assert code == 0, result.get("error")
    m = result["metrics"]
    assert m["merge_max_logit_diff"] <= m["max_logit_diff_vs_trained"] + 1e-6  # its reference is the run's fp32 model
    # merged in fp32 and then cast: the merge is checked at fp32's precision (checked in bf16 it held bf16's rounding of
    # the whole model: a 2-step tiny SFT run's bf16 export was refused at 0.171 > 0.143), and the folder gives back the
    # cast weights exactly (a .to() that rounded rotary buffers too would not)
    assert m["merged_in"] == "fp32" and m["merge_max_logit_diff"] < 1e-3 and m["saved_max_logit_diff"] == 0
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "merged in fp32, then cast to bf16" in card


def test_the_model_card_says_sampled_decoding_where_the_run_samples(tmp_path):
    # the card said "Greedy decoding as the run decoded" whatever generation.do_sample was
    step = sft_step(tmp_path / "sft", ("generation.do_sample=true",))
    code, result = export(step, tmp_path / "out", ("generation.do_sample=true",))
    assert code == 0, result.get("error")
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "Sampled decoding as the run decoded" in card and "Greedy" not in card
    assert json.loads((tmp_path / "out" / "model" / "generation_config.json").read_text())["do_sample"] is True


def test_an_export_is_by_default_in_the_dtype_the_run_trained_in(tmp_path):
    # the export command's own model.dtype (the tiny preset's fp32) turned a bf16 run into an fp32 folder, then called it
    # another dtype than the run's
    step = sft_step(tmp_path / "sft", ("model.dtype=bf16",))
    code, result = export(step, tmp_path / "out")
    assert code == 0, result.get("error")
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert "max_logit_diff_vs_trained" not in result["metrics"]


def test_a_full_weight_run_is_exported_and_said_to_be_checked_against_itself(tmp_path, capsys):
    # no adapter to merge: the console said "within 0 of the adapter's" and the card spoke of a merge
    cfg = compose(["stage=sft", "logger=none", "lora=none"])
    path = modeling.model_path(cfg)
    run = tmp_path / "sft"
    modeling.save_pretrained_atomic(modeling.load_model(cfg, path=path), modeling.load_tokenizer(cfg, path), run / "model")
    (run / "result.json").write_text(json.dumps({"stage": "sft", "status": "succeeded", "artifacts": {"model": "model"}}))
    code, result = export(run, tmp_path / "out")
    assert code == 0, result.get("error")
    assert "of the run's model;" in capsys.readouterr().out
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "A full-weight run (no adapter to merge)" in card and "merged model" not in card
