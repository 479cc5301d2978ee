"""Schema-constrained vs unconstrained generation of auth-log analyses (``stage=infer``'s decoding).

Both sides generate analyses of the same real held-out auth-log windows (the validation split of
``sectune.data.auth_logs_folder``, the prompts ``stage=infer`` builds), with the same model, batch
size, ``max_new_tokens`` and greedy decoding (repetition penalty 1.2, the ``generation`` node's);
the constrained side adds :class:`sectune.models.constrained.SchemaConstraint` (xgrammar + sectune's
budget and uniqueItems logic). The model is the ~21M-parameter Llama of ``bench/sft_throughput.py``
(random init: it never closes a JSON object on its own, so every constrained output is closed by
the token budget, the worst case) or the tiny default model (``--model tiny``).

``constrained_generation_slowdown`` is per decoding step (one batched forward + logits processors
+ the pick; the prompts' prefill left out): the constrained run's step over the same step minus the
time its schema processor took, both timed inside that run, so a shared machine's changing load
does not enter it. ``constrained_ab_step_ratio`` asks the same of two separate runs (end to end,
the prefill timed apart with ``max_new_tokens=1``); on an idle machine the two agree, on a loaded
one the A/B ratio mostly measures the load. Wall time is reported too (the sides stop at different
lengths, so it is not the overhead). Sides are interleaved over ``--repeats``; medians are reported.

    .venv/bin/python bench/constrained_generation.py              # 32 analyses, 21M Llama (~2-4 min on 2 cores)
    .venv/bin/python bench/constrained_generation.py --compare    # + xgrammar / outlines / lm-format-enforcer
    .venv/bin/python bench/constrained_generation.py --n 0 --grounded-compile   # grounded grammars' compile time

``measure()`` is what ``bench/reward_throughput.py`` imports. ``--compare`` measures whichever of
the three libraries import (install the others beside the venv, e.g.
``pip install --no-deps --target /tmp/libs/outlines outlines outlines_core diskcache genson`` and
``PYTHONPATH=/tmp/libs/outlines``): schema compile time, per-step overhead through each one's
transformers logits processor, and which schema keywords its grammar enforces. The last line of
output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from sectune.run_records import cpu_model  # noqa: E402


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from sectune import config
    from sectune.paths import PROJECT_ROOT

    config.register()
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["stage=infer", "logger=none", *overrides])


def held_out_prompts(cfg, n: int) -> list[str]:
    """``n`` prompts of held-out (validation split) windows, repeated if there are fewer."""
    from sectune import data
    from sectune.data import auth_logs
    from sectune.stages.infer import build_prompt

    val = data.sft_splits(cfg)["validation"]  # the validation windows every stage holds out
    samples = {s.id: s for s in auth_logs.load_auth_folder(data.auth_logs_folder(cfg))}
    prompts = [build_prompt(samples[r["id"]].log_text) for r in val]
    return [prompts[i % len(prompts)] for i in range(n)]


def build_model(kind: str, cfg, tokenizer):
    from sectune.models import modeling

    if kind == "tiny":
        model = modeling.load_model(cfg)
    else:
        from sft_throughput import build_model as build_21m

        model = build_21m(tokenizer)
    return modeling.to_run_device(model, cfg).eval()


class StepCounter:
    """Counts and times forward calls: one per decoding step (each batch's first is its prefill)."""

    def __init__(self, model):
        self.durations: list[float] = []
        self._t0 = 0.0
        model.register_forward_pre_hook(lambda *_: setattr(self, "_t0", time.perf_counter()))
        model.register_forward_hook(lambda *_: self.durations.append(time.perf_counter() - self._t0))

    @property
    def calls(self) -> int:
        return len(self.durations)


class TimedConstraint:
    """A SchemaConstraint whose processors add the time they take to ``seconds``."""

    def __init__(self, constraint):
        self.constraint, self.seconds = constraint, 0.0

    def processor(self, max_new_tokens: int, contexts=None):
        from transformers import LogitsProcessor

        inner, outer = self.constraint.processor(max_new_tokens, contexts), self

        class Timed(LogitsProcessor):
            def __getattr__(self, name):  # what generate reads of the processor (forced, forced_rows, ...): the inner one's
                return getattr(inner, name)

            def __call__(self, input_ids, scores):
                t0 = time.perf_counter()
                out = inner(input_ids, scores)
                outer.seconds += time.perf_counter() - t0
                return out

        return Timed()

    def decode(self, ids) -> str:
        return self.constraint.decode(ids)


def _score(texts, validator) -> tuple[float, float]:
    from sectune.inference import parse_json_output

    ok_json = ok_schema = 0
    for text in texts:
        try:
            obj, _ = parse_json_output(text)
        except ValueError:
            continue
        ok_json += 1
        ok_schema += not any(True for _ in validator.iter_errors(obj))
    return ok_json / len(texts), ok_schema / len(texts)


def measure(n: int = 32, model: str = "bench21m", max_new_tokens: int = 160, batch_size: int = 8, repeats: int = 1,
            threads: int | None = None) -> dict:
    """Generate ``n`` analyses of held-out windows unconstrained and schema-constrained; time both."""
    from importlib.metadata import version

    import torch

    from sectune.data import auth_logs
    from sectune.inference import generate
    from sectune.models import modeling
    from sectune.models.constrained import SchemaConstraint

    if threads:
        torch.set_num_threads(threads)
    cfg = _compose([f"generation.max_new_tokens={max_new_tokens}", "generation.do_sample=false"])
    tokenizer = modeling.load_tokenizer(cfg)
    net = build_model(model, cfg, tokenizer)
    counter = StepCounter(net)
    prompts = held_out_prompts(cfg, n)
    validator = auth_logs._validator(None)
    t0 = time.perf_counter()
    constraint = TimedConstraint(SchemaConstraint(tokenizer, validator.schema, vocab_size=max(len(tokenizer), net.config.vocab_size)))
    compile_s = time.perf_counter() - t0
    batches = -(-n // batch_size)

    def run(side: str, gen_cfg) -> dict:
        counter.durations.clear()
        constraint.seconds = 0.0
        stats: dict = {}
        t0 = time.perf_counter()
        out = generate(net, tokenizer, prompts, gen_cfg, batch_size=batch_size,
                       constraint=constraint if side == "constrained" else None, stats=stats)
        seconds = time.perf_counter() - t0
        forward = sum(counter.durations)
        # this run's own decoding step without the processor: forward + the rest of generate's loop
        prefill = sum(sorted(counter.durations, reverse=True)[:batches])  # each batch's prompt forward: its longest
        rest = seconds - forward - constraint.seconds
        in_run = (forward - prefill + rest + constraint.seconds) / max(1e-9, forward - prefill + rest)
        return {"s": seconds, "steps": counter.calls, "forced": stats.get("forced", 0), "texts": out,
                "processor_s": constraint.seconds, "in_run_slowdown": in_run}

    for side in ("unconstrained", "constrained"):  # warm-up: full-size batches, a few tokens
        generate(net, tokenizer, prompts[:batch_size], _with_max_new_tokens(cfg.generation, constraint.constraint.min_tokens),
                 batch_size=batch_size, constraint=constraint if side == "constrained" else None)
    runs: dict[str, list[dict]] = {"unconstrained": [], "constrained": []}
    for _ in range(repeats):
        # the prompts' forward, the same for both sides (the constrained side's matcher set-up and
        # first mask then count as decoding: a conservative split)
        prefill = run("unconstrained", _with_max_new_tokens(cfg.generation, 1))["s"]
        for side in runs:
            full = run(side, cfg.generation)
            full["decode_s"] = full["s"] - prefill
            runs[side].append(full)
    keys = ("s", "decode_s", "steps", "forced", "processor_s", "in_run_slowdown")
    med = {side: {k: statistics.median(r[k] for r in rs) for k in keys} for side, rs in runs.items()}
    texts = {side: rs[-1]["texts"] for side, rs in runs.items()}
    # decoding steps: every forward but each batch's first (the prompt)
    per_step = {side: med[side]["decode_s"] / max(1, med[side]["steps"] - batches) for side in med}
    json_u, schema_u = _score(texts["unconstrained"], validator)
    json_c, schema_c = _score(texts["constrained"], validator)
    return {
        "library": f"xgrammar {version('xgrammar')}",
        "model": model,
        "params": sum(p.numel() for p in net.parameters()),
        "n": n,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "device": str(next(net.parameters()).device),
        "threads": torch.get_num_threads(),
        "compile_s": round(compile_s, 3),
        "unconstrained_s": round(med["unconstrained"]["s"], 3),
        "constrained_s": round(med["constrained"]["s"], 3),
        "unconstrained_steps": med["unconstrained"]["steps"],
        "constrained_steps": med["constrained"]["steps"],
        "unconstrained_decode_s": round(med["unconstrained"]["decode_s"], 3),
        "constrained_decode_s": round(med["constrained"]["decode_s"], 3),
        "unconstrained_ms_per_step": round(1000 * per_step["unconstrained"], 2),
        "constrained_ms_per_step": round(1000 * per_step["constrained"], 2),
        "constrained_processor_ms_per_step": round(1000 * med["constrained"]["processor_s"] / max(1, med["constrained"]["steps"] - batches), 3),
        # the decoding step with the schema processor over the same step without it, both timed
        # inside the constrained run: what the constraint adds, immune to the load of a shared box
        "constrained_generation_slowdown": round(med["constrained"]["in_run_slowdown"], 4),
        # the same question answered by two separate runs (per decoding step, prefill left out):
        # end to end, but on a shared machine it mostly measures the load changing between runs
        "constrained_ab_step_ratio": round(per_step["constrained"] / per_step["unconstrained"], 3),
        "constrained_wall_ratio": round(med["constrained"]["s"] / med["unconstrained"]["s"], 3),
        "json_valid_rate_unconstrained": json_u,
        "json_valid_rate_constrained": json_c,
        "schema_valid_rate_unconstrained": schema_u,
        "schema_valid_rate_constrained": schema_c,
        "forced_close_rate": med["constrained"]["forced"] / n,
    }


def _with_max_new_tokens(gen_cfg, max_new_tokens: int):
    from omegaconf import OmegaConf

    out = OmegaConf.to_container(gen_cfg)
    out["max_new_tokens"] = max_new_tokens
    return OmegaConf.create(out)


# ----------------------------------------------------------------------------- library comparison
def _probes() -> dict[str, tuple[str, bool]]:
    """Compact documents against auth_schema.json: (text, whether the schema accepts it)."""
    base = {"verdict": "suspicious", "failed_logins": 3, "accepted_logins": 0, "invalid_users": ["admin", "test"],
            "targeted_users": ["root"], "source_ips": [{"ip": "1.2.3.4", "failures": 3}], "brute_force": False,
            "break_in_attempts": 0, "summary": "3 failed logins from 1.2.3.4"}

    def doc(**kw):
        return json.dumps({**base, **kw}, separators=(",", ":"))

    return {
        "valid document": (doc(), True),
        "enum": (doc(verdict="bogus"), False),
        "integer minimum": (doc(failed_logins=-1), False),
        "maxItems": (doc(invalid_users=list("abcdef")), False),
        "uniqueItems": (doc(invalid_users=["a", "a"]), False),
        "maxLength": (doc(invalid_users=["x" * 33]), False),
        "minLength": (doc(summary=""), False),
        "additionalProperties false": (json.dumps({**base, "extra": 1}, separators=(",", ":")), False),
        "required": ('{"verdict":"benign"}', False),
    }


def compare_libraries(tokenizer_paths: dict[str, str], steps: int = 200, batch: int = 4) -> dict:
    """For each importable library: compile time per tokenizer, time in its logits processor per
    decoding step (greedy, a random tiny Llama with that tokenizer's vocabulary), enforced keywords."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

    schema = json.loads((ROOT / "sectune/data/auth_schema.json").read_text())
    libs = {"xgrammar": "xgrammar", "sectune (xgrammar + budget + uniqueItems)": "xgrammar",
            "outlines": "outlines_core", "lm-format-enforcer": "lmformatenforcer"}
    report: dict = {}
    for tok_name, tok_path in tokenizer_paths.items():
        tok = AutoTokenizer.from_pretrained(tok_path)
        tok.pad_token = tok.pad_token or tok.eos_token
        tok.padding_side = "left"
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             intermediate_size=256, vocab_size=len(tok), initializer_range=0.1,
                                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).eval()
        enc = tok([f"Analyze these authentication log lines {i}\n### Analysis:\n" for i in range(batch)], return_tensors="pt", padding=True)
        gen = dict(max_new_tokens=steps, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

        def processor_ms_per_step(make_processor) -> float:
            """Time inside the processor per decoding step (the best of two runs): the overhead
            itself, measured where it is spent, so a shared machine's load swings do not enter."""
            best = float("inf")
            for _ in range(2):
                inner, spent = make_processor(), [0.0]

                class Timed(LogitsProcessor):
                    def __call__(self, input_ids, scores):
                        t0 = time.perf_counter()
                        out = inner(input_ids, scores)
                        spent[0] += time.perf_counter() - t0
                        return out

                with torch.no_grad():
                    out = model.generate(**enc, logits_processor=LogitsProcessorList([Timed()]), **gen)
                best = min(best, 1000 * spent[0] / (out.shape[1] - enc["input_ids"].shape[1]))
            return best

        for lib, module in libs.items():
            if importlib.util.find_spec(module) is None:
                report.setdefault(lib, {"installed": False})
                continue
            entry = report.setdefault(lib, {"installed": True})
            try:
                t0 = time.perf_counter()
                make_processor, accepts = _library(lib, tok, model, schema)
                entry[f"compile_s_{tok_name}"] = round(time.perf_counter() - t0, 3)
                entry[f"processor_ms_per_step_{tok_name}_batch{batch}"] = round(processor_ms_per_step(make_processor), 2)
                if "enforces" not in entry and accepts is not None:
                    entry["enforces"] = {k: accepts(text) == ok for k, (text, ok) in _probes().items()}
            except Exception as e:  # report, do not stop the comparison
                entry[f"error_{tok_name}"] = f"{type(e).__name__}: {e}"[:300]
    return report


def _library(lib: str, tok, model, schema: dict):
    """(a fresh transformers logits processor per call, text -> whether the grammar accepts it)."""
    import re

    text_schema = json.dumps(schema)
    if lib.startswith("sectune"):  # its grammar is xgrammar's; uniqueItems and the budget: tests/test_infer.py
        from sectune.models.constrained import SchemaConstraint

        constraint = SchemaConstraint(tok, schema)
        return (lambda: constraint.processor(200)), None
    if lib == "xgrammar":
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok), stop_token_ids=[tok.eos_token_id])
        grammar = xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(text_schema, any_whitespace=False, separators=(",", ":"))

        def accepts(text):
            m = xgr.GrammarMatcher(grammar)
            return m.accept_string(text) and m.is_completed()

        return (lambda: xgr.contrib.hf.LogitsProcessor(grammar)), accepts
    if lib == "outlines":
        import outlines
        from outlines.backends.outlines_core import OutlinesCoreBackend, OutlinesCoreLogitsProcessor
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        regex = build_regex_from_schema(text_schema, r"")
        index = Index(regex, OutlinesCoreBackend(outlines.from_transformers(model, tok)).vocabulary)
        return (lambda: OutlinesCoreLogitsProcessor(index, "torch")), (lambda text: re.fullmatch(regex, text) is not None)
    if lib == "lm-format-enforcer":
        import types

        import transformers

        if "transformers.tokenization_utils" not in sys.modules or not hasattr(sys.modules["transformers.tokenization_utils"], "PreTrainedTokenizerBase"):
            # lm-format-enforcer 0.11.3's transformers integration imports a path transformers 5 removed
            shim = types.ModuleType("transformers.tokenization_utils")
            shim.PreTrainedTokenizerBase = transformers.PreTrainedTokenizerBase
            sys.modules["transformers.tokenization_utils"] = shim
        from lmformatenforcer import JsonSchemaParser
        from lmformatenforcer.integrations.transformers import build_transformers_prefix_allowed_tokens_fn
        from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

        def accepts(text):
            parser = JsonSchemaParser(schema)
            for ch in text:
                if ch not in parser.get_allowed_characters():
                    return False
                parser = parser.add_character(ch)
            return parser.can_end()

        def make():
            return PrefixConstrainedLogitsProcessor(build_transformers_prefix_allowed_tokens_fn(tok, JsonSchemaParser(schema)), 1)

        make()  # builds the tokenizer data: part of its compile time
        return make, accepts
    raise ValueError(lib)


