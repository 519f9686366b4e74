"""The distillation losses: KL to the persona teacher's top-k, and the optional full-vocabulary retain KL."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_kl(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Per-token KL(teacher || student) on the teacher's top-k support, (N, V) x (N, K) -> (N,).

    Normalisation: both distributions are renormalised over the teacher's top-k tokens
    (softmax of the k logits / T). The teacher's mass outside its top-k was never stored, so the
    top-k support is the only one on which both distributions are known; on it this is a proper KL
    (>= 0, zero iff the student matches the teacher's top-k shape) that does not depend on how
    much mass the teacher left outside the top-k. With k = 64 and T = 2 that leftover mass is small,
    and the student starts as the same base model, so leaking mass outside the support is not an
    issue in practice (this is also the reference implementation's choice). Scaled by T^2.
    """
    t = temperature
    student = student_logits.float().gather(-1, teacher_indices) / t
    teacher = teacher_values.float() / t
    p = F.softmax(teacher, dim=-1)
    kl = (p * (F.log_softmax(teacher, dim=-1) - F.log_softmax(student, dim=-1))).sum(-1)
    return kl * (t * t)


def full_kl(ref_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token KL(ref || student) over the full vocabulary at temperature T, scaled by T^2."""
    t = temperature
    ref = F.log_softmax(ref_logits.float() / t, dim=-1)
    stu = F.log_softmax(student_logits.float() / t, dim=-1)
    return (ref.exp() * (ref - stu)).sum(-1) * (t * t)
