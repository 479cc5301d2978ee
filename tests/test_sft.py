"""End-to-end SFT on the real auth-log folder: learns, saves a reloadable adapter, logs to W&B."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAST, compose, requires_real_data, sectune
from sectune import data


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    run = sectune(
        ["train.max_steps=30", "train.eval_steps=10", "logger=wandb", "generation.preview_samples=2", "train.batch_size=8"],
        run_dir,
        env={"WANDB_MODE": "offline"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@requires_real_data
def test_sft_lowers_eval_loss_well_below_start(sft_run):
    res = sft_run.result
    assert res["status"] == "succeeded" and res["stage"] == "sft"
    m = res["metrics"]
    assert m["train_steps"] == 30
    assert m["eval_loss"] < 0.85 * m["eval_loss_start"], m
    assert 0 < m["train_loss"] < m["eval_loss_start"]
    for key in ("started", "finished", "config_digest"):
        assert res[key]
    # the real logs were used: the run said nothing of generated ones, and its dataset's BUILD_INFO says real (this line
    # was `assert ... or True`, which could not fail: an audit, session 41)
    assert "using generated logs" not in sft_run.stdout + sft_run.stderr
    from sectune import data

    folder = data.auth_logs_folder(compose([]))
    assert json.loads((folder / "BUILD_INFO.json").read_text())["source"] == "real"


@requires_real_data
def test_adapter_reloads_with_plain_peft_and_reproduces_logits(sft_run):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run_dir = sft_run.run_dir
    adapter = run_dir / sft_run.result["artifacts"]["adapter"]
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not list(adapter.glob("*.bin")) and not list(adapter.glob("*.pt"))
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter).eval()
    probe = load_file(str(run_dir / sft_run.result["artifacts"]["probe_logits"]))
    ids = probe["top_ids"].long()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits.gather(-1, ids), probe["top_logits"], rtol=1e-4, atol=1e-4)
    # ...and the adapter is not a no-op: the base model alone gives different logits
    with model.disable_adapter(), torch.no_grad():
        base_logits = model(input_ids=probe["input_ids"]).logits
    assert (base_logits.gather(-1, ids) - probe["top_logits"]).abs().max() > 1e-2


@requires_real_data
def test_sft_writes_plots_history_preview_and_wandb_offline_run(sft_run):
    run_dir, art = sft_run.run_dir, sft_run.result["artifacts"]
    assert (run_dir / art["loss_curve"]).stat().st_size > 5000
    history = json.loads((run_dir / art["train_history"]).read_text())
    assert len(history["train"]) == 30 and len(history["eval"]) >= 3
    preview = json.loads((run_dir / art["preview"]).read_text())
    assert len(preview) == 2 and all("generated" in p for p in preview)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("run-*.wandb")), "the offline run has no event file"
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    # The summary line a user reads at the end
    assert "sectune: done" in sft_run.stdout and "peak RSS" in sft_run.stdout


@requires_real_data
def test_quantized_nf4_and_int8_train_on_cpu(tmp_path):
    totals = {}
    for q, kind in (("nf4", "Linear4bit"), ("int8", "Linear8bitLt")):
        run = sectune([*FAST, f"quantization={q}", "train.max_steps=3", "dataset.max_samples=24"], tmp_path / q)
        assert run.returncode == 0, run.stderr[-2000:]
        m = run.result["metrics"]
        # each of the decoder's linears once (peft's LoRA wrapper of one has the same class name: counted twice before)
        assert m["quantized_modules"] == 7 * int(compose(FAST).model.tiny.num_layers), (q, kind, m["quantized_modules"])
        totals[q] = m["total_params"]
        assert m["eval_loss"] == m["eval_loss"] and m["eval_loss"] < 20  # finite
        assert (tmp_path / q / "adapter" / "adapter_model.safetensors").is_file()
    assert totals["nf4"] == totals["int8"], totals  # the same model's weights, however packed (4-bit: two per byte)


def test_an_eval_forward_leaves_4bit_lora_gradients_as_they_were():
    """An audit (session 25): on a CPU with AVX512-BF16 (this host's EPYC, an AMX Xeon) bitsandbytes repacks a 4-bit
    weight for its inference kernel at the first eval forward without grad (the evaluation before training, a
    generation) and never back: later training forwards ran a kernel without autograd, and no gradient crossed the
    quantized layers (SFT's first grad norm 0.061 against 0.397). Training stages keep the trainable layout."""
    import torch

    from conftest import compose
    from sectune.models import modeling

    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))

    def grads(stage, eval_first):
        cfg = compose(["quantization=nf4", "logger=none", f"stage={stage}"])
        torch.manual_seed(0)
        model = modeling.apply_lora(modeling.load_model(cfg), cfg)
        for n, p in model.named_parameters():
            if "lora_B" in n:  # non-zero, so lora_A's gradient depends on what flows back through the layers above
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return model, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model, before = grads("sft", eval_first=False)
    assert all(not getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())
    _, after = grads("sft", eval_first=True)
    assert before.keys() == after.keys() and len(before) > 0
    for n in before:
        torch.testing.assert_close(after[n], before[n], rtol=1e-4, atol=1e-6)
    from bitsandbytes.nn import Linear4bit

    infer_model, _ = grads("infer", eval_first=False)  # infer only generates: the faster kernel where the CPU has it
    layers = [m for m in infer_model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu == Linear4bit(4, 4).support_avx512bf16_for_cpu for m in layers)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_quantized_lora_adapter_stays_fp32_through_the_trl_trainer(tmp_path, precision):
    """An audit (precision): TRL's SFT, DPO and GRPO trainers cast a 4/8-bit model's trainable LoRA weights to bf16 in their
    constructor (their QLoRA recipe), whatever the precision: train.precision=fp32 trained bf16 adapters with bf16 AdamW
    state, and under bf16 autocast the adapters had no fp32 master copy (reward, classify and federated keep peft's fp32;
    the planner counts fp32). At lr 2e-5 one AdamW step moved 6.7% of lora_A's entries; the rest rounded away. The
    trainable weights leave the constructor as they entered it, bit for bit, and the optimizer state follows them."""
    from sectune.models import modeling
    from sectune.stages.sft import build_sft_trainer

    cfg = compose(["quantization=nf4", "logger=none", f"train.precision={precision}", "train.max_steps=1", "train.batch_size=2"])
    tok = modeling.load_tokenizer(cfg)
    model = modeling.apply_lora(modeling.load_model(cfg), cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and all(t.dtype == torch.float32 for t in before.values())  # peft's fp32 adapter
    rec = {"prompt": "### Logs:\nsshd[1]: Failed password for root\n### Analysis:\n", "completion": '{"verdict":"malicious"}'}
    trainer = build_sft_trainer(cfg, model, tok, [rec, rec], [], tmp_path)
    after = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert after.keys() == before.keys()
    for n, p in after.items():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), before[n]), n
    trainer.train()
    state = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    assert state and all(v.dtype == torch.float32 for v in state)


