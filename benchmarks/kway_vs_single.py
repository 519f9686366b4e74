"""K adapters + a (K+1)-way gate vs the one-adapter method, on the same bootstrap, in one run.

Both models train with the same settings (the module's defaults, the default config's epochs), the same
seed and the same train/held-out split of one finished bootstrap; then, on the held-out rows:

* KL to each persona's teacher (top-k KL at the training temperature, per row, averaged) under: the base
  model, the single adapter always on, each method's own routing (the gate decides), and for K-way the
  oracle route (the adapter holding the row's persona);
* the gate: accuracy and AUROC of P(any adapter) against distill/retain (both methods), and the K-way
  route accuracy over none + K adapters;
* adapter parameters;
* prefill latency of a mixed batch (routes forced: half the rows on for one adapter; none and every
  adapter for K-way) and of an all-routed batch, as a ratio to the base prefill (adapters skipped) of
  the same batch in the same repeat; medians over interleaved repeats.

    python benchmarks/kway_vs_single.py --run-dir runs/kway-bench \
        --json benchmarks/results/kway_vs_single.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def train(dm, adapters, epochs: int, seed: int):
    import lightning as L

    from prism_lightning.backbone import BackboneConfig
    from prism_lightning.model.module import PrismModule

    L.seed_everything(seed, verbose=False)
    module = PrismModule(backbone=BackboneConfig(model=dm.backbone.model), adapters=adapters)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        gradient_clip_val=1.0, precision="32-true", limit_val_batches=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    module.eval()
    return module, seconds


@torch.no_grad()
def row_kls(module, batch, routes: torch.Tensor) -> torch.Tensor:
    """Per-row mean top-k KL to the teacher with each row routed as given (0 = base)."""
    from prism_lightning.model.routing import inner_model
    from prism_lightning.model.training_step import topk_kl

    ctl = module.controller
    ctl.set_mask(routes)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    hidden = inner_model(module.model)(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    n_resp = batch["teacher_values"].shape[1]
    steps = torch.arange(n_resp)
    pos = (batch["prompt_lengths"][:, None] - 1 + steps[None]).clamp(max=ids.shape[1] - 1)
    out = torch.zeros(ids.shape[0])
    lm_head = module.base_model.get_output_embeddings()
    for b in range(ids.shape[0]):
        sel = batch["teacher_mask"][b]
        logits = lm_head(hidden[b, pos[b][sel]])
        kl = topk_kl(logits, batch["teacher_values"][b][sel], batch["teacher_indices"][b][sel], 2.0)
        out[b] = kl.mean()
    ctl.reset()
    return out


def auroc(scores: list[float], labels: list[int]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def gate_eval(module, prompts: list[str], labels: list[int], routes_true: list[int] | None) -> dict:
    from prism_lightning.model.inference import prompt_gate_probs
    from prism_lightning.model.route_rule import gate_routes

    probs = prompt_gate_probs(module.model, module.tokenizer, module.controller, prompts)
    thr = module.hparams.threshold
    p_any = (1.0 - probs[:, 0]) if probs.dim() == 2 else probs
    out = {
        "gate_acc": sum(int(p >= thr) == y for p, y in zip(p_any.tolist(), labels, strict=True))
        / len(labels),
        "gate_auroc": auroc(p_any.tolist(), labels),
        "routing_rate": float((p_any >= thr).float().mean()),
    }
    if probs.dim() == 2:
        routes = gate_routes(probs, thr).tolist()
        out["route_acc"] = sum(r == t for r, t in zip(routes, routes_true, strict=True)) / len(routes)
        out["routes"] = routes
    else:
        out["routes"] = [int(p >= thr) for p in p_any.tolist()]
    return out


@torch.no_grad()
def prefill_times(modules: dict, prompts: list[str], repeats: int) -> dict:
    """Median prefill seconds per variant; every repeat runs every variant (interleaved)."""
    from prism_lightning.generation import left_pad

    variants = []
    for name, (module, mixed, all_routed) in modules.items():
        tok = module.tokenizer
        rows = [list(r) for r in tok(prompts, add_special_tokens=False)["input_ids"]]
        ids, mask = left_pad(rows, tok.pad_token_id, torch.device("cpu"))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        for label, routes in (("base", None), ("mixed", mixed), ("all_routed", all_routed)):
            variants.append((name, label, module, routes, ids, mask, positions))
    times: dict[tuple[str, str], list[float]] = {(v[0], v[1]): [] for v in variants}
    for rep in range(repeats + 1):  # the first repeat warms up
        order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
        for name, label, module, routes, ids, mask, positions in order:
            ctl = module.controller
            start = time.perf_counter()
            if routes is None:  # the base: adapters skipped, no gate
                ctl.set_mask(0)
            else:  # the gate runs after layer k inside this prefill; the routes are forced
                ctl.arm(decide=True, force=routes)
            module.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
            elapsed = time.perf_counter() - start
            ctl.disarm()
            ctl.reset()
            if rep:
                times[(name, label)].append(elapsed)
    out: dict = {}
    for (name, label), ts in times.items():
        out.setdefault(name, {})[f"{label}_s"] = statistics.median(ts)
    for d in out.values():
        d["mixed_vs_base"] = d["mixed_s"] / d["base_s"]
        d["all_routed_vs_base"] = d["all_routed_s"] / d["base_s"]
    return out


def main(argv: list[str] | None = None) -> dict:
    import yaml

    from prism_lightning.backbone import BackboneConfig
    from prism_lightning.data import PrismDataModule

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/kway-bench", help="a finished default-config bootstrap")
    ap.add_argument("--adapters", default=str(ROOT / "configs" / "kway.yaml"), help="has model.adapters")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--val-fraction", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "kway_vs_single.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    groups = yaml.safe_load(Path(args.adapters).read_text())["model"]["adapters"]

    def datamodule():
        dm = PrismDataModule(
            run_dir=args.run_dir, backbone=BackboneConfig(model="smollm2-135m-instruct"),
            val_fraction=args.val_fraction, test_fraction=0.0, seed=args.seed,  # scored on val: no test split
        )  # fmt: skip
        dm.setup("fit")
        return dm

    dm = datamodule()
    print(f"bootstrap {args.run_dir}: split {dm.split_summary}", flush=True)
    single, t_single = train(dm, None, args.epochs, args.seed)
    print(f"single adapter trained in {t_single:.0f} s", flush=True)
    kway, t_kway = train(datamodule(), groups, args.epochs, args.seed)
    print(f"K-way ({len(groups)} adapters) trained in {t_kway:.0f} s", flush=True)

    # held-out rows: the data module's validation split, with each row's query and persona
    verdicts = {r["id"]: r for r in dm._stores()["verdicts"].read_rows()}
    held = [dict(ex, **{"query": verdicts[ex["id"]]["query"], "persona": verdicts[ex["id"]]["persona"]})
            for ex in dm.val_set]  # fmt: skip
    route_of = {p: j for j, ps in enumerate(groups.values(), 1) for p in ps}
    names = list(groups)
    prompts = [dm.formatter.prompt(r["query"]) for r in held]
    labels = [int(r["gate_target"]) for r in held]
    true_routes = [route_of[r["persona"]] if y else 0 for r, y in zip(held, labels, strict=True)]
    gate_single = gate_eval(single, prompts, labels, None)
    gate_kway = gate_eval(kway, prompts, labels, true_routes)

    distill = [i for i, y in enumerate(labels) if y]
    batch = dm._collate([held[i] for i in distill])
    n = len(distill)
    oracle = torch.tensor([true_routes[i] for i in distill])
    kl = {
        "base": row_kls(single, batch, torch.zeros(n, dtype=torch.long)),
        "single_on": row_kls(single, batch, torch.ones(n, dtype=torch.long)),
        "single_gated": row_kls(single, batch, torch.tensor([gate_single["routes"][i] for i in distill])),
        "kway_oracle": row_kls(kway, batch, oracle),
        "kway_gated": row_kls(kway, batch, torch.tensor([gate_kway["routes"][i] for i in distill])),
    }
    personas = [held[i]["persona"] for i in distill]
    per_persona = {
        p: {k: float(v[[j for j, q in enumerate(personas) if q == p]].mean()) for k, v in kl.items()}
        for p in sorted(set(personas))
    }
    per_group = {}
    for g, ps in groups.items():
        idx = [j for j, q in enumerate(personas) if q in ps]
        if idx:
            per_group[g] = {"rows": len(idx), **{k: float(v[idx].mean()) for k, v in kl.items()}}

    def n_params(module):
        return sum(p.numel() for n, p in module.model.named_parameters() if "lora_" in n)

    # prefill: held-out prompts, a mixed batch and an all-routed batch for each method
    b = args.prefill_batch
    batch_prompts = (prompts * (b // max(1, len(prompts)) + 1))[:b]
    mixed_single = torch.tensor([i % 2 for i in range(b)])
    mixed_kway = torch.tensor([i % (len(names) + 1) for i in range(b)])
    prefill = prefill_times(
        {
            "single": (single, mixed_single, torch.ones(b, dtype=torch.long)),
            "kway": (kway, mixed_kway, torch.ones(b, dtype=torch.long)),
        },
        batch_prompts,
        args.repeats,
    )
    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "device": "cpu", "dtype": "float32"},
        "bootstrap": {"run_dir": args.run_dir, "split": dm.split_summary, "held_out_rows": len(held),
                      "held_out_distill_rows": n},
        "adapters": groups,
        "settings": {"epochs": args.epochs, "seed": args.seed, "val_fraction": args.val_fraction,
                     "module": "PrismModule defaults (lora_rank 16, lora_lr 2e-4, gate_lr 1e-3)",
                     "prefill_batch": b, "repeats": args.repeats, "kl_temperature": 2.0},
        "train_seconds": {"single": t_single, "kway": t_kway},
        "adapter_params": {"single": n_params(single), "kway": n_params(kway)},
        "kl_held_out_mean": {k: float(v.mean()) for k, v in kl.items()},
        "kl_per_group": per_group,
        "kl_per_persona": per_persona,
        "gate": {
            "single": {k: v for k, v in gate_single.items() if k != "routes"},
            "kway": {k: v for k, v in gate_kway.items() if k != "routes"},
        },
        "prefill": prefill,
    }  # fmt: skip
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nwrote {out}")
    return result


def print_table(r: dict) -> None:
    kl, prm, t, b = r["kl_held_out_mean"], r["adapter_params"], r["train_seconds"], r["bootstrap"]
    gs, gk, ps, pk = r["gate"]["single"], r["gate"]["kway"], r["prefill"]["single"], r["prefill"]["kway"]
    print(f"\nheld-out rows: {b['held_out_rows']} ({b['held_out_distill_rows']} distill)")
    rows = [
        ("KL to teacher, base (no adapter)", f"{kl['base']:.4f}", f"{kl['base']:.4f}"),
        ("KL, the gate routes", f"{kl['single_gated']:.4f}", f"{kl['kway_gated']:.4f}"),
        ("KL, always its own adapter", f"{kl['single_on']:.4f}", f"{kl['kway_oracle']:.4f}"),
        ("gate accuracy (adapter vs none)", f"{gs['gate_acc']:.3f}", f"{gk['gate_acc']:.3f}"),
        ("gate AUROC (adapter vs none)", f"{gs['gate_auroc']:.3f}", f"{gk['gate_auroc']:.3f}"),
        ("route accuracy (none + K)", "-", f"{gk['route_acc']:.3f}"),
        ("adapter parameters", f"{prm['single']:,}", f"{prm['kway']:,}"),
        ("prefill mixed batch / base", f"{ps['mixed_vs_base']:.3f}", f"{pk['mixed_vs_base']:.3f}"),
        ("prefill all on / base", f"{ps['all_routed_vs_base']:.3f}", f"{pk['all_routed_vs_base']:.3f}"),
        ("train seconds", f"{t['single']:.0f}", f"{t['kway']:.0f}"),
    ]
    print(f"{'':34}{'single adapter':>16}{'K-way (K=' + str(len(r['adapters'])) + ')':>16}")
    for label, a, k in rows:
        print(f"{label:34}{a:>16}{k:>16}")


if __name__ == "__main__":
    main()
