"""The training forward of :class:`~prism_lightning.model.module.PrismModule`: gate features read by the
layer-k hook and the decoder output, with retain rows optionally stopping after layer k."""

from __future__ import annotations

import torch

from prism_lightning.model.routing import decoder_layers, inner_model


class StudentForward:
    """Mixin for PrismModule (uses its ``model`` and ``controller``)."""

    def _gate_features_batch(
        self, ids: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Gate features of a batch on their own (a sharded model registers this as an FSDP forward
        method, so the embeddings are gathered around it)."""
        return self._features_until_gate(ids, attn, positions)

    def _features_until_gate(
        self, ids: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Embeddings + layers <= k; the controller ends the forward after layer k, before FSDP's
        post-forward hook of that layer, which is why a sharded layer k is resharded here."""
        from prism_lightning.model.sharding import reshard

        feats = self.controller.gate_features(ids, attn, positions)
        reshard(decoder_layers(self.model)[self.controller.gate_layer])
        return feats

    def _student_forward(
        self,
        ids: torch.Tensor,
        attn: torch.Tensor,
        prompt_len: torch.Tensor,
        distill: torch.Tensor,
        mask: torch.Tensor | float,
        split: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The training forward with the adapter ``mask`` set: gate features for every row (read by the
        layer-k hook at the last prompt token) and the decoder output. With ``split`` only the distill rows
        run the full stack (``mask`` is theirs) and the others stop after the gate layer. Returns the
        hidden states, the features, each row's index into the hidden states (-1: none) and their width."""
        decoder = inner_model(self.model)
        ctl = self.controller
        bsz = ids.shape[0]
        if not split:
            ctl.set_mask(mask)
            ctl.arm(prompt_len - 1, decide=False)
            hidden = decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
            feats = ctl.features
            if feats is None:
                raise RuntimeError("The gate-layer hook did not capture features.")
            return hidden, feats, torch.arange(bsz, device=ids.device), ids.shape[1]
        retain = ~distill
        with torch.no_grad():
            width_r = int(attn[retain].sum(-1).max())
            feats_r = self._features_until_gate(
                ids[retain, :width_r], attn[retain, :width_r], prompt_len[retain] - 1
            )
        width = int(attn[distill].sum(-1).max())
        ctl.set_mask(mask)
        ctl.arm(prompt_len[distill] - 1, decide=False)
        hidden = decoder(
            input_ids=ids[distill, :width], attention_mask=attn[distill, :width], use_cache=False
        ).last_hidden_state
        if ctl.features is None:
            raise RuntimeError("The gate-layer hook did not capture features.")
        feats = feats_r.new_empty((bsz, feats_r.shape[-1]))
        feats[retain], feats[distill] = feats_r, ctl.features.to(feats_r.dtype)
        hidden_rows = torch.full((bsz,), -1, dtype=torch.long, device=ids.device)
        hidden_rows[distill] = torch.arange(int(distill.sum()), device=ids.device)
        return hidden, feats, hidden_rows, width