def test_full_finetune_saves_whole_model(tmp_path):
    run = sectune([*FAST, "lora=none", "train.max_steps=2", "dataset.max_samples=12"], tmp_path / "full")
    assert run.returncode == 0, run.stderr[-2000:]
    art = run.result["artifacts"]
    assert "model" in art and "adapter" not in art
    assert (tmp_path / "full" / "model" / "model.safetensors").is_file()
    assert run.result["metrics"]["trainable_params"] == run.result["metrics"]["total_params"]


def test_warmup_on_generated_windows_runs_first_and_the_sft_starts_from_its_weights(tmp_path):
    """sft.warmup_lines: <run>/warmup/ trains every weight on generated windows, the SFT starts from those weights
    (its step-0 eval loss on the real validation windows is far below a random model's), its LoRA adapter is
    loaded onto them, and a rerun reuses the warm-up."""
    from conftest import compose

    from sectune.models import modeling

    common = [*FAST, "train.max_steps=3", "dataset.max_samples=24", "sft.warmup_lines=1500"]  # lora=r4_attention
    warm = sectune(common, tmp_path / "warm")
    assert warm.returncode == 0, warm.stderr[-2000:]
    w = json.loads((tmp_path / "warm" / "warmup" / "result.json").read_text())
    assert w["status"] == "succeeded" and w["metrics"]["train_steps"] == 3 and w["metrics"]["windows"] > 50
    assert w["metrics"]["trainable_params"] == w["metrics"]["total_params"]  # the warm-up trains every weight
    # its split line says it is the warm-up's (its test cut is never scored), the real split's line follows
    assert "warm-up: " in warm.stdout.split("validation examples of generated windows")[0].splitlines()[-1]
    assert warm.stdout.count("test windows held out (auth_logs)") == 1
    m, art = warm.result["metrics"], warm.result["artifacts"]
    assert (art["warmup"], art["base_model"], art["adapter"]) == ("warmup", "warmup/model", "adapter")
    assert m["warmup_windows"] == w["metrics"]["windows"] and m["warmup_train_steps"] == 3 and m["train_steps"] == 3
    # 3 warm-up steps at the tiny model's rate already teach the answer's format: the real SFT starts far below the
    # random model's loss (the warm-up's own start, ~ln(vocabulary) on generated windows as on real ones)
    assert m["eval_loss_start"] < w["metrics"]["eval_loss_start"] - 1.0, (m, w["metrics"])
    # its adapter belongs on the warm-up weights, not on the random base
    assert modeling.adapter_base(tmp_path / "warm" / "adapter", compose([])) == str(tmp_path / "warm" / "warmup" / "model")

    # the same command again (resuming the SFT): the finished warm-up is reused, not retrained
    again = sectune([*common, "train.resume=auto"], tmp_path / "warm")
    assert again.returncode == 0 and "warm-up: finished for this config; reusing" in again.stdout, again.stderr[-2000:]
    assert json.loads((tmp_path / "warm" / "warmup" / "result.json").read_text())["finished"] == w["finished"]


