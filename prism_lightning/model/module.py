"""PrismModule: joint gate + LoRA self-distillation in one LightningModule. It builds the model, gathers a
batch's routes and class weights, and logs; the step itself (passes and losses) is the functions of
``training_step.py``."""

from __future__ import annotations

import dataclasses
import functools
import math

import lightning as L
import torch
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryF1Score

from prism_lightning.backbone import BackboneConfig, resolve_dtype
from prism_lightning.errors import require
from prism_lightning.model.checks import check_module_settings
from prism_lightning.model.fingerprint import weight_fingerprint
from prism_lightning.model.gate import Gate
from prism_lightning.model.kway import check_adapter_groups, persona_routes
from prism_lightning.model.kway_routing import KWayRoutingController
from prism_lightning.model.route_rule import gate_routes
from prism_lightning.model.routing import (
    DEFAULT_TARGET_MODULES,
    RoutingController,
    apply_lora,
    decoder_layers,
)
from prism_lightning.model.schedule import format_plan, lr_factor, training_plan
from prism_lightning.model.sharding import shard_module
from prism_lightning.model.training_step import (
    balanced_class_weights,
    compile_layers,
    distill_step,
    features_until_gate,
    route_counts,
    route_targets,
)

# .ckpt files store the hyperparameters, BackboneConfig included; let torch.load(weights_only=True)
# (Lightning's default when resuming) rebuild that plain dataclass.
torch.serialization.add_safe_globals([BackboneConfig])

_TARGETS = list(DEFAULT_TARGET_MODULES)


def _metrics(threshold: float) -> MetricCollection:
    return MetricCollection(
        {
            "gate_acc": BinaryAccuracy(threshold=threshold),
            "gate_auroc": BinaryAUROC(),
            "gate_f1": BinaryF1Score(threshold=threshold),
        }
    )


def _dtype_for(backbone: BackboneConfig, device: torch.device) -> BackboneConfig:
    """``backbone`` with its ``auto`` dtype fixed to the one it gets on ``device``."""
    dtype = str(resolve_dtype(backbone.dtype, device)).removeprefix("torch.")
    return dataclasses.replace(backbone, dtype=dtype)


