"""The teacher-forced LM loss, summed over target tokens: the training objective, the eval split's loss and
`answer_nll` all compute it here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from multitune.data_prep.tokenize import IGNORE
from multitune.trainer.batches import MicroBatch


def token_loss_sum(model, batch: MicroBatch, attention_mask: torch.Tensor | None,
                   past_key_values=None) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) over the batch's target tokens; the LM head runs only at positions
    (columns of the `(rows, length)` batch) where some row has a target.

    `attention_mask`: None (flash-attn varlen), `attention_mask_for`'s block-diagonal mask, or a `(rows, cached +
    length)` padding mask when `past_key_values` holds a prefix every row shares (eval only: no gradient flows
    into a cache).
    """
    keep = (batch.targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    if keep.numel() == 0:  # an empty filler batch still runs forward/backward so ranks stay in step
        keep = torch.zeros(1, dtype=torch.long, device=batch.targets.device)
    out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=attention_mask,
                past_key_values=past_key_values, use_cache=past_key_values is not None, logits_to_keep=keep)
    logits = out.logits.float()
    targets = batch.targets[:, keep]
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