def test_warmup_refuses_a_dataset_without_a_generator_a_quantized_model_and_bad_values(tmp_path):
    from conftest import compose

    from sectune.errors import ConfigError
    from sectune.runner import RunContext
    from sectune.stages import sft

    for args, msg in ((["dataset=hdfs"], "sft.warmup_lines: only dataset=auth_logs has a log generator"),
                      (["quantization=nf4"], "quantization=nf4 weights cannot train"),
                      (["sft.warmup_epochs=0"], "both must be > 0"),
                      (["sft.warmup_lines=-5"], "both must be > 0")):
        cfg = compose(["sft.warmup_lines=100", *args])
        with pytest.raises(ConfigError, match=msg):
            sft.warmup(RunContext(cfg=cfg, run_dir=tmp_path))
    assert sft.warmup(RunContext(cfg=compose([]), run_dir=tmp_path)) is None  # off by default: nothing built
    assert not (tmp_path / "warmup").exists()


def test_the_warm_ups_own_sft_does_not_call_the_warm_up_epochs_unused(tmp_path, monkeypatch, capsys):
    """The warm-up is the SFT stage run on a copy of the config with sft.warmup_lines=0 and the user's warmup_epochs:
    that run said "sft.warmup_epochs=0.5 does nothing without a warm-up" about the warm-up it was (an audit, session 45).
    Alone, the setting is still said to do nothing."""
    from conftest import compose

    from sectune.runner import RunContext
    from sectune.stages import sft, sft_warmup

    def inner_sft(ctx):  # the real stage's first step, then no training
        assert sft_warmup.warmup(ctx) is None and ctx.run_dir.name == sft_warmup.WARMUP_DIR
        return {"metrics": {}, "artifacts": {}}

    monkeypatch.setattr(sft, "run", inner_sft)
    base = [f"paths.cache_dir={tmp_path / 'cache'}", "sft.warmup_epochs=0.5"]
    assert sft_warmup.warmup(RunContext(cfg=compose([*base, "sft.warmup_lines=300"]), run_dir=tmp_path / "run"))["status"] == "succeeded"
    assert "does nothing without a warm-up" not in capsys.readouterr().err
    assert sft_warmup.warmup(RunContext(cfg=compose(base), run_dir=tmp_path / "alone")) is None
    assert "sft.warmup_epochs=0.5 does nothing without a warm-up" in capsys.readouterr().err


def test_a_warm_up_from_the_same_generated_stream_as_the_held_out_windows_is_refused(tmp_path):
    """Without real logs the dataset's windows are generated with dataset.split_seed; the warm-up's with sft.warmup_seed
    (7). The generator is prefix-stable, so at split_seed=7 the warm-up held every test window word for word, and the
    table called them held out (an audit, session 42)."""
    from conftest import compose

    from sectune.errors import ConfigError
    from sectune.stages import sft_warmup as sft

    empty = tmp_path / "no_logs"
    empty.mkdir()
    base = [f"dataset.source_dir={empty}", f"paths.cache_dir={tmp_path / 'cache'}", "sft.warmup_lines=3000"]
    with pytest.raises(ConfigError, match=r"sft\.warmup_seed=7: the warm-up's generated windows .* hold \d+ of the run's \d+ "
                                          r"validation and test windows word for word .*dataset\.split_seed=7"):
        sft.check_warmup_holds_no_held_out_window(compose([*base, "dataset.split_seed=7"]),
                                                  data.generated_auth_folder(compose([*base, "dataset.split_seed=7"])))
    cfg = compose([*base, "dataset.split_seed=0"])  # another stream: nothing shared
    sft.check_warmup_holds_no_held_out_window(cfg, data.generated_auth_folder(cfg))


