"""Decode speed: rdpt's decode loop against a plain-PyTorch decode in the published code's style
and against rdpt's decode before the lean loop, side by side in one process.

    .venv/bin/python bench/generate.py                       # CPU, tiny model, one thread
    .venv/bin/python bench/generate.py --rs 4,16 --batches 1 --rounds 2 --no-compile
    .venv/bin/python bench/generate.py --checkpoint runs/tiny  # a trained model instead

Decoders (bench/decode_baselines.py holds the two baselines):
- `reference_style`: one module per layer, a cache grown by torch.cat, SDPA, no compile (the
  stand-in for the published modeling code, which rdpt does not contain);
- `rdpt_before`: rdpt's decode before the lean loop (general API, growing KVCache);
- `rdpt`: `generate_batch` as it runs by default on this device (CPU: the lean loop with the
  fast step of pipeline/model/fast_decode.py, its steps of up to 32 rows in rdpt's C
  kernels, pipeline/model/native_kernels.py);
- `rdpt_torch_ops`: the same with the kernels off (the fast step in torch operations only);
- `rdpt_layers`: the same loop calling the model's own layers (fast_path=False), to show what
  the fast step buys;
- `rdpt_compiled`: `generate_batch` with compile=True (static-shape steps, torch.compile of a
  core iteration and the coda); on CUDA also the CUDA graph of the fixed-r step.
Then, at batch 1, self-speculative decoding (`--speculate-n N` drafts at DRAFT_R = r / 4)
against plain rdpt, interleaved the same way: acceptance rate and speedup, identical tokens
asserted. Greedy, fixed r, zero initial state, prompts of `--prompt-len` random ids,
`--new-tokens` new tokens per sequence. Every round runs every decoder once for every
(r, batch), so machine load hits them alike; the report is the tokens/s (prefill included)
of each decoder's fastest round (the least disturbed on a shared machine) and of its median
round, and the ratios. Every decoder's tokens are asserted identical to the reference
style's before anything is timed.
JSON goes to bench/results/generate-<device>-<time>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _load_baselines():
    spec = importlib.util.spec_from_file_location(
        "decode_baselines", ROOT / "bench" / "decode_baselines.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "configs/model/tiny.yaml"))
    p.add_argument("--vocab-size", type=int, default=8192, help="with --model (the demo's)")
    p.add_argument("--checkpoint", help="a run, checkpoint or export instead of random weights")
    p.add_argument("--rs", default="4,16,32")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", action="store_true", help="skip rdpt_compiled")
    p.add_argument(
        "--speculate-n",
        type=int,
        default=3,
        help="self-speculative decoding at batch 1: N drafts of DRAFT_R = r / 4 (0 = skip)",
    )
    p.add_argument("--out", default=str(ROOT / "bench/results"))
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from pipeline.eval.generate import GenerationConfig, generate_batch
    from pipeline.model.runtime import init_model_parallel

    init_model_parallel(tp=1)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.checkpoint:
        from pipeline.eval.loading import load_model_and_tokenizer

        model = load_model_and_tokenizer(args.checkpoint, device=str(device)).model
        source = args.checkpoint
    else:
        from pipeline.common.config_io import load_config
        from pipeline.model import ModelConfig, build_model

        cfg = load_config(ModelConfig, args.model).model_copy(
            update={"vocab_size": args.vocab_size}
        )
        torch.manual_seed(0)
        model = build_model(cfg).to(device)
        source = f"{Path(args.model).name} (random init, vocab {args.vocab_size})"
    model.eval()
    base = _load_baselines()
    ref = base.ReferenceStyleLM.from_rdpt(model).to(device)
    g = torch.Generator().manual_seed(0)
    vocab = model.cfg.vocab_size
    n_new = args.new_tokens

    def rdpt(compile_: bool | None, fast_path: bool | None = None, native: bool | None = None):
        def run(prompts_BP, r):
            gcfg = GenerationConfig(
                max_new_tokens=n_new,
                r=r,
                compile=compile_,
                fast_path=fast_path,
                native_kernels=native,
            )
            return generate_batch(model, prompts_BP, gcfg).new_ids

        return run

    decoders = {
        "reference_style": lambda prompts_BP, r: ref.greedy(prompts_BP, n_new, r),
        "rdpt_before": lambda prompts_BP, r: base.greedy_before(model, prompts_BP, n_new, r),
        "rdpt": rdpt(None),
        "rdpt_torch_ops": rdpt(None, native=False),
        "rdpt_layers": rdpt(None, fast_path=False),
    }
    if not args.no_compile:
        decoders["rdpt_compiled"] = rdpt(True)
    cases = [(r, b) for r in _ints(args.rs) for b in _ints(args.batches)]
    prompts = {
        b: torch.randint(0, vocab, (b, args.prompt_len), generator=g).to(device)
        for b in _ints(args.batches)
    }
    # identical greedy outputs first (this also warms up and compiles)
    warm_s = {}
    for r, b in cases:
        want = None
        for name, fn in decoders.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                got = fn(prompts[b], r)
            warm_s[f"{name}/r{r}/b{b}"] = time.perf_counter() - t0
            if want is None:
                want = got
            assert got == want, f"{name} at r={r}, batch {b}: tokens differ from reference_style"
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for r, b in cases:
            for name, fn in decoders.items():
                sync()
                t0 = time.perf_counter()
                with torch.no_grad():
                    fn(prompts[b], r)
                sync()
                times.setdefault(f"{name}/r{r}/b{b}", []).append(time.perf_counter() - t0)
    rows = []
    for r, b in cases:
        row = {"r": r, "batch": b}
        for stat, fn in (("best", min), ("median", statistics.median)):
            tps = {name: b * n_new / fn(times[f"{name}/r{r}/b{b}"]) for name in decoders}
            row[f"tokens_per_s_{stat}"] = tps
            row[f"ratio_to_reference_style_{stat}"] = {
                k: tps[k] / tps["reference_style"] for k in tps if k.startswith("rdpt")
            }
            row[f"ratio_to_rdpt_before_{stat}"] = {
                k: tps[k] / tps["rdpt_before"] for k in tps if k != "rdpt_before"
            }
        rows.append(row)
    speculative = []
    if args.speculate_n > 0:
        from pipeline.eval.speculative import Speculation, generate_speculative

        for r in _ints(args.rs):
            spec = Speculation(max(1, r // 4), args.speculate_n)
            prompt = prompts[min(prompts)][0].tolist()
            gcfg = GenerationConfig(max_new_tokens=n_new, r=r)
            res = generate_speculative(model, prompt, gcfg, spec)
            plain = generate_batch(model, prompts[min(prompts)][:1], gcfg)
            assert res.new_ids == plain.new_ids[0], f"speculative at r={r} differs from greedy"
            t_spec, t_plain = [], []
            for _ in range(args.rounds):
                t_spec.append(generate_speculative(model, prompt, gcfg, spec).seconds)
                t_plain.append(generate_batch(model, prompts[min(prompts)][:1], gcfg).seconds)
            speculative.append(
                {
                    "r": r,
                    "draft_r": spec.draft_r,
                    "n": spec.n,
                    **res.stats.to_dict(len(res.new_ids)),
                    "tokens_per_s_best": n_new / min(t_spec),
                    "plain_tokens_per_s_best": n_new / min(t_plain),
                    "speedup_best": min(t_plain) / min(t_spec),
                    "speedup_median": statistics.median(t_plain) / statistics.median(t_spec),
                }
            )
    from pipeline.common.machine import cpu_model
    from pipeline.model import native_kernels

    result = {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu: {cpu_model()}",
        "native_kernels": native_kernels.unavailable_reason() or "loaded",
        "machine": platform.node(),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": args.threads,
        "model": source,
        "prompt_len": args.prompt_len,
        "new_tokens": n_new,
        "rounds": args.rounds,
        "load_average_at_start": load_at_start,
        "identical_greedy_outputs": True,
        "first_call_seconds": warm_s,
        "results": rows,
        "speculative_batch1": speculative,
    }
    head = " ".join(f"{n:>16}" for n in decoders)
    print(f"{'r':>3} {'B':>2} {head}  rdpt/ref  rdpt/before  (median rounds)")
    print("tokens/s of the fastest round (best); ratios of rdpt's default decode")
    for row in rows:
        tps = row["tokens_per_s_best"]
        print(
            f"{row['r']:>3} {row['batch']:>2} "
            + " ".join(f"{tps[n]:>16.1f}" for n in decoders)
            + f"  {row['ratio_to_reference_style_best']['rdpt']:>7.2f}x"
            + f"  {row['ratio_to_rdpt_before_best']['rdpt']:>9.2f}x"
            + f"  ({row['ratio_to_reference_style_median']['rdpt']:.2f}x,"
            + f" {row['ratio_to_rdpt_before_median']['rdpt']:.2f}x)"
        )
    for row in speculative:
        print(
            f"speculative r={row['r']} draft {row['draft_r']}:{row['n']}: acceptance "
            f"{row['acceptance_rate']:.2f}, {row['tokens_per_s_best']:.1f} tokens/s, "
            f"{row['speedup_best']:.2f}x plain rdpt (identical tokens)"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    kind = "cuda" if cuda else "cpu"
    from pipeline.common.atomic import atomic_write_json

    path = out / f"generate-{kind}-{stamp}.json"
    atomic_write_json(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
