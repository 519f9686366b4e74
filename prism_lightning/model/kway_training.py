"""K-way training for :class:`~prism_lightning.model.module.PrismModule`: route targets from the persona
groups, class weights, route accuracy, and the training step where each distill row runs its own adapter."""

from __future__ import annotations

import torch

from prism_lightning.model.gate import balanced_class_weights, kway_gate_loss
from prism_lightning.model.kway import persona_routes
from prism_lightning.model.losses import topk_kl
from prism_lightning.model.route_rule import gate_routes


class KWayTraining:
    """Mixin for PrismModule (uses its hparams, ``adapter_groups``, trainer, gate and controller)."""

    def _add_route_metrics(self, n_routes: int, device: torch.device | str | None = None) -> None:
        """K-way: accuracy over none + K adapters (the binary metrics score P(any adapter))."""
        from torchmetrics.classification import MulticlassAccuracy

        for stage in ("train", "val", "test"):
            metric = MulticlassAccuracy(num_classes=n_routes, average="micro")
            setattr(self, f"{stage}_route_acc", metric.to(device) if device is not None else metric)

    def set_persona_names(self, names: list[str]) -> None:
        """K-way: map the data module's persona indices to routes (every persona must be in one group)."""
        self._persona_routes = persona_routes(self.adapter_groups, names)

    def _route_targets(self, batch: dict) -> torch.Tensor:
        """Per row: 0 for retain, the route of the adapter holding the row's persona for distill."""
        if self._persona_routes is None:
            dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            if dm is None or not hasattr(dm, "persona_names"):
                raise RuntimeError("K-way training needs the persona names: call set_persona_names() first.")
            self.set_persona_names(dm.persona_names)
        index = batch["persona_index"]
        lut = self._persona_routes.to(index.device)
        distill = batch["gate_target"] > 0
        if bool((distill & (index < 0)).any()):
            raise RuntimeError("a distill row has no persona index; K-way routing cannot place it.")
        return torch.where(distill, lut[index.clamp(min=0)], torch.zeros_like(index))

    def _class_weights(self, routes: torch.Tensor) -> torch.Tensor:
        """n_retain / n_class per route over the train split (as the binary gate's pos_weight)."""
        n = len(self.adapter_groups) + 1
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        per_persona = getattr(dm, "distill_per_persona", None)
        if per_persona:
            counts = [float(dm.class_counts.get("retain", 0))] + [
                float(sum(per_persona.get(p, 0) for p in group)) for group in self.adapter_groups.values()
            ]
        else:
            counts = torch.bincount(routes.long().cpu(), minlength=n).float().tolist()
        return balanced_class_weights(counts)

    def _kway_step(self, batch: dict, stage: str) -> dict[str, torch.Tensor]:
        """Each distill row runs with its persona's adapter (one forward, mixed routes), so each adapter
        distils only its own personas' rows; retain rows stop after the gate layer (as in the
        single-adapter step). The (K+1)-way gate learns the routes from every row's features."""
        hp = self.hparams
        ids, attn = batch["input_ids"], batch["attention_mask"]
        prompt_len = batch["prompt_lengths"]
        target = batch["gate_target"].float()
        t_values, t_indices, t_mask = batch["teacher_values"], batch["teacher_indices"], batch["teacher_mask"]
        routes = self._route_targets(batch)
        bsz, width = ids.shape
        steps = torch.arange(t_values.shape[1], device=ids.device)
        pos = (prompt_len[:, None] - 1 + steps[None]).clamp(max=width - 1)
        rows = torch.arange(bsz, device=ids.device)[:, None].expand_as(pos)
        distill = target > 0
        split = not (self._sharded or not bool(distill.any()) or bool(distill.all()))  # sharded: same layers
        hidden, feats, hidden_rows, width = self._student_forward(
            ids, attn, prompt_len, distill, routes[distill] if split else routes, split
        )
        pos = pos.clamp(max=width - 1)
        gate_logits = self.gate(feats)
        g_loss = kway_gate_loss(gate_logits, routes, self._class_weights(routes))
        sel = t_mask.bool() & (target[:, None] > 0)
        n_tok = int(sel.sum())
        if n_tok > 0:
            logits = self.base_model.get_output_embeddings()(hidden[hidden_rows[rows[sel]], pos[sel]])
            kl = topk_kl(logits, t_values[sel], t_indices[sel], hp.kl_temperature).mean()
        else:  # keep every adapter parameter in the graph (DDP) with a zero loss
            kl = hidden.sum() * 0.0
        probs = torch.softmax(gate_logits.detach().float(), dim=-1)
        p_route = 1.0 - probs[:, 0]
        getattr(self, f"{stage}_metrics").update(p_route, target.long())
        getattr(self, f"{stage}_route_rate").update((p_route >= hp.threshold).float())
        getattr(self, f"{stage}_route_acc").update(gate_routes(probs, hp.threshold), routes)
        zero = torch.zeros((), device=ids.device)
        return {"loss": g_loss + kl, "gate_loss": g_loss, "kl": kl, "retain_kl": zero, "n_tokens": n_tok}