def test_key_weight_scales_the_loss_on_the_answers_counts_and_verdict_only(tmp_path):
    """loss.key_weight: TRL's loss, with each answer token's -log p times 5 where it is the first token of a weighted
    key's value (and the quote + first token of a string value), equals the hand-weighted per-token loss; the weighted
    tokens are exactly the counts and the verdict."""
    from conftest import compose

    from sectune.data.auth_logs import analyze_auth_log, render_completion, render_prompt
    from sectune.losses import key_value_weights
    from sectune.models import modeling
    from sectune.stages.sft import answer_key_weights, build_sft_trainer

    lines = ["Dec 10 06:55:46 LabSZ sshd[24200]: Failed password for root from 1.2.3.4 port 22 ssh2"] * 6
    rec = {"prompt": render_prompt("\n".join(lines)), "completion": render_completion(analyze_auth_log(lines))}
    keys = "[failed_logins,failures,verdict]"
    cfg = compose(["+experiment=auth_grpo_tiny", "stage=sft", "lora=none", "train.packing=none", "train.precision=fp32",
                   "loss.key_weight=5", f"loss.weighted_keys={keys}", "logger=none"])
    tok = modeling.load_tokenizer(cfg, modeling.model_path(cfg))
    model = modeling.load_model(cfg)
    trainer = build_sft_trainer(cfg, model, tok, [rec, rec], [], tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    with torch.no_grad():
        weighted = trainer.compute_loss(model, dict(batch)).item()
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none") * (labels != -100)
    w = answer_key_weights(cfg, tok, [rec["completion"]])(batch["input_ids"])[:, 1:]
    n = (labels != -100).sum()
    assert weighted == pytest.approx(((nll * w).sum() / n).item(), rel=1e-4)
    assert weighted > (nll.sum() / n).item()
    marked = [tok.decode([int(t)]) for t in batch["input_ids"][0, 1:][w[0] > 1]]
    assert marked == ["6", "6", '"', "malicious"], marked  # failed_logins 6, the source's failures 6, the verdict
    assert key_value_weights(batch["input_ids"], [], None, 5.0).eq(1).all()

    from sectune.errors import ConfigError

    bad = {"loss.weighted_keys=[source]": "no training answer holds the key 'source'",
           "loss.weighted_keys=[]": "needs a weight > 0 and loss.weighted_keys",
           "loss.label_smoothing=0.1": "the smoothed loss is computed from full logits"}
    for override, msg in bad.items():
        c = compose(["+experiment=auth_grpo_tiny", "stage=sft", "loss.key_weight=5", f"loss.weighted_keys={keys}", override])
        with pytest.raises(ConfigError, match=msg):
            answer_key_weights(c, tok, [rec["completion"]])
    # the default tiny tokenizer has no whole-token keys: `{"` and `,"` merge, so "failed_logins": alone is not in an answer
    plain = compose(["stage=sft", "loss.key_weight=5", "loss.weighted_keys=[failed_logins]"])
    with pytest.raises(ConfigError, match="splits"):
        answer_key_weights(plain, modeling.load_tokenizer(plain, modeling.model_path(plain)), [rec["completion"]])


def test_weights_that_went_nan_fail_the_run_even_without_a_validation_loss(tmp_path):
    """An audit (session 36): Trainer logged a NaN step loss as the running mean, so a run whose weights went NaN and had
    no eval_loss (no validation split here; dpo, classify, simplified_ppo) reported a finite train_loss and succeeded."""
    run = sectune([*FAST, "train.max_steps=3", "train.learning_rate=1e30", "dataset.val_fraction=0", "dataset.max_samples=20"],
                  tmp_path / "r")
    assert run.returncode == 2 and run.result["status"] == "failed", run.stderr[-2000:]
    assert "the trained weights are broken" in run.result["error"]
    history = (tmp_path / "r" / "train_history.json").read_text()
    assert "NaN" not in history and json.loads(history)  # strict JSON: a NaN step as null


def test_sampling_from_nan_scores_is_a_named_error_not_a_traceback():
    from sectune.errors import SectuneError
    from sectune.training.grpo_trainer import sample_next

    assert sample_next(torch.tensor([[0.0, 5.0, 0.0]]), temperature=0.01).tolist() == [1]
    with pytest.raises(SectuneError, match="next-token scores are NaN or inf"):
        sample_next(torch.tensor([[float("nan"), 1.0, 0.0]]))
