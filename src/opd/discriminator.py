"""GAD's discriminator: black-box on-policy distillation from a teacher that returns only text.

Generative Adversarial Distillation (Ye et al., arXiv 2511.10643) treats the student as a
generator and trains a discriminator ``D(x, y)`` to prefer the teacher's answer over the
student's with a Bradley-Terry loss

    L_D = -log sigmoid( D(x, y_teacher) - D(x, y_student) ),

while the student maximises ``D(x, y_student)`` by policy gradient (GRPO: the score is a
sequence-level reward, normalised within each prompt's group of samples). The two co-evolve,
which the paper credits for resisting the reward hacking a frozen reward model invites.

The discriminator is a language-model backbone (by default the student's initial
checkpoint, as in the paper's scripts) with a scalar head read at the last token of the
response.
"""

from __future__ import annotations

from typing import Any

import torch

from opd.errors import ModelError
from opd.hooks import Hooks
from opd.rollout import SequenceBatch, build_batch
from opd.signal import TeacherSignal


class Discriminator(torch.nn.Module):
    """LM backbone + linear head; ``forward(batch)`` scores each sequence, ``[B]``."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(backbone.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)  # start neutral: every answer scores the bias
        torch.nn.init.zeros_(self.head.bias)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str = "float32", trust_remote_code: bool = False) -> Discriminator:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        # A causal-LM checkpoint loads into its backbone with the LM head left over, which
        # transformers reports at length; that is expected here.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            backbone = AutoModel.from_pretrained(path, dtype=getattr(torch, dtype),
                                                 trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the discriminator backbone {path!r}: {str(exc).splitlines()[0]}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        return cls(backbone)

    def forward(self, batch: SequenceBatch) -> torch.Tensor:  # type: ignore[override]
        device = self.head.weight.device
        ids_BT = batch.input_ids_BT.to(device)
        mask_BT = batch.attention_mask_BT.to(device)
        positions_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
        out = self.backbone(input_ids=ids_BT, attention_mask=mask_BT, position_ids=positions_BT)
        hidden_BTH = out.last_hidden_state
        # The last real token: the end of the completion (the prompt's last token if it is empty).
        lengths_B = batch.completion_mask_BC.sum(-1).long().to(device)
        last_B = batch.prompt_len - 1 + lengths_B
        rows_B = torch.arange(ids_BT.shape[0], device=device)
        return self.head(hidden_BTH[rows_B, last_B].to(self.head.weight.dtype)).squeeze(-1)


class DiscriminatorTrainer:
    """Owns the discriminator, its optimizer and the Bradley-Terry update."""

    def __init__(self, model: Discriminator, lr: float, max_grad_norm: float | None = 1.0,
                 reduce_grads: Any = None) -> None:
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        self.max_grad_norm = max_grad_norm
        self.reduce_grads = reduce_grads  # averages gradients across processes (DDP without a wrapper)

    @torch.no_grad()
    def rewards(self, batch: SequenceBatch) -> torch.Tensor:
        """``D(x, y)`` of each sequence, used as the student's sequence-level reward."""
        self.model.eval()
        return self.model(batch).float()

    def update(self, student: SequenceBatch, teacher: SequenceBatch, pair_B: torch.Tensor) -> dict[str, float]:
        """One Bradley-Terry step on (teacher answer, student answer) pairs; ``pair_B[i]`` is the
        row of ``teacher`` holding the teacher's answer to student row ``i``'s prompt."""
        self.model.train()
        teacher_scores = self.model(teacher)
        student_scores = self.model(student)
        margin_B = teacher_scores[pair_B.to(teacher_scores.device)] - student_scores
        loss = -torch.nn.functional.logsigmoid(margin_B).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.reduce_grads is not None:
            self.reduce_grads(self.model)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.model.eval()
        return {
            "discriminator/loss": float(loss.detach()),
            "discriminator/accuracy": float((margin_B > 0).float().mean()),
            "discriminator/teacher_score": float(teacher_scores.detach().mean()),
            "discriminator/student_score": float(student_scores.detach().mean()),
        }


class DiscriminatorReward(Hooks):
    """GAD's teacher signal: each student answer's discriminator score as its sequence reward
    (``signal.rewards_B``), scored by the discriminator as it was when the answers were drawn; then
    one Bradley-Terry update on (teacher answer, student answer) pairs of the same prompts.

    ``teacher_text`` holds one teacher answer per training prompt (keyed by ``id(example)``). The
    discriminator and its optimizer are training state (checkpointed through :class:`Hooks`).
    """

    def __init__(self, trainer: DiscriminatorTrainer, teacher_text: dict[int, list[int]], samples_per_prompt: int,
                 pad_id: int) -> None:
        self.trainer = trainer
        self.teacher_text = teacher_text
        self.samples_per_prompt = samples_per_prompt
        self.pad_id = pad_id

    def add(self, batch: SequenceBatch, signal: TeacherSignal) -> None:
        if batch.examples is None or batch.group_B is None:
            raise ModelError("GAD needs the examples and groups behind the batch")
        device = self.trainer.model.head.weight.device
        # Full precision, as the discriminator was built: the run's autocast is for the student.
        with torch.autocast(device.type, enabled=False):
            signal.rewards_B = self.trainer.rewards(batch)
            prompts = batch.examples[:: self.samples_per_prompt]
            teacher_batch = build_batch([e.prompt_ids for e in prompts], [self.teacher_text[id(e)] for e in prompts],
                                        self.pad_id)
            signal.metrics.update(self.trainer.update(batch, teacher_batch, batch.group_B))

    def state_dict(self) -> dict[str, Any]:
        return {"discriminator": self.trainer.model, "discriminator_optimizer": self.trainer.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.optimizer.load_state_dict(state["discriminator_optimizer"])
