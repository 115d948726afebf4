"""Padding-free micro-batches: every sequence of a micro-batch in one row, no pad token.

transformers' :class:`~transformers.DataCollatorWithFlattening` concatenates a micro-batch
into one row of shape ``[1, total]`` with ``position_ids`` that restart at 0 for every
sequence, and the label of each sequence's first token set to -100 (so no token learns to
predict the next sequence). Attention must then stay inside each sequence. transformers
does that for ``sdpa`` with a block-diagonal mask over the whole row, but on a CPU that
costs attention over ``total**2`` positions (a micro-batch of 8 demo sequences: 2.3 times
the attention of the padded batch, slower overall than padding). Here attention instead
runs on the row cut back into its sequences: query, key and value are gathered into
``[sequences, heads, longest, head_dim]`` (right-padded, so a causal mask alone keeps every
real query off the padding), one ``sdpa`` call with ``is_causal`` does them all, and the
real positions are gathered back. Only the attention sees padding; the projections, the
LoRA matrices, their dropout, the MLP and the LM head see real tokens only. The LM head and
the loss are further limited to the positions whose next token is trained (``shift_labels``
and ``logits_to_keep``): response-only labels leave most logits unused.

The loss is the same sum of per-token cross-entropies over the same trained tokens (the
Trainer divides by its count, ``num_items_in_batch``, taken from ``shift_labels``), so the
loss per token and the gradients equal the padded batch's up to float rounding.

A model is packed only where all of this is known to hold (:func:`packing_unsupported`):
a decoder whose attention goes through transformers' attention interface as ``sdpa``,
takes ``position_ids`` and has no sliding window; :func:`packing_matches_padding` then
checks the loss of a few examples packed against their loss padded before training starts.
Elsewhere the training loop pads (and says so). Note that transformers' own packed-sequence
detection (from ``position_ids``) is skipped whenever the model builds a cache, which a
config's ``use_cache: true`` does in training too: hence ``use_cache=False`` in every batch.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from milora.training.examples import IGNORE

logger = logging.getLogger(__name__)

PACKED_ATTENTION = "milora_packed_sdpa"


def _sequence_bounds(kwargs: dict[str, Any], length: int) -> tuple[torch.Tensor, int] | None:
    """``(cu_seq_lens, longest)`` of a packed row, or None for a row of one sequence."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        longest = kwargs.get("max_length_q")
        cu = cu.to(torch.long)
        if int(cu[-1]) != length:  # e.g. nn.DataParallel split the boundaries, not the row
            raise RuntimeError(f"packed row of {length} tokens but sequence bounds end at {int(cu[-1])}")
        if longest is None:
            longest = int(cu.diff().max())
        return (cu, int(longest)) if len(cu) > 2 else None
    positions = kwargs.get("position_ids")
    if positions is None or positions.dim() != 2 or positions.shape[0] != 1:
        return None
    positions = positions[0]
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[1:] = positions.diff() != 1  # the rule of transformers' find_packed_sequence_indices
    cu = torch.cat([starts.nonzero().flatten(), positions.new_tensor([length])])
    return (cu, int(cu.diff().max())) if len(cu) > 2 else None


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa`` attention, per sequence when the row holds several.

    Shapes as for any attention interface: ``query [1, heads, total, head_dim]`` in,
    ``[1, total, heads, head_dim]`` out. Anything but a packed row without a mask (padded
    batches, generation with a cache) goes to ``sdpa`` unchanged.
    """
    bounds = None
    if attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2] > 1:
        bounds = _sequence_bounds(kwargs, query.shape[2])
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    cu, longest = bounds
    sequences, total = len(cu) - 1, query.shape[2]
    starts, lengths = cu[:-1].to(query.device), cu.diff().to(query.device)
    steps = torch.arange(longest, device=query.device)
    valid = steps < lengths[:, None]  # [sequences, longest]
    # Row-major positions: the padded cell of every token, and the token of every cell (pad
    # cells read token 0; causality keeps them out of every real query's view). index_select
    # (backward: index_add) is far cheaper on a CPU than advanced indexing (index_put).
    cells = torch.where(valid, starts[:, None] + steps, 0).flatten()
    tokens = valid.flatten().nonzero().flatten()

    def cut(states: torch.Tensor) -> torch.Tensor:  # [1, h, total, d] -> [sequences, h, longest, d]
        heads, dim = states.shape[1], states.shape[3]
        rows = states[0].transpose(0, 1).reshape(total, heads * dim).index_select(0, cells)
        return rows.view(sequences, longest, heads, dim).transpose(1, 2)

    out, _ = sdpa_attention_forward(module, cut(query), cut(key), cut(value), None, **kwargs)
    heads, dim = out.shape[2], out.shape[3]  # out: [sequences, longest, h, d]
    return out.reshape(sequences * longest, heads * dim).index_select(0, tokens).view(
        1, total, heads, dim
    ), None


def _packed_mask(
    *args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any
) -> torch.Tensor | None:
    """No mask for a row without one (causality and sequence bounds are the attention's);
    ``sdpa``'s mask for anything else."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Make :data:`PACKED_ATTENTION` an attention implementation transformers knows."""
    if PACKED_ATTENTION not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        ALL_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, packed_sdpa_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, _packed_mask)


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def packing_unsupported(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot train on packed rows exactly, or None when it can."""
    base = _base(model)
    config = getattr(base, "config", None)
    if not isinstance(base, PreTrainedModel) or config is None:
        return f"{type(base).__name__} is not a transformers model"
    if getattr(config, "is_encoder_decoder", False):
        return f"{type(base).__name__} is an encoder-decoder"
    if not (getattr(base, "_supports_attention_backend", False) and base._can_set_attn_implementation()):
        return f"{type(base).__name__}'s attention does not go through transformers' attention interface"
    if config._attn_implementation not in ("sdpa", PACKED_ATTENTION):
        return f"its attention is {config._attn_implementation!r}, not 'sdpa'"
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__} takes no position_ids"
    layer_types = set(getattr(config, "layer_types", None) or ())
    if getattr(config, "sliding_window", None) or layer_types - {"full_attention"}:
        return f"{type(base).__name__} has sliding-window or other non-full attention layers"
    return None


def trained_logits_only(model: torch.nn.Module) -> bool:
    """Whether ``model`` can compute logits and loss on the trained positions alone."""
    base = _base(model)
    return "logits_to_keep" in inspect.signature(base.forward).parameters and (
        getattr(base, "loss_function", None) is ForCausalLMLoss
    )


@contextlib.contextmanager
def packed_attention(model: torch.nn.Module) -> Iterator[None]:
    """The model's attention is :func:`packed_sdpa_attention` inside the block (``sdpa``
    again after it: generation and evaluation never see the packed implementation)."""
    register()
    base = _base(model)
    before = base.config._attn_implementation
    base.set_attn_implementation(PACKED_ATTENTION)
    try:
        yield
    finally:
        base.set_attn_implementation(before)


class PackingCollator(DataCollatorWithFlattening):
    """transformers' flattening collator (one row, restarting ``position_ids``, sequence
    bounds as ``cu_seq_lens``), plus ``shift_labels`` and ``logits_to_keep`` at the trained
    positions when ``trained_only``, and ``use_cache=False`` (with a cache, transformers
    ignores the restarts of ``position_ids`` and attention crosses sequences)."""

    def __init__(self, trained_only: bool = True) -> None:
        super().__init__(return_position_ids=True, separator_id=IGNORE, return_flash_attn_kwargs=True)
        self.trained_only = trained_only

    def __call__(self, features: Sequence[dict[str, Any]], return_tensors=None, separator_id=None):
        batch = super().__call__(
            [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features],
            return_tensors,
            separator_id,
        )
        batch["use_cache"] = False
        if self.trained_only:
            shifted = torch.nn.functional.pad(batch["labels"][..., 1:], (0, 1), value=IGNORE)
            keep = shifted != IGNORE  # [1, total]: positions whose next token is trained
            batch["logits_to_keep"] = keep
            batch["shift_labels"] = shifted[keep].unsqueeze(0)
        return batch


def padding_collator(tokenizer) -> DataCollatorForSeq2Seq:
    """The padded collation (each micro-batch padded to its longest sequence)."""
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)


@torch.no_grad()
def packing_matches_padding(
    model: torch.nn.Module,
    tokenizer,
    features: Sequence[dict[str, Any]],
    collator: PackingCollator,
    rtol: float | None = None,
) -> tuple[float, float]:
    """The mean loss per trained token of ``features`` padded and packed (eval mode: no
    dropout), raising ``ValueError`` when they differ by more than ``rtol`` (default 1e-4,
    1e-2 for half-precision weights). A non-finite padded loss is left to the training's own
    stop."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        padded = padding_collator(tokenizer)(list(features))
        with packed_attention(model):
            packed = collator(list(features))
            packed_loss = float(model(**_to(packed, device)).loss)
        padded_loss = float(model(**_to(padded, device)).loss)
    finally:
        model.train(was_training)
    if rtol is None:
        rtol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 1e-2
    if math.isfinite(padded_loss) and not abs(packed_loss - padded_loss) <= rtol * max(1.0, abs(padded_loss)):
        raise ValueError(f"packed loss {packed_loss:.6f} differs from the padded loss {padded_loss:.6f}")
    return padded_loss, packed_loss


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