def grounded_compile(vocab_sizes=(2048, 32000, 128256), repeats: int = 5) -> dict:
    """Milliseconds to compile the auth schema, and one window's grounded schema (3 addresses, 2 users:
    ``infer.grounded_fields``), with xgrammar over synthetic vocabularies of these sizes (the grammar's cost grows with the
    vocabulary; a 128k one is Llama 3's). Medians over ``repeats`` distinct windows, the compiler's cache off."""
    import random
    import string

    import xgrammar as xgr

    from sectune.models.constrained import ground_schema

    schema = json.loads((ROOT / "sectune/data/auth_schema.json").read_text())
    rng, out = random.Random(0), {}
    for size in vocab_sizes:
        vocab = [bytes([i]).decode("latin-1") for i in range(256)]
        alphabet = string.ascii_letters + string.digits + '.:_-"{},[] '
        vocab += ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8))) for _ in range(size - len(vocab))]
        compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=size, stop_token_ids=[0]),
                                       cache_enabled=False)

        def ms(s: dict) -> float:
            t0 = time.perf_counter()
            compiler.compile_json_schema(json.dumps(s), any_whitespace=False, separators=(",", ":"), strict_mode=True)
            return 1000 * (time.perf_counter() - t0)

        grounded = []
        for k in range(repeats):
            g = ground_schema(schema, ["source_ips.ip"], [f"10.0.{k}.{j}" for j in range(3)])
            grounded.append(ms(ground_schema(g, ["invalid_users", "targeted_users"], [f"user{k}", "root"])))
        out[str(size)] = {"schema_ms": round(ms(schema), 1), "grounded_ms": round(statistics.median(grounded), 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32, help="analyses per side (0: only --compare)")
    ap.add_argument("--model", choices=["bench21m", "tiny"], default="bench21m")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--compare", action="store_true", help="also compare the structured-generation libraries")
    ap.add_argument("--grounded-compile", action="store_true",
                    help="also time one window's grounded grammar (infer.grounded_fields) at 2k / 32k / 128k vocabularies")
    ap.add_argument("--tokenizer", action="append", default=[], metavar="NAME=PATH",
                    help="--compare: another tokenizer folder (e.g. a 50k byte-level BPE); the tiny one is always used")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from sft_throughput import matmul_peak_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    peak_gflops = round(matmul_peak_flops(torch.get_num_threads())["peak_flops"] / 1e9, 1)
    print(f"CPU: {cpu_model()} · {os.cpu_count()} cores · bf16 matmul peak {peak_gflops} GFLOP/s on {torch.get_num_threads()} thread(s) · "
          f"torch {torch.__version__} · CUDA {'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}")
    result: dict = {"cpu": cpu_model(), "bf16_matmul_peak_gflops": peak_gflops}
    if args.n > 0:
        result.update(measure(args.n, args.model, args.max_new_tokens, args.batch_size, args.repeats, args.threads or None))
        print(f"{result['n']} analyses · {result['model']} ({result['params'] / 1e6:.1f}M) · batch {result['batch_size']} · "
              f"max_new_tokens {result['max_new_tokens']} · {result['library']} (schema compile {result['compile_s']:.2f}s)")
        for side in ("unconstrained", "constrained"):
            print(f"  {side:13s} {result[side + '_s']:7.2f}s  {result[side + '_steps']:5d} steps  "
                  f"{result[side + '_ms_per_step']:6.2f} ms/step  schema-valid {result['schema_valid_rate_' + side]:.0%}")
        print(f"  slowdown per decoding step {result['constrained_generation_slowdown']:.3f}x (processor "
              f"{result['constrained_processor_ms_per_step']:.2f} ms/step, timed in the run) · A/B runs {result['constrained_ab_step_ratio']:.3f}x · "
              f"wall {result['constrained_wall_ratio']:.3f}x · closed by the budget {result['forced_close_rate']:.0%}")
    if args.grounded_compile:
        result["grounded_compile"] = grounded_compile()
        for size, entry in result["grounded_compile"].items():
            print(f"  vocabulary {size}: schema compile {entry['schema_ms']} ms, one window's grounded schema {entry['grounded_ms']} ms")
    if args.compare:
        from sectune.models import modeling

        toks = {"tiny": modeling.model_path(_compose([]))}
        toks.update(dict(t.split("=", 1) for t in args.tokenizer))
        result["libraries"] = compare_libraries(toks)
        for lib, entry in result["libraries"].items():
            print(f"  {lib}: {json.dumps(entry)}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
