"""A ``transformers.Trainer`` whose loss weights each sequence (GRPO / Dr. GRPO policy gradients).

Each example carries ``loss_weight`` ``w_b`` (``engine.io.advantages.sequence_weights``: the
advantage, divided by the sequence's target count for GRPO). The micro-batch loss is
``sum_b w_b S_b / B`` (``S_b``: the sequence's summed token loss ``-log p``, ``B``: sequences in
the micro-batch), divided by the accumulation steps by the Trainer, i.e. the mean over the
sequences of an optimizer step as in GRPO's ``1/G`` average. ``AttributionCallback`` rows do not
depend on that reduction (they are ``w_b`` times the gradient of ``S_b``).
"""

from __future__ import annotations

from transformers import Trainer

from attribution_assets.engine.training.recorder import sequence_losses


class AdvantageTrainer(Trainer):
    """``Trainer`` minimizing ``sum_b w_b S_b / B`` per micro-batch (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the Trainer divides by the accumulation steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        if "loss_weight" not in inputs:
            raise ValueError("AdvantageTrainer needs a `loss_weight` per example (the sequence's "
                             "advantage weight); collate with AttributionCollator")
        weights = inputs.pop("loss_weight")
        outputs = model(**inputs)
        loss = (weights.to(outputs.logits.device) * sequence_losses(outputs.logits, inputs["labels"])).mean()
        return (loss, outputs) if return_outputs else loss
