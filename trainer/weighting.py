"""Per-example loss weights and the L2 anchor, added to trl's SFT, DPO and KTO trainers.

How a record's ``weight`` enters the loss: the collator carries a ``weight`` tensor beside
the batch; ``compute_loss`` takes it out and, for the duration of trl's own loss, hooks
the model's backbone so that the gradient flowing back from each row's final hidden state
is multiplied by that row's weight. Every loss used here is a sum of per-example terms
that each depend only on their own rows (causal LMs never mix rows; the DPO pair's two
rows share the pair's weight; KTO's KL estimate is detached), so this gives exactly the
gradient of ``sum_i weight_i * loss_i`` while trl's loss code, metrics and fused LM head
stay untouched. The logged loss is trl's unweighted one. Reference and KL forwards run
without gradient and pass through unchanged.

``anchor_l2 * sum((theta - theta_parent)^2)`` over the LoRA weights is added to the loss
when configured: it keeps the adapter near its parent (forgetting control).
"""

from collections.abc import Callable
from typing import Any

import torch
from trl import DPOTrainer, KTOTrainer, SFTTrainer

WEIGHT = "weight"

Anchor = dict[str, torch.Tensor]


class _ScaleRowGrad(torch.autograd.Function):
    """Identity forward; backward multiplies row i of the gradient by weights[i]."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weights)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weights,) = ctx.saved_tensors
        return grad * weights.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1))), None


def _scale_rows_hook(row_weights: torch.Tensor) -> Callable:
    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
        hidden = output.last_hidden_state
        if not hidden.requires_grad:  # reference and KL forwards: nothing to weight
            return output
        if hidden.size(0) != row_weights.numel():
            raise RuntimeError(f"{hidden.size(0)} rows in the forward but {row_weights.numel()} example weights")
        output.last_hidden_state = _ScaleRowGrad.apply(hidden, row_weights.to(hidden.device))
        return output

    return hook


def snapshot_lora(model: torch.nn.Module) -> Anchor:
    """A detached copy of the trainable (LoRA) weights: the anchor's target."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def anchor_penalty(model: torch.nn.Module, anchor: Anchor, coefficient: float) -> torch.Tensor | float:
    if coefficient == 0:
        return 0.0
    params = dict(model.named_parameters())
    return coefficient * sum(((params[name] - ref) ** 2).sum() for name, ref in anchor.items())


class WeightedLossMixin:
    """Per-example weights (see module doc) and the optional L2 anchor for a trl trainer."""

    rows_per_example = 1  # DPO puts [chosen; rejected] in one forward: 2

    def __init__(self, *args: Any, anchor: Anchor | None = None, anchor_l2: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._anchor, self._anchor_l2 = anchor or {}, anchor_l2
        self._backbone = self.accelerator.unwrap_model(self.model).get_decoder()
        self.data_collator = _WeightCollator(self.data_collator)

    def _set_signature_columns_if_needed(self) -> None:
        # Keep the weight column through Trainer's removal of columns the model does not take.
        super()._set_signature_columns_if_needed()
        if WEIGHT not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, WEIGHT]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN201
        row_weights = inputs.pop(WEIGHT).repeat(self.rows_per_example)
        handle = self._backbone.register_forward_hook(_scale_rows_hook(row_weights))
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
        penalty = anchor_penalty(model, self._anchor, self._anchor_l2)
        if return_outputs:
            return result[0] + penalty, result[1]
        return result + penalty


class _WeightCollator:
    """Wraps trl's collator: takes the weights out of the examples, adds them to the batch."""

    def __init__(self, inner: Callable) -> None:
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        weights = torch.tensor([example.pop(WEIGHT) for example in examples], dtype=torch.float32)
        batch = self.inner(examples)
        batch[WEIGHT] = weights
        return batch


class WeightedSFTTrainer(WeightedLossMixin, SFTTrainer):
    pass


class WeightedDPOTrainer(WeightedLossMixin, DPOTrainer):
    rows_per_example = 2


class WeightedKTOTrainer(WeightedLossMixin, KTOTrainer):
    pass
