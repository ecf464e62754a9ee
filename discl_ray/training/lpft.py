"""LP-FT (Kumar et al., 2022), a CLIP baseline of Table 5: linear probing, then full fine-tuning.

``training.head=linear`` replaces the text-tower head with a linear layer on normalised image features,
initialised from the zero-shot class embeddings (so epoch 0 starts at zero-shot accuracy, as in WiSE-FT's
linear classifier). For the first ``training.lp_epochs`` epochs only that layer learns, at ``training.lp_lr``;
afterwards every weight does. The text tower is dropped once the head is built: nothing else reads it, and
DDP refuses parameters that never receive a gradient.

Why gradients are dropped instead of ``requires_grad=False``: DDP fixes the set of trainable parameters when
it wraps the model, so the encoder must stay registered for the fine-tuning epochs. Setting its ``.grad`` to
None after the (already all-reduced) backward makes the optimizer skip it - no update, no weight decay.
"""

from __future__ import annotations

from torch import nn

from discl_ray.training.models import ClipClassifier, LinearHeadClip, unwrap  # noqa: F401


def in_linear_probe(tc, epoch: int) -> bool:
    return tc.head == "linear" and epoch < tc.lp_epochs


def epoch_lr(tc, epoch: int, lr: float) -> float:
    """The LR of ``epoch``: ``lp_lr`` (constant) during linear probing, else the schedule's value."""
    if in_linear_probe(tc, epoch) and tc.lp_lr is not None:
        return float(tc.lp_lr)
    return lr


def drop_encoder_grads(model: nn.Module, tc, epoch: int) -> None:
    """During linear probing, clear every gradient but the head's (call after backward, before step)."""
    if not in_linear_probe(tc, epoch):
        return
    for name, p in unwrap(model).named_parameters():
        if not name.startswith("head."):
            p.grad = None
