"""Knowledge-distillation loss: the student's next-token distribution pulled towards the dense teacher's."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """`T² · mean over tokens of KL(softmax(teacher/T) ‖ softmax(student/T))` (Hinton et al.'s scaling).

    Logits are `[..., vocab]`; `mask` (same leading shape, 1 = scored) selects the tokens averaged over. The T²
    factor keeps the gradient's scale independent of the temperature, so a weight tuned at one T carries over.
    Computed in float32 whatever the logits' dtype.
    """
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the models must share the tokenizer")
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    if mask is None:
        mean = per_token.mean()
    else:
        mask = mask.to(per_token.dtype)
        mean = (per_token * mask).sum() / mask.sum().clamp_min(1.0)
    return mean * temperature**2
