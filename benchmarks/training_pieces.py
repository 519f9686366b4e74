"""Training-step pieces, each measured on its own against plain transformers + peft on the same rows.

One process, the embedded model (SmolLM2-135M-Instruct, real weights from the local cache), one set of rows
of varied lengths (prompt and response lengths drawn like a bootstrap's: prompts 24-80 tokens, responses
16-256 tokens log-uniform, half of the rows distill with a random teacher top-k, the rest retain),
built and padded by the data module's own ``build_example`` / ``collate_examples``. Every variant does one
pass over all rows (forward, backward, AdamW step per batch):

  * ``plain_peft``: a competent plain peft step: a second peft model over the SAME base weights without any
    of our hooks, retain rows left out, logits only over the response span (``logits_to_keep``), the same
    top-k KL; batches in the free shuffle's order;
  * ``plain_peft_grouped``: the same with length-grouped batches (what HF's ``group_by_length`` gives a peft
    user), reported so the bucketing gain is not counted as ours alone;
  * ``ours_today``: ``PrismModule._common_step`` with today's settings (free shuffle, full logits at the
    response positions, eager);
  * ``ours_bucketed`` (``data.length_grouping``), ``ours_chunked_kl`` (``model.kl_chunk_positions``),
    ``ours_compiled`` (``model.compile_layers``): one piece each;
  * ``ours_all``: the three together.

Tokens/s counts the real (non-pad) tokens of all rows of the pass, the same for every variant. Peak memory on
CPU: the resident set's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` before the pass,
freed heap handed back with ``malloc_trim``) minus the resident set before the pass; on CUDA
``max_memory_allocated`` minus the allocated memory before. Interleaved repeats with a rotating order after
a warm-up pass of every variant (compilation happens there), medians with min..max, ratios per repeat.

    python benchmarks/training_pieces.py --threads 1 --json benchmarks/results/training_pieces_cpu.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from routing_and_training import Variant, interleaved, machine, shared_twin, stats, write_report  # noqa: E402

TOP_K = 64
VARIANTS = ("plain_peft", "plain_peft_grouped", "ours_today", "ours_bucketed", "ours_chunked_kl",
            "ours_compiled", "ours_all")  # fmt: skip


# -- rows ---------------------------------------------------------------------------------------------
def make_rows(n: int, vocab: int, max_length: int, seed: int) -> list[dict]:
    """Examples in the data module's format (``build_example``) with bootstrap-like lengths."""
    from prism_lightning.data.datamodule import build_example

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        plen = rng.randint(24, 80)
        rlen = int(math.exp(rng.uniform(math.log(16), math.log(256))))
        distill = i % 2 == 0  # half of the rows; the batches' shuffle mixes them
        prompt = torch.randint(3, vocab, (plen,), generator=g).tolist()
        response = torch.randint(3, vocab, (rlen,), generator=g).tolist()
        teacher = None
        if distill:
            values = torch.randn(rlen, TOP_K, generator=g).sort(-1, descending=True).values * 3
            indices = torch.stack([torch.randperm(vocab, generator=g)[:TOP_K] for _ in range(rlen)])
            teacher = {"values": values, "indices": indices}
        rows.append(build_example(prompt, response, int(distill), teacher, max_length, f"row{i}"))
    return rows


def batches_in_order(rows: list[dict], order: list[int], batch_size: int, pad_id: int) -> list[dict]:
    from prism_lightning.data.datamodule import collate_examples

    cuts = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [collate_examples([rows[i] for i in cut], pad_id, TOP_K) for cut in cuts]


def real_tokens(batches: list[dict]) -> int:
    return sum(int(b["attention_mask"].sum()) for b in batches)


def pad_tokens(batches: list[dict]) -> int:
    return sum(int((b["attention_mask"] == 0).sum()) for b in batches)


# -- memory -------------------------------------------------------------------------------------------
_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