class PrismModule(L.LightningModule):
    """Joint training of the gate (all rows) and the LoRA adapter (KL on distill rows).

    Args:
        backbone: the base model (HF id, local directory or embedded name) and how to load it.
        gate_layer: the gate reads the hidden state after this decoder layer; LoRA goes on the layers
            above it, so the routing decision is made inside the same prefill.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha (the update is scaled by alpha / r).
        lora_dropout: dropout on the LoRA input, in [0, 1).
        lora_target_modules: projections that get LoRA; must exist in the model's decoder layers.
        gate_hidden: hidden widths of the gate MLP.
        gate_lr: learning rate of the gate.
        lora_lr: learning rate of the adapter.
        weight_decay: AdamW weight decay (matrices only for the gate).
        warmup_ratio: share of the optimiser steps spent warming up, in [0, 1).
        lr_schedule: cosine, linear or constant after warmup.
        kl_temperature: distillation temperature T (the loss is scaled by T^2).
        retain_weight: weight of the optional retain loss (adapter-on vs base on retain rows); 0 skips
            it, and retain rows then stop after the gate layer.
        gradient_checkpointing: recompute activations in backward to save memory.
        kl_chunk_positions: 0 computes the full-vocabulary logits at the response positions before the
            top-k KL; N > 0 computes only the logits at the teacher's top-k ids, N positions at a time
            (the same loss and gradients, without a (positions, vocabulary) tensor).
        compile_layers: ``torch.compile`` the decoder layers above the gate layer while training
            (dynamic shapes; the first steps pay the compilation).
        threshold: gate probability at which the adapter turns on, in (0, 1).
        gate_dropout: dropout inside the gate MLP, in [0, 1).
        predict_mode: routing in ``predict``: gated, on (adapter always) or off (base model).
        predict_max_new_tokens: answer length in ``predict``.
        predict_temperature: sampling temperature in ``predict`` (0 = greedy).
        predict_top_p: nucleus mass in ``predict``, in (0, 1].
        predict_batch_size: generation batch in ``predict``.
        checkpoint: an exported run to serve in ``predict``/``validate`` instead of a fresh adapter.
        adapters: K-way routing: {adapter name: [persona, ...]}, one adapter per group of personas (>= 2
            groups, every bootstrap persona in exactly one) and a (K+1)-way gate (none or adapter j);
            null: one adapter for all personas and an on/off gate.
    """

    def __init__(
        self,
        backbone: BackboneConfig = BackboneConfig(),
        gate_layer: int = 0,
        lora_rank: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] = _TARGETS,  # noqa: B006 - plain list for jsonargparse (never mutated)
        gate_hidden: list[int] = [128, 64],  # noqa: B006 - plain list for jsonargparse (never mutated)
        gate_lr: float = 1e-3,
        lora_lr: float = 2e-4,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        lr_schedule: str = "cosine",
        kl_temperature: float = 2.0,
        retain_weight: float = 0.0,
        gradient_checkpointing: bool = False,
        kl_chunk_positions: int = 0,
        compile_layers: bool = False,
        threshold: float = 0.5,
        gate_dropout: float = 0.1,
        predict_mode: str = "gated",
        predict_max_new_tokens: int = 256,
        predict_temperature: float = 0.0,
        predict_top_p: float = 1.0,
        predict_batch_size: int = 8,
        checkpoint: str | None = None,
        adapters: dict[str, list[str]] | None = None,
    ) -> None:
        super().__init__()
        check_module_settings(dict(locals()))
        self.adapter_groups = check_adapter_groups(adapters)  # None: the single adapter
        require(
            adapters is None or retain_weight == 0,
            "model.retain_weight needs the single adapter: K-way routing (model.adapters) has no adapter "
            "to turn on for retain rows; set model.retain_weight: 0.",
        )
        self.save_hyperparameters()
        self.backbone_config = backbone
        self.model = None  # peft model, built in configure_model()
        self.gate: Gate | None = None
        self.controller: RoutingController | None = None
        self.tokenizer = None
        self.formatter = None
        self.backbone_name = backbone.model
        self.backbone_source: str | None = None
        self._sharded = False  # set by configure_model under the FSDP strategy
        self.plan: dict[str, int | None] = {}  # rows, batches and steps of the last fit (training_plan)
        # Only the adapter and gate go into .ckpt files (the base is reloaded from its source).
        self.strict_loading = False
        self.train_metrics = _metrics(threshold)
        self.val_metrics = _metrics(threshold)
        self.test_metrics = _metrics(threshold)
        self.train_route_rate = MeanMetric()
        self.val_route_rate = MeanMetric()
        self.test_route_rate = MeanMetric()
        if self.adapter_groups is not None:
            self._add_route_metrics(len(self.adapter_groups) + 1)
        self._persona_routes: torch.Tensor | None = None  # persona index -> route (K-way)

    # -- model ------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the backbone, add LoRA above the gate layer, build gate + controller (idempotent)."""
        if self.model is not None:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        sharded = self._shard_for_trainer()
        # Sharded: load on the host in the device's dtype; fully_shard moves each rank's shards over. With
        # several processes only rank 0 reads the base; the others get their shards from it.
        compute, load_on = (device, torch.device("cpu")) if sharded else (None, device)
        from_rank0 = sharded and self.trainer.world_size > 1 and not self.hparams.checkpoint
        if self.hparams.checkpoint:
            self.attach_checkpoint(self.hparams.checkpoint, load_on, dtype_for=compute)
        else:
            backbone = self.backbone_config if compute is None else _dtype_for(self.backbone_config, compute)
            reads = not from_rank0 or self.global_rank == 0
            self.attach_backbone(backbone.load(device=load_on, weights=reads))
        if sharded:
            mesh = self.device_mesh["data_parallel"]
            shard_module(self, decoder_layers(self.model), mesh, from_rank0=from_rank0)
            self._sharded = True

    def _shard_for_trainer(self) -> bool:
        """FSDP2 under the sharded strategy, except for predict: generation calls the model outside the
        sharded step methods, so predict keeps a whole model per process."""
        if self._trainer is None:
            return False
        from lightning.pytorch.strategies import ModelParallelStrategy
        from lightning.pytorch.trainer.states import TrainerFn

        strategy = self.trainer.strategy
        return isinstance(strategy, ModelParallelStrategy) and self.trainer.state.fn != TrainerFn.PREDICTING

    def attach_checkpoint(
        self, path: str, device: torch.device | str, *, dtype_for: torch.device | None = None
    ) -> None:
        """Serve an exported run (predict/validate): base, adapter and gate come from the export, so
        its base-model check applies and the gate layer is the one it was trained with. ``dtype_for``:
        load in the dtype the base would have on that device (a sharded model loads on the host)."""
        from prism_lightning.model.export import load_checkpoint, read_meta

        override = None
        if dtype_for is not None:
            override = _dtype_for(BackboneConfig(**read_meta(path)["base_model"]["backbone"]), dtype_for)
        routed = load_checkpoint(path, device=device, backbone_override=override)
        self.model, self.gate, self.controller = routed.model, routed.gate, routed.controller
        if routed.adapters and self.adapter_groups != routed.adapters:  # a K-way export: its groups rule
            self.adapter_groups = dict(routed.adapters)
            self._persona_routes = None
            self._add_route_metrics(len(routed.adapters) + 1, device)
        self.tokenizer, self.formatter = routed.tokenizer, routed.formatter
        base = routed.meta["base_model"]
        self.backbone_name, self.backbone_source = base["name"], base["source"]

    def attach_backbone(self, bb) -> None:
        """Build adapter, gate and controller on an already loaded ``Backbone`` (benchmarks, tests)."""
        hp = self.hparams
        net = bb.model
        device = next(net.parameters()).device
        for p in net.parameters():
            p.requires_grad_(False)
        net.train()  # load_backbone returns eval mode; Lightning sets eval for validate/predict
        groups = self.adapter_groups
        self.model = apply_lora(
            net,
            gate_layer=hp.gate_layer,
            rank=hp.lora_rank,
            alpha=hp.lora_alpha,
            dropout=hp.lora_dropout,
            target_modules=hp.lora_target_modules,
            adapter_names=list(groups) if groups else None,
        )
        if hp.gradient_checkpointing:
            # Non-reentrant checkpointing does not need inputs that require grad (the reentrant
            # variant does, which is why peft's recipe calls enable_input_require_grads()); leaving
            # them off keeps the frozen embeddings and layers <= k out of the autograd graph.
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            net.config.use_cache = False
        n_classes = len(groups) + 1 if groups else 1
        self.gate = Gate(bb.hidden_size, hp.gate_hidden, dropout=hp.gate_dropout, n_classes=n_classes)
        self.gate.to(device)
        if groups:
            self.controller = KWayRoutingController(
                self.model, self.gate, hp.gate_layer, list(groups), threshold=hp.threshold
            )
        else:
            self.controller = RoutingController(self.model, self.gate, hp.gate_layer, threshold=hp.threshold)
        self.tokenizer, self.formatter = bb.tokenizer, bb.formatter
        self.backbone_name, self.backbone_source = bb.name, bb.source
        self.base_weights_fingerprint = weight_fingerprint(net)  # before any sharding; stored at export

    def _require_model(self) -> None:
        if self.model is None:
            self.configure_model()

    @property
    def base_model(self):
        return self.model.get_base_model()

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if p.requires_grad and "lora_" in n]

    # -- training -----------------------------------------------------------------------------------
    def compile_training_layers(self, enabled: bool = True) -> None:
        """Compile (or back to eager) the decoder layers above the gate layer, the ones that carry LoRA."""
        self._require_model()
        compile_layers(decoder_layers(self.model)[self.hparams.gate_layer + 1 :], enabled)

    def on_train_end(self) -> None:
        if self.hparams.compile_layers:
            self.compile_training_layers(False)

    def on_train_start(self) -> None:
        """Standardise the gate's input with the training rows' feature statistics (see Gate): one
        pass over the train split through layers <= k only. Sharded, every rank runs the same number
        of batches (Lightning's distributed sampler pads), as the layers' all-gathers need. With
        ``compile_layers``, the layers above the gate are compiled from here to the end of training."""
        if self.hparams.compile_layers:
            self.compile_training_layers(True)
        total = total_sq = count = None
        with torch.no_grad():
            for batch in self.trainer.train_dataloader:
                ids = batch["input_ids"].to(self.device)
                attn = batch["attention_mask"].to(self.device)
                feats = self._gate_features_batch(ids, attn, batch["prompt_lengths"].to(self.device) - 1)
                feats = feats.double()
                s, sq = feats.sum(0), (feats * feats).sum(0)
                n = torch.tensor(float(feats.shape[0]), dtype=torch.float64, device=feats.device)
                total, total_sq, count = (
                    (s, sq, n) if total is None else (total + s, total_sq + sq, count + n)
                )
        if total is None:
            return
        # every rank standardises with the statistics of all ranks' rows
        total = self.trainer.strategy.reduce(total, reduce_op="sum")
        total_sq = self.trainer.strategy.reduce(total_sq, reduce_op="sum")
        count = self.trainer.strategy.reduce(count, reduce_op="sum")
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0.0)
        self.gate.set_feature_stats(mean.float(), var.sqrt().float())

    def _gate_features_batch(
        self, ids: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Gate features of a batch on their own (a sharded model registers this as an FSDP forward
        method, so the embeddings are gathered around it)."""
        return features_until_gate(self.model, self.controller, ids, attn, positions)

    def _gate_route_probs_batch(
        self, ids: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """(B,) P(route to an adapter) from the current gate (K-way: 1 - P(none)); the gate's train/eval
        mode is the caller's. A sharded model registers this as an FSDP forward method, so the gate's
        and the layers' shards are gathered around it."""
        probs = self.gate.probs(features_until_gate(self.model, self.controller, ids, attn, positions))
        return 1.0 - probs[:, 0] if probs.dim() == 2 else probs

    def setup(self, stage: str) -> None:
        dm = self._datamodule()
        if self.adapter_groups is not None and dm is not None and hasattr(dm, "persona_names"):
            self.set_persona_names(dm.persona_names)

    def set_persona_names(self, names: list[str]) -> None:
        """K-way: map the data module's persona indices to routes (every persona must be in one group)."""
        self._persona_routes = persona_routes(self.adapter_groups, names)

    def _add_route_metrics(self, n_routes: int, device: torch.device | str | None = None) -> None:
        """K-way: accuracy over none + K adapters (the binary metrics score P(any adapter))."""
        from torchmetrics.classification import MulticlassAccuracy

        for stage in ("train", "val", "test"):
            metric = MulticlassAccuracy(num_classes=n_routes, average="micro")
            setattr(self, f"{stage}_route_acc", metric.to(device) if device is not None else metric)

    def _datamodule(self):
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def _routes(self, batch: dict) -> torch.Tensor:
        """(B,) routes of a batch: 0 retain, 1 distill (one adapter) or its persona's adapter (K-way)."""
        if self.adapter_groups is None:
            return route_targets(batch["gate_target"])
        if self._persona_routes is None:
            dm = self._datamodule()
            if dm is None or not hasattr(dm, "persona_names"):
                raise RuntimeError("K-way training needs the persona names: call set_persona_names() first.")
            self.set_persona_names(dm.persona_names)
        return route_targets(batch["gate_target"], batch["persona_index"], self._persona_routes)

    def _class_weights(self, routes: torch.Tensor) -> torch.Tensor:
        """n_retain / n_route per route over the train split (the batch's routes without a data module)."""
        dm = self._datamodule()
        n_routes = len(self.adapter_groups) + 1 if self.adapter_groups is not None else 2
        counts = route_counts(
            routes,
            n_routes,
            class_counts=getattr(dm, "class_counts", None),
            distill_per_persona=getattr(dm, "distill_per_persona", None),
            groups=self.adapter_groups,
        )
        return balanced_class_weights(counts)

    def _common_step(self, batch: dict, batch_idx: int, stage: str) -> dict[str, torch.Tensor]:
        """The training step on one batch (registered as an FSDP forward method) and its gate metrics."""
        hp = self.hparams
        routes = self._routes(batch)
        out = distill_step(
            self.model,
            self.controller,
            self.gate,
            batch,
            routes,
            self._class_weights(routes),
            kl_temperature=hp.kl_temperature,
            retain_weight=hp.retain_weight,
            sharded=self._sharded,
            kl_chunk_positions=hp.kl_chunk_positions,
        )
        logits = out.gate_logits.detach().float()
        if logits.dim() == 1:
            p_route = torch.sigmoid(logits)
        else:  # K-way: P(any adapter), and the route accuracy
            probs = torch.softmax(logits, dim=-1)
            p_route = 1.0 - probs[:, 0]
            getattr(self, f"{stage}_route_acc").update(gate_routes(probs, hp.threshold), routes)
        getattr(self, f"{stage}_metrics").update(p_route, batch["gate_target"].long())
        getattr(self, f"{stage}_route_rate").update((p_route >= hp.threshold).float())
        return out.logged()

    def _log_step(self, out: dict, stage: str, bsz: int) -> None:
        on_step = stage == "train"
        sync = stage != "train"
        for key in ("loss", "gate_loss", "kl", "retain_kl"):
            self.log(
                f"{stage}/{key}", out[key].detach(), on_step=on_step, on_epoch=True,
                prog_bar=key in ("loss", "kl"), batch_size=bsz, sync_dist=sync,
            )  # fmt: skip
        metrics, rate = getattr(self, f"{stage}_metrics"), getattr(self, f"{stage}_route_rate")
        for name, metric in metrics.items():
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, batch_size=bsz)
        self.log(f"{stage}/routing_rate", rate, on_step=False, on_epoch=True, batch_size=bsz)
        if self.adapter_groups is not None:
            acc = getattr(self, f"{stage}_route_acc")
            self.log(f"{stage}/route_acc", acc, on_step=False, on_epoch=True, batch_size=bsz)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self._common_step(batch, batch_idx, "train")
        loss = out["loss"]
        # Raise here, before backward and the optimizer step: the weights (and any checkpoint
        # written so far) stay those of the last good step.
        if not torch.isfinite(loss.detach()).item():
            raise FloatingPointError(
                f"Non-finite training loss ({loss.item()}) at global step {self.global_step}, "
                f"batch index {batch_idx} (gate loss {out['gate_loss'].item()}, KL {out['kl'].item()}, "
                f"retain {out['retain_kl'].item()}). Lower the learning rate or check the batch."
            )
        self._log_step(out, "train", batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self._common_step(batch, batch_idx, "val")
        self._log_step(out, "val", batch["input_ids"].shape[0])
        return out["loss"]

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """`test` scores the held-out split (the bootstrap has no third split) under "test/" keys."""
        out = self._common_step(batch, batch_idx, "test")
        self._log_step(out, "test", batch["input_ids"].shape[0])
        return out["loss"]

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for p in self.gate.parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [
            {"params": decay, "lr": hp.gate_lr, "weight_decay": hp.weight_decay, "name": "gate"},
            {"params": no_decay, "lr": hp.gate_lr, "weight_decay": 0.0, "name": "gate_no_decay"},
            {
                "params": self.lora_parameters(),
                "lr": hp.lora_lr,
                "weight_decay": hp.weight_decay,
                "name": "lora",
            },
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]])
        total = self.trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) else 0
        warmup = int(round(total * hp.warmup_ratio)) if total else 0
        self.plan = training_plan(self.trainer, total, warmup)
        if self.trainer.is_global_zero:
            print(format_plan(self.plan), flush=True)

        factor = functools.partial(lr_factor, warmup=warmup, total=total, schedule=hp.lr_schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the trainable weights (adapter + gate) in .ckpt files; the frozen base is
        reloaded from its source by configure_model()."""
        keep = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k in keep or not k.startswith("model.")}

    # -- inference ----------------------------------------------------------------------------------
    def sampling(self):
        from prism_lightning.generation import SamplingConfig

        hp = self.hparams
        return SamplingConfig(
            max_new_tokens=hp.predict_max_new_tokens,
            temperature=hp.predict_temperature,
            top_p=hp.predict_top_p,
        )

    def predict_step(self, batch: list[dict], batch_idx: int = 0, dataloader_idx: int = 0) -> list[dict]:
        """Routed generation for rows {"id", "query"} (raw user text, no persona)."""
        from prism_lightning.model.inference import routed_generate

        self._require_model()
        prompts = [self.formatter.prompt(row["query"]) for row in batch]
        outs = routed_generate(
            self.model,
            self.tokenizer,
            self.controller,
            prompts,
            mode=self.hparams.predict_mode,
            threshold=self.hparams.threshold,
            sampling=self.sampling(),
            batch_size=self.hparams.predict_batch_size,
        )
        out = [
            {"id": row.get("id"), "query": row["query"], "response": o.text, "route": o.route,
             "gate_prob": o.gate_prob}
            for row, o in zip(batch, outs, strict=True)
        ]  # fmt: skip
        if isinstance(self.controller, KWayRoutingController):  # which adapter (null: the base model)
            for row, o in zip(out, outs, strict=True):
                row["adapter"] = o.adapter
        return out

    @torch.no_grad()
    def gate_probs(self, queries: list[str], *, batch_size: int = 32) -> list[float]:
        """Gate probabilities for raw queries (embeddings + layers <= k only)."""
        from prism_lightning.model.inference import prompt_gate_probs

        self._require_model()
        prompts = [self.formatter.prompt(q) for q in queries]
        probs = prompt_gate_probs(self.model, self.tokenizer, self.controller, prompts, batch_size=batch_size)
        if probs.dim() == 2:  # K-way: the probability of any adapter, 1 - P(none)
            probs = 1.0 - probs[:, 0]
        return probs.tolist()

    def routing_rate(self, queries: list[str], *, threshold: float | None = None) -> float:
        thr = self.hparams.threshold if threshold is None else threshold
        probs = self.gate_probs(queries)
        return sum(p >= thr for p in probs) / max(1, len(probs))

    def training_config(self) -> dict:
        """JSON-friendly hyperparameters (for prism.json)."""
        out = {}
        for k, v in dict(self.hparams).items():
            out[k] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        return out
