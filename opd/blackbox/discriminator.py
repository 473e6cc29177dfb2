"""GAD's discriminator: a copy of the student's decoder with a scalar head, and its BT loss.

    D(x, y) = w · h_last(x ⊕ y)          h_last: the decoder's final hidden state (after the
                                         final norm) at the last non-pad token of prompt ⊕
                                         response; w ∈ R^D, no bias (the loss below is
                                         invariant to a shared offset), initialised to 0

For a prompt x with the teacher's response y_t and the student's responses y_s,1..G, each pair
(y_t, y_s,i) contributes the Bradley–Terry (logistic) loss

    ℓ_i = −log σ(D(x, y_t) − D(x, y_s,i))
    ∂ℓ_i/∂D(x, y_t) = −σ(D(x, y_s,i) − D(x, y_t)),   ∂ℓ_i/∂D(x, y_s,i) = +σ(D(x, y_s,i) − D(x, y_t))

and the discriminator minimises the mean of ℓ over all pairs of the optimizer step (its own
AdamW, constant learning rate, gradient clipped to `max_grad_norm`). A pair is "separated" when
D(x, y_t) > D(x, y_s,i): the share of separated pairs is the discriminator's accuracy.

`optimizer_state` / `load_optimizer_state` turn an optimizer's `state_dict` into a tree of
dicts, tensors and JSON values (string keys), which opd's checkpoint stores (tensors in
components.safetensors), and back.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor


def bt_loss(teacher_score_P: Tensor, student_score_P: Tensor) -> Tensor:
    """(P,) −log σ(D(y_t) − D(y_s)) per pair (module doc)."""
    return -F.logsigmoid(teacher_score_P - student_score_P)


def last_token_index(attention_mask_BL: Tensor) -> Tensor:
    """(B,) the position of each row's last non-pad token (the row's last 1 in the mask)."""
    L = attention_mask_BL.shape[1]
    pos_BL = torch.arange(L, device=attention_mask_BL.device).expand_as(attention_mask_BL)
    return torch.where(attention_mask_BL.bool(), pos_BL, -1).max(dim=1).values.clamp_min(0)


class Discriminator(torch.nn.Module):
    """A copy of `student`'s decoder (final norm included) and a zero-initialised scalar head."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        decoder = student.get_decoder()
        if decoder is student:
            from opd.errors import ModelError

            raise ModelError(
                f"gad: the student ({type(student).__name__}) has no separate decoder to copy "
                "into the discriminator"
            )
        self.decoder = copy.deepcopy(decoder)
        param = next(self.decoder.parameters())
        width = student.get_output_embeddings().weight.shape[1]
        self.head = torch.nn.Linear(width, 1, bias=False, device=param.device, dtype=param.dtype)
        torch.nn.init.zeros_(self.head.weight)
        self.decoder.requires_grad_(True)

    def forward(self, input_ids_BL: Tensor, attention_mask_BL: Tensor) -> Tensor:
        """(B,) scores D(x ⊕ y) at each row's last non-pad token."""
        device = self.head.weight.device
        ids, mask = input_ids_BL.to(device), attention_mask_BL.to(device)
        out = self.decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        hidden_BLD = out.last_hidden_state
        last_B = last_token_index(mask)
        rows_B = torch.arange(hidden_BLD.shape[0], device=device)
        return self.head(hidden_BLD[rows_B, last_B]).squeeze(-1)


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict with string keys (tensors kept, by reference)."""
    sd = optimizer.state_dict()
    return {
        "state": {str(k): dict(v) for k, v in sd["state"].items()},
        "param_groups": [
            {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
            for g in sd["param_groups"]
        ],
    }


def load_optimizer_state(optimizer: torch.optim.Optimizer, tree: dict) -> None:
    """The inverse of `optimizer_state` (integer parameter ids, betas as a tuple)."""
    groups = []
    for g in tree["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        g["params"] = [int(i) for i in g["params"]]
        groups.append(g)
    state = {int(k): dict(v) for k, v in tree.get("state", {}).items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups})