class PeakMemory:
    """Peak extra memory of one call: CUDA allocator statistics, or the resident set's high-water mark."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.start = 0
        self.peaks: dict[str, list[int]] = {}

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        self.start = _status_kib("VmRSS") * 1024

    def record(self, name: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kib("VmHWM") * 1024
        self.peaks.setdefault(name, []).append(peak - self.start)


def _timed_first(fn, name: str, into: dict):
    def call():
        if name in into:
            return fn()
        t0 = time.perf_counter()
        out = fn()
        into[name] = time.perf_counter() - t0
        return out

    return call


# -- the benchmark ------------------------------------------------------------------------------------
def run(args) -> dict:
    from prism_lightning.backbone import BackboneConfig
    from prism_lightning.data.length_sampler import LengthGroupedSampler
    from prism_lightning.model.module import PrismModule
    from prism_lightning.model.routing import apply_lora
    from prism_lightning.model.training_step import topk_kl

    device = args.device
    cuda = device.startswith("cuda")
    bb = BackboneConfig(model=args.model, dtype=args.dtype).load(device=device)
    net = bb.model
    plain_peft = apply_lora(shared_twin(net), gate_layer=0, rank=16, alpha=32, dropout=0.05).train()
    module = PrismModule(lora_rank=16, lora_alpha=32, kl_chunk_positions=0)
    module.attach_backbone(bb)
    module.to(device)
    module.train()
    plain_peft.load_state_dict(module.model.state_dict(), strict=False)  # the same starting adapter
    vocab, pad_id = net.config.vocab_size, int(bb.tokenizer.pad_token_id)

    rows = make_rows(args.rows, vocab, args.max_length, args.seed)
    lengths = [len(r["input_ids"]) for r in rows]
    free_order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_batches = math.ceil(len(rows) / args.batch_size)
    group = args.group_batches or n_batches
    grouped_order = list(LengthGroupedSampler(lengths, args.batch_size, group, seed=args.seed))
    to_dev = lambda bs: [{k: v.to(device) for k, v in b.items()} for b in bs]  # noqa: E731
    free, grouped = (
        to_dev(batches_in_order(rows, o, args.batch_size, pad_id)) for o in (free_order, grouped_order)
    )
    assert sorted(free_order) == sorted(grouped_order) == list(range(len(rows)))
    tokens = real_tokens(free)
    assert tokens == real_tokens(grouped) == sum(lengths)
    distill_tokens = sum(len(r["input_ids"]) for r in rows if r["gate_target"])

    opt_ours = torch.optim.AdamW(list(module.gate.parameters()) + module.lora_parameters(), lr=1e-5)
    plain_params = [p for p in plain_peft.parameters() if p.requires_grad]
    opt_plain = torch.optim.AdamW(plain_params, lr=1e-5)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def ours(batches, chunk: int):
        def one_pass():
            module.hparams.kl_chunk_positions = chunk
            for batch in batches:
                with autocast():
                    loss = module._common_step(batch, 0, "train")["loss"]
                loss.backward()
                opt_ours.step()
                opt_ours.zero_grad(set_to_none=True)

        return one_pass

    def plain(batches):
        def one_pass():
            for batch in batches:
                rows_ = batch["gate_target"] > 0
                if not bool(rows_.any()):
                    continue
                ids, attn = batch["input_ids"][rows_], batch["attention_mask"][rows_]
                plen, rlen = batch["prompt_lengths"][rows_], batch["response_lengths"][rows_]
                width = int(attn.sum(-1).max())
                ids, attn = ids[:, :width], attn[:, :width]
                start, end = int(plen.min()) - 1, int((plen + rlen).max()) - 1
                keep = torch.arange(start, end, device=ids.device)  # the response span of every row
                tv, ti = batch["teacher_values"][rows_], batch["teacher_indices"][rows_]
                sel = batch["teacher_mask"][rows_]
                steps = torch.arange(sel.shape[1], device=ids.device)
                pos = plen[:, None] - 1 + steps[None] - start
                b_idx = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(pos)
                with autocast():
                    logits = plain_peft(
                        input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=keep
                    ).logits
                    kl = topk_kl(logits[b_idx[sel], pos[sel]], tv[sel], ti[sel], 2.0).mean()
                kl.backward()
                opt_plain.step()
                opt_plain.zero_grad(set_to_none=True)

        return one_pass

    memory = PeakMemory(device)

    def setup(compiled: bool):
        def go():
            module.compile_training_layers(compiled)
            memory.reset()

        return go

    def after(name, warm):
        memory.record(("warm:" if warm else "") + name)
        module.compile_training_layers(False)

    variants = {
        "plain_peft": Variant(plain(free), setup(False), after),
        "plain_peft_grouped": Variant(plain(grouped), setup(False), after),
        "ours_today": Variant(ours(free, 0), setup(False), after),
        "ours_bucketed": Variant(ours(grouped, 0), setup(False), after),
        "ours_chunked_kl": Variant(ours(free, args.kl_chunk), setup(False), after),
    }
    if not args.skip_compile:
        variants["ours_compiled"] = Variant(ours(free, 0), setup(True), after)
    variants["ours_all"] = Variant(ours(grouped, args.kl_chunk), setup(not args.skip_compile), after)
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}

    # exactness of the chunked KL on the first batch of these rows (the same weights, no step)
    checks = {}
    with torch.no_grad():
        module.eval()  # no dropout: both computations see the same network
        first = next(b for b in free if bool((b["gate_target"] > 0).any()))
        routes = module._routes(first)
        from prism_lightning.model.training_step import distill_step

        outs = [
            distill_step(module.model, module.controller, module.gate, first, routes,
                         module._class_weights(routes), kl_temperature=2.0, kl_chunk_positions=c)
            for c in (0, args.kl_chunk)
        ]  # fmt: skip
        module.train()
    checks["kl_full_logits"], checks["kl_chunked"] = float(outs[0].kl), float(outs[1].kl)
    checks["kl_abs_diff"] = abs(checks["kl_full_logits"] - checks["kl_chunked"])

    first_pass: dict[str, float] = {}  # the warm-up pass (compilation included), untimed by interleaved()
    for name, v in variants.items():
        v.fn = _timed_first(v.fn, name, first_pass)
    warm_start = time.perf_counter()
    times = interleaved(variants, device, args.repeats, warmup=args.warmup)
    wall = time.perf_counter() - warm_start
    res: dict = {}
    for name, ts in times.items():
        peaks = memory.peaks[name]
        res[name] = {
            **stats(ts),
            "tokens_per_s": tokens / statistics.median(ts),
            "distill_tokens_per_s": distill_tokens / statistics.median(ts),
            "peak_extra_mib_median": statistics.median(peaks) / 2**20,
            "peak_extra_mib_max": max(peaks) / 2**20,
            "warmup_pass_s": first_pass.get(name),
        }
    ratios = {}
    for name in times:
        if name == "plain_peft":
            continue
        ratios[f"tokens_per_s_{name}_vs_plain_peft"] = statistics.median(
            [p / o for p, o in zip(times["plain_peft"], times[name], strict=True)]
        )
        ratios[f"tokens_per_s_{name}_vs_ours_today"] = statistics.median(
            [t / o for t, o in zip(times["ours_today"], times[name], strict=True)]
        )
        base = statistics.median(memory.peaks["plain_peft"])
        ratios[f"peak_extra_mem_{name}_vs_plain_peft"] = statistics.median(memory.peaks[name]) / base
    if "plain_peft_grouped" in times and "ours_all" in times:
        ratios["tokens_per_s_ours_all_vs_plain_peft_grouped"] = statistics.median(
            [p / o for p, o in zip(times["plain_peft_grouped"], times["ours_all"], strict=True)]
        )
    data = {
        "rows": len(rows),
        "distill_rows": sum(1 for r in rows if r["gate_target"]),
        "batch_size": args.batch_size,
        "batches": n_batches,
        "length_grouping": group,
        "real_tokens": tokens,
        "distill_real_tokens": distill_tokens,
        "pad_tokens_free_shuffle": pad_tokens(free),
        "pad_tokens_grouped": pad_tokens(grouped),
        "row_lengths": lengths,
    }
    return {
        "results": res,
        "ratios": ratios,
        "checks": checks,
        "data": data,
        "raw_seconds": times,
        "raw_peak_bytes": memory.peaks,
        "timed_wall_s": wall,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--group-batches", type=int, default=0, help="length-grouping window; 0: every batch")
    ap.add_argument("--kl-chunk", type=int, default=256, help="kl_chunk_positions of the chunked variants")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="", help="comma list of variants to keep (default: all)")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.rows < 1 or args.batch_size < 1:
        print("error: --repeats, --rows and --batch-size must be >= 1", file=sys.stderr)
        raise SystemExit(2)
    keep = set(args.variants.split(",")) if args.variants else set(VARIANTS)
    if not keep <= set(VARIANTS) or not {"plain_peft", "ours_today"} <= keep:
        print(f"error: --variants takes names from {', '.join(VARIANTS)}, with plain_peft and ours_today "
              "(the ratios' bases)", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    load_start = os.getloadavg()
    out = run(args)
    report = {
        "card": "training_pieces",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {**machine(), "load_average_at_start": load_start},
        "settings": vars(args),
        "repeats": args.repeats,
        "warmup_passes": args.warmup,
        **out,
    }
    print(f"# training_pieces  model={args.model} device={args.device} threads={torch.get_num_threads()}  "
          f"{report['date']}  load {load_start} -> {report['machine']['load_average']}")  # fmt: skip
    d = out["data"]
    print(f"rows {d['rows']} ({d['distill_rows']} distill), {d['real_tokens']} real tokens, pad tokens: "
          f"free shuffle {d['pad_tokens_free_shuffle']}, grouped {d['pad_tokens_grouped']}")  # fmt: skip
    for name, r in out["results"].items():
        span = f"{r['median']:8.2f} s [{r['min']:.2f} .. {r['max']:.2f}]"
        peak = f"peak +{r['peak_extra_mib_median']:.0f} MiB (max {r['peak_extra_mib_max']:.0f})"
        print(f"{name:22s} {span}  {r['tokens_per_s']:7.1f} tok/s  {peak}")
    for k, v in out["ratios"].items():
        print(f"{k:60s} {v:.3f}")
    print("checks:", out["checks"])
    write_report(report, args.json_out)
    return report


if __name__ == "__main__":
    main()
