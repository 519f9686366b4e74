"""PRISM's self-bootstrap: stages 1-3 of the method plus the teacher targets of stage 5.

``queries -> answers -> verdicts -> teacher``, each a Lightning ``trainer.predict`` run over the rows
it still lacks, stored under ``<run_dir>/bootstrap/<stage>-<hash12>/`` (see
:mod:`prism_lightning.bootstrap.store`). Entry points: :func:`run_bootstrap` (Python),
:func:`prism_lightning.lightning_cli.bootstrap_main` (``python -m prism_lightning bootstrap``).

Row schemas (``rows.jsonl`` of each stage; one JSON object per line)
-------------------------------------------------------------------
queries::

    {"id": "<persona>-<i>", "persona": str, "index": int, "query": str, "raw": str}

  Only kept queries; drops (``empty``, ``too_short``, ``duplicate``, ``near_duplicate``) are counted per
  persona in ``meta.json`` -> ``stats.dropped_by_reason`` and listed in ``stats.dropped_rows``.

answers::

    {"id", "persona", "query", "base_answer": str, "persona_answer": str,
     "base_finish": "stop"|"length", "persona_finish": "stop"|"length",
     "base_tokens": int, "persona_tokens": int}

  ``base_answer`` used ``formatter.prompt(query)`` (no persona: the same prompt in every stage);
  ``persona_answer`` used ``formatter.prompt(query, persona_text(length), placement)``. A reasoning model
  (its chat template opens ``<think>``) adds ``<side>_thinking``, ``<side>_thinking_tokens`` and
  ``<side>_thinking_closed`` (false: ``thinking_max_new_tokens`` ran out and the block was closed for it);
  the answer is what follows the block. Queries' shard rows and each verdict order carry the same three
  fields without the prefix.

verdicts::

    {"id", "persona", "query",
     "order_persona_first": {"raw": str, "parsed": "A"|"B"|"TIE"|null,
                             "logprobs": {"A": float, "B": float, "TIE": float}, "tokens": int},
     "order_base_first":    {... same ...},
     "strict_label": 0|1, "logprob_score": float, "logprob_label": 0|1,
     "gate_target": 0|1, "judge_tokens": int}

  In ``order_persona_first`` the persona answer is Assistant A; in ``order_base_first`` it is B.
  ``gate_target`` = the label of ``BootstrapConfig.verdict_rule`` (1 = distill, 0 = retain). An endpoint
  judge under the strict rule gives no option scores: ``logprobs``, ``logprob_score`` and ``logprob_label``
  are null.

teacher (distill rows only)::

    {"id", "persona", "n_tokens": int, "prompt_tokens": int, "top_k": int, "tensor_file": str}

  Tensors in ``<stage dir>/<tensor_file>`` (safetensors): ``"<id>.values"`` float16 (n, k) top-k logits of
  the persona-prompted base model at the positions predicting each response token,
  ``"<id>.indices"`` int32 (n, k), ``"<id>.response_ids"`` int32 (n,) (persona answer tokens, preceded by
  a reasoning model's thinking block, + the chat end-of-turn token, truncated to ``max_response_tokens``).

``<run_dir>/bootstrap/summary.json``: per stage (cached?, seconds, rows, tokens generated, tokens/s),
queries kept/dropped by reason per persona, a reasoning model's thinking blocks per stage (and how many
ran out of the budget), unparsable verdicts per order, the distill/retain split per
persona under both rules, the active rule and warnings.
"""

from prism_lightning.bootstrap.config import VERDICT_RULES, BootstrapConfig
from prism_lightning.bootstrap.runner import BootstrapResult, run_bootstrap, stage_stores
from prism_lightning.bootstrap.store import FORMAT_VERSION, IncompatibleRunError, StageStore
from prism_lightning.bootstrap.summary import format_summary

__all__ = [
    "FORMAT_VERSION",
    "VERDICT_RULES",
    "BootstrapConfig",
    "BootstrapResult",
    "IncompatibleRunError",
    "StageStore",
    "format_summary",
    "run_bootstrap",
    "stage_stores",
]
