"""stage=federated on Flower's simulation runtime: per-round wall time and bytes for 3, 10 and 30 clients, and
centralised vs federated training of the same LoRA on the same data at equal total optimizer steps.

Every side is a sectune run (``sectune.runner.run``) of the tiny HDFS preset (``+experiment=hdfs_federated_tiny``: the
2-layer tiny Llama, LoRA r=8) on the DeepLog HDFS sessions (``../shared/data``; generated ones on a fresh clone), in
its own subprocess, batch ``--batch``, detection off (the global evaluation is the validation loss only):

* ``clients_<K>`` (K = 3, 10, 30): K clients, all trained every round (``client_frac=1``: the time a round takes
  with K clients), ``--rounds`` rounds × ``--local-steps`` steps. A round's wall time (``metrics.round_s_mean``) runs
  from the end of one global evaluation to the next: sampling, K clients' training one after another (one Ray actor:
  ``ray_num_cpus`` = 1, what a 2-core machine affords), the messages, FedAvg. Bytes = ``ArrayRecord.count_bytes()``
  of every message (adapter tensors + npy headers + key names).
* ``central``: ``stage=sft`` for ``--total-steps`` steps (constant lr, no length grouping, fresh AdamW);
  ``fed_1x1``: one client holding all data, 1 round × total steps (the same training: tests/test_federated.py);
  ``fed_1xR``: one client, ``--equal-rounds`` rounds × total/rounds steps (AdamW restarts and the data is reshuffled
  each round); ``fed_3xR``: 3 IID clients, all per round, ``--equal-rounds`` rounds × total/(3·rounds) steps each
  (the same number of optimizer steps and examples, in parallel-able pieces). LoRA without ``lm_head`` (TRL's
  SFTTrainer refuses it). Every side's validation loss is ``sectune.training.federated.lm_loss`` on the normal validation
  sessions (the federated runs' own ``val_loss_end``; the same function on the sft adapter). "train s" is Trainer's
  runtime for ``central`` and the sum of the rounds' wall times for the federated sides (each round loads the global
  adapter and builds a Trainer per client; round 1 also starts the Ray actor and loads the model); "run s" is the
  whole run (Ray's start-up and the global evaluations included).

    OMP_NUM_THREADS=1 .venv/bin/python bench/federated_rounds.py     # ~5 min on 2 shared cores

The last line of output is one JSON object holding ``round_s_<K>_clients`` (rounds 2.., ``first_round_s_<K>_clients``
round 1) and ``val_loss_<side>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _child import emit, run_child  # noqa: E402
from contrastive_throughput import cpu_model  # noqa: E402

CLIENTS = (3, 10, 30)
NO_LM_HEAD = "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sectune import config

    config.register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def side_overrides(name: str, args) -> list[str]:
    base = ["+experiment=hdfs_federated_tiny", "logger=none", f"train.batch_size={args.batch}", "federated.detection=false"]
    fed = ["federated.client_frac=1.0", "federated.lr_schedule=constant"]
    if name.startswith("clients_"):
        return [*base, *fed, f"federated.num_clients={name.split('_')[1]}", f"federated.rounds={args.rounds}",
                f"federated.local_steps={args.local_steps}"]
    base.append(NO_LM_HEAD)
    rounds, clients = {"fed_1x1": (1, 1), "fed_1xR": (args.equal_rounds, 1), "fed_3xR": (args.equal_rounds, 3)}.get(name, (0, 0))
    if name == "central":
        return [*base, "stage=sft", f"train.max_steps={args.total_steps}", "train.lr_scheduler=constant",
                "train.group_by_length=false", "train.eval_steps=null", "train.save_steps=null"]
    steps, rest = divmod(args.total_steps, rounds * clients)
    if rest:
        raise SystemExit(f"--total-steps {args.total_steps} is not a multiple of {rounds} round(s) × {clients} client(s)")
    return [*base, *fed, f"federated.num_clients={clients}", f"federated.rounds={rounds}", f"federated.local_steps={steps}"]


def child(args) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench_federated_{args.child}_"))
    try:
        return measure(args, run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def measure(args, run_dir: Path) -> dict:
    import torch

    from sectune import runner
    from sectune.data.hdfs import DEFAULT_PROMPT, NORMAL, load_hdfs, render_keys
    from sectune.models import modeling
    from sectune.training import federated

    torch.set_num_threads(args.threads)
    cfg = compose(side_overrides(args.child, args))
    t = time.perf_counter()
    code, _ = runner.run(cfg, run_dir)
    wall = time.perf_counter() - t
    result = json.loads((run_dir / "result.json").read_text())
    if code:
        raise SystemExit(f"{args.child}: {result.get('error')}")
    m = result["metrics"]
    data = load_hdfs(cfg)
    out = {"wall_s": wall, "train_sessions": data.info["train_normal"], "layout": data.info["layout"], "source": str(data.source)}
    if cfg.stage.name == "sft":  # score the sft adapter with the federated runs' validation-loss function
        path = modeling.model_path(cfg)
        tokenizer = modeling.load_tokenizer(cfg, path)
        model = modeling.apply_lora(modeling.load_model(cfg, path=path), cfg)
        from safetensors.torch import load_file

        federated.load_adapter_state(model, load_file(run_dir / "adapter" / "adapter_model.safetensors"))
        val = [render_keys(s.keys) for s in data.splits["validation"] if s.label == NORMAL]
        rows = federated.encode_sessions(tokenizer, str(cfg.dataset.prompt_template or DEFAULT_PROMPT), val, int(cfg.model.max_seq_length))
        out.update(val_loss_end=federated.lm_loss(model, rows, int(tokenizer.pad_token_id or 0)), train_s=m["train_runtime_s"],
                   optimizer_steps=args.total_steps)
        return out
    rounds = json.loads((run_dir / "rounds.json").read_text())["rounds"]
    out.update({k: m[k] for k in ("round_s_mean", "bytes_up_per_round", "bytes_down_per_round", "adapter_bytes", "bytes_full_model",
                                  "val_loss_start", "val_loss_end", "simulation_s", "clients_per_round", "rounds_done")})
    out["round_s"] = [r["round_s"] for r in rounds if r["round"]]
    out["later_round_s"] = sum(out["round_s"][1:]) / max(1, len(out["round_s"]) - 1)
    out["train_s"] = sum(out["round_s"])  # the rounds, without Ray's start-up and the global evaluations
    out["optimizer_steps"] = int(cfg.federated.rounds) * m["clients_per_round"] * int(cfg.federated.local_steps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the 3/10/30-client sides (>= 2: round 1 holds the start-up)")
    ap.add_argument("--local-steps", type=int, default=2, help="local steps per client and round (3/10/30-client sides)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--total-steps", type=int, default=24, help="optimizer steps of each centralised-vs-federated side")
    ap.add_argument("--equal-rounds", type=int, default=4, help="rounds of fed_1xR and fed_3xR")
    ap.add_argument("--skip-equal", action="store_true", help="only the 3/10/30-client sides")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1))  # an empty export: 1
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rounds < 2:
        raise SystemExit("--rounds must be >= 2: round 1 also starts the Ray actor and loads the model")
    if args.equal_rounds < 1:  # a ZeroDivisionError (session 36)
        raise SystemExit("--equal-rounds must be >= 1")
    if args.child:
        emit(child(args))
        return

    from sft_throughput import matmul_peak_flops

    t0 = time.perf_counter()
    peak_gflops = round(matmul_peak_flops(args.threads)["peak_flops"] / 1e9, 1)
    names = [f"clients_{k}" for k in CLIENTS] + ([] if args.skip_equal else ["central", "fed_1x1", "fed_1xR", "fed_3xR"])
    for name in names:
        side_overrides(name, args)  # a bad --total-steps stops here, before any run
    res = {}
    for name in names:
        argv = [name, "--rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--batch", str(args.batch),
                "--total-steps", str(args.total_steps), "--equal-rounds", str(args.equal_rounds), "--threads", str(args.threads)]
        res[name] = r = run_child(__file__, argv, name, threads=args.threads)
        print(f"  {name:<11} {r['wall_s']:6.1f}s wall  val loss {r['val_loss_end']:.4f}", file=sys.stderr, flush=True)

    first = res[f"clients_{CLIENTS[0]}"]
    print(f"\nstage=federated, Flower simulation runtime · {cpu_model()} (bf16 matmul peak {peak_gflops} GFLOP/s) · {args.threads} thread(s) · tiny_llama + LoRA r8 · "
          f"{first['train_sessions']} training sessions ({first['layout']}: {first['source']}) · batch {args.batch}")
    print(f"\nper round, all clients trained ({args.rounds} rounds × {args.local_steps} local steps; one Ray actor):")
    print(f"{'clients':>8}{'round 1 s':>10}{'later s':>9}{'s/client':>9}{'vs 3':>7}{'bytes up/round':>16}{'bytes down/round':>18}"
          f"{'val loss':>10}")
    for k in CLIENTS:
        r = res[f"clients_{k}"]
        print(f"{k:>8}{r['round_s'][0]:>10.2f}{r['later_round_s']:>9.2f}{r['later_round_s'] / k:>9.2f}"
              f"{r['later_round_s'] / first['later_round_s']:>6.1f}x{r['bytes_up_per_round']:>16,.0f}{r['bytes_down_per_round']:>18,.0f}"
              f"{r['val_loss_end']:>10.4f}")
    print(f"  round 1 also starts the Ray actor and loads the model; 'later s' = the mean of rounds 2..{args.rounds}. "
          f"One adapter: {first['adapter_bytes']:,} bytes of tensors; the full model: {first['bytes_full_model']:,} bytes")
    summary = {f"round_s_{k}_clients": round(res[f"clients_{k}"]["later_round_s"], 3) for k in CLIENTS}
    summary.update({f"first_round_s_{k}_clients": round(res[f"clients_{k}"]["round_s"][0], 3) for k in CLIENTS})
    summary.update({f"bytes_up_per_round_{k}_clients": res[f"clients_{k}"]["bytes_up_per_round"] for k in CLIENTS})
    if not args.skip_equal:
        central = res["central"]
        print(f"\ncentralised vs federated, {args.total_steps} optimizer steps each (the same data; lm_head not a target):")
        print(f"{'side':<10}{'layout':>26}{'train s':>9}{'run s':>7}{'val loss':>10}{'vs central':>11}")
        layouts = {"central": f"stage=sft, {args.total_steps} steps", "fed_1x1": f"1 client, 1 × {args.total_steps}",
                   "fed_1xR": f"1 client, {args.equal_rounds} × {args.total_steps // args.equal_rounds}",
                   "fed_3xR": f"3 clients, {args.equal_rounds} × {args.total_steps // (3 * args.equal_rounds)} each"}
        for name in ("central", "fed_1x1", "fed_1xR", "fed_3xR"):
            r = res[name]
            print(f"{name:<10}{layouts[name]:>26}{r['train_s']:>9.1f}{r['wall_s']:>7.0f}{r['val_loss_end']:>10.4f}{r['val_loss_end'] / central['val_loss_end']:>10.3f}x")
        summary.update({f"val_loss_{n}": round(res[n]["val_loss_end"], 5) for n in ("central", "fed_1x1", "fed_1xR", "fed_3xR")})
    print(json.dumps({**summary, "rounds": args.rounds, "local_steps": args.local_steps, "batch": args.batch,
                      "total_steps": args.total_steps, "threads": args.threads, "cpu": cpu_model(), "bf16_matmul_peak_gflops": peak_gflops,
                      "bench_wall_s": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
