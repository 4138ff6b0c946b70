"""Several sequences per row of a forward pass, each seeing only itself, so no compute goes to padding.

A padded batch pays for its widest sequence in every row. Packing lays the sequences end to end into rows no
wider than the widest one (first-fit decreasing), restarts the positions at each sequence and masks attention
block-diagonally, so every token gets the hidden state it would get in a forward of its sequence alone. The
reward model's trainer packs preference groups (with a shared prompt); PPO packs its rollout for scoring and
for the update, where short answers leave most of a padded batch empty (OpenRLHF's `packing_samples` does the
same with flash-attention's variable-length kernels).

`TokenLayout` hides which of the two layouts a forward used: it gives the model's inputs, and gathers the
outputs that predict each real response token (N of them) and those at each sequence's last token; what is
computed per response token then runs on those N alone, not on the (B, T) grid with its padding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def pack_rows(widths: list[int], capacity: int | None = None) -> list[list[int]]:
    """Indices of the items in each row, first-fit decreasing into rows of `capacity` (default: the widest)."""
    capacity = max(widths) if capacity is None else capacity
    rows: list[list[int]] = []
    free: list[int] = []  # room left in each row
    for i in sorted(range(len(widths)), key=lambda i: -widths[i]):
        row = next((r for r, f in enumerate(free) if widths[i] <= f), None)
        if row is None:
            rows.append([i])
            free.append(capacity - widths[i])
        else:
            rows[row].append(i)
            free[row] -= widths[i]
    return rows


def tree_attention_mask(groups: Tensor, branches: Tensor | None = None, additive: bool = False) -> Tensor:
    """(R, 1, T, T) from (R, T) ids of each token's group in its row (-1 = padding) and its branch (0 = the
    group's shared prefix, j > 0 = its sequence j; None: no branches, a plain block-diagonal causal mask): a
    query sees the earlier keys of its own group's prefix and of its own branch. Padding sees only itself (no
    empty softmax row, whose NaN would reach the weight gradients). Boolean (True = attend) for SDPA; additive
    0 / -inf-like for eager attention."""
    width = groups.size(1)
    order = torch.ones(width, width, dtype=torch.bool, device=groups.device).tril()
    allowed = order & (groups[:, :, None] == groups[:, None, :]) & (groups[:, None, :] >= 0)
    if branches is not None:
        keys, queries = branches[:, None, :], branches[:, :, None]
        allowed &= (keys == 0) | (keys == queries)
    allowed |= torch.eye(width, dtype=torch.bool, device=groups.device)
    allowed = allowed[:, None]  # (R, 1, T, T)
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, device=groups.device).masked_fill(
        ~allowed, torch.finfo(torch.float32).min
    )


def takes_4d_mask(model: Any) -> tuple[bool, bool]:
    """(a custom 4-D mask works, it must be additive): SDPA takes a boolean one, eager an additive one;
    flash-attention kernels take none, and ALiBi models (Bloom, Falcon with `alibi`) build their position bias
    from a 2-D mask. Looks through DDP and peft wrappers to the model's config. A sliding window is not in the
    mask: see `sliding_window`."""
    model = getattr(model, "module", model)
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    return attention in ("sdpa", "eager") and not uses_alibi(config), attention == "eager"


def uses_alibi(config: Any) -> bool:
    """Whether a model's config asks for ALiBi position biases (Bloom, Falcon with `alibi`), which its forward
    builds from a 2-D attention mask (each row's positions counted over its real tokens), not from position
    ids: such a model takes neither a custom 4-D mask nor one over slots it has not written."""
    return getattr(config, "model_type", None) == "bloom" or getattr(config, "alibi", False) is True


def takes_position_ids(model: torch.nn.Module) -> bool:
    """Whether the model's forward (a causal LM's or a sequence classifier's) passes `position_ids` on to its
    backbone. Some take none and drop them with their other keyword arguments (Falcon's, MPT's): a sequence packed
    after another, or a branch after a shared prefix, would then be read at the positions of its place in the row."""
    inner = getattr(model, "module", model)
    get_base = getattr(inner, "get_base_model", None)
    inner = get_base() if callable(get_base) else inner
    return "position_ids" in inspect.signature(inner.forward).parameters


def sliding_window(model: Any) -> int | None:
    """The window of the model's sliding-window layers, None where every layer attends to the whole sequence.
    A custom 4-D mask replaces the model's own, window included, so it is exact only for sequences no longer
    than this. Without `layer_types` (Mistral, Phi-3, Starcoder2) a window set applies to every layer."""
    model = getattr(model, "module", model)
    get_base = getattr(model, "get_base_model", None)
    config = getattr(get_base() if callable(get_base) else model, "config", None)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    sliding = "sliding_attention" in layer_types if layer_types else window is not None
    return int(window) if sliding and isinstance(window, int) else None


def within_window(window: int | None, longest: int) -> bool:
    """Whether sequences of up to `longest` tokens never reach past a sliding window of `window` (None: none)."""
    return window is None or longest <= window


@dataclass(frozen=True)
class TokenLayout:
    """A batch of B prompt + response sequences laid out for one forward pass, as rows of width W.

    `response_at` (N,) and `last_at` (B,) index the flattened (rows x W) outputs: the position whose output
    predicts each real response token (the one before it), in (B, T) order, and each sequence's last real token
    (where a reward model's score is read).
    """

    input_ids: Tensor  # (R, W)
    attention_mask: Tensor  # (R, W) for padded rows, (R, 1, W, W) for packed ones
    position_ids: Tensor  # (R, W)
    response_mask: Tensor  # (B, T) bool: the real response tokens
    response_at: Tensor  # (N,)
    last_at: Tensor  # (B,)
    real: Tensor  # (R, W) 1 at each sequence's tokens, 0 at padding

    @property
    def inputs(self) -> dict[str, Tensor]:
        """Keyword arguments for a Hugging Face model's forward."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}  # fmt: skip

    @property
    def tokens(self) -> int:
        """Positions the forward computes, padding included."""
        return self.input_ids.numel()

    def response(self, out: Tensor) -> Tensor:
        """(R, W, ...) outputs -> (N, ...): the output at the position before each real response token."""
        return out.flatten(0, 1)[self.response_at]

    def padded(self, x: Tensor) -> Tensor:
        """(N,) values of the real response tokens -> (B, T), 0 at padding (differentiable)."""
        return x.new_zeros(self.response_mask.shape).masked_scatter(self.response_mask, x)

    def last(self, out: Tensor) -> Tensor:
        """(R, W, ...) outputs -> (B, ...): the output at each sequence's last real token."""
        return out.flatten(0, 1)[self.last_at]


def padded_layout(ids: Tensor, mask: Tensor, n_prompt: int) -> TokenLayout:
    """Each sequence in its own row as it comes: a left-padded prompt of width P, then a right-padded response."""
    batch, width = ids.shape
    t = width - n_prompt
    rows = torch.arange(batch, device=ids.device)[:, None] * width  # (B, 1)
    response_mask = mask[:, n_prompt:].bool()  # (B, T)
    response_at = (rows + n_prompt - 1 + torch.arange(t, device=ids.device))[response_mask]  # (N,)
    positions = torch.arange(width, device=ids.device)
    last_at = rows[:, 0] + (positions * mask).argmax(dim=-1)  # (B,)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, W) correct for the left-padded prompt
    return TokenLayout(ids, mask, position_ids, response_mask, response_at, last_at, mask)


# Packed rows come ROW_MULTIPLE rows of WIDTH_MULTIPLE tokens at a time (empty rows and columns are padding):
# each new matmul shape costs a kernel of its own (oneDNN builds one per shape on a CPU, about 0.5 ms for a bf16
# matmul here; cuBLAS and torch.compile also key on shapes), and exact sizes would make new ones every batch.
WIDTH_MULTIPLE, ROW_MULTIPLE = 16, 4


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def row_width(lengths: list[int], hidden_size: int | None = None) -> int:
    """The width of packed rows: the longest sequence rounded up to WIDTH_MULTIPLE; or, given the model's hidden
    size d, the multiple of WIDTH_MULTIPLE up to twice that width whose rows compute least. A layer's cost per
    position is about 12 d^2 multiply-adds in its matmuls plus 2 W d in attention over a row of W, so the cost
    is positions x (1 + W / 6d): two sequences of 60 tokens fill a row of 128 better than two rows of 64 do,
    at little more attention where d is large."""
    narrowest = _round_up(max(lengths), WIDTH_MULTIPLE)
    if hidden_size is None:
        return narrowest

    def cost(width: int) -> float:
        rows = _round_up(len(pack_rows(lengths, width)), ROW_MULTIPLE)
        return rows * width * (1 + width / (6 * hidden_size))

    return min(range(narrowest, 2 * narrowest + 1, WIDTH_MULTIPLE), key=cost)


def packed_rows(lengths: list[int], hidden_size: int | None = None) -> tuple[int, list[list[int]]]:
    """(row width, the sequences of each row): `row_width`'s rows filled first-fit decreasing (pack_rows), then
    empty rows up to a multiple of ROW_MULTIPLE."""
    width = row_width(lengths, hidden_size)
    rows = pack_rows(lengths, width)
    return width, rows + [[] for _ in range(_round_up(len(rows), ROW_MULTIPLE) - len(rows))]


def packed_layout(
    ids: Tensor,
    mask: Tensor,
    n_prompt: int,
    pad_id: int,
    additive: bool = False,
    hidden_size: int | None = None,
) -> TokenLayout:
    """The real tokens of each sequence end to end in rows (pack_rows) of `row_width`; positions restart at 0
    for each sequence, attention is block-diagonal and causal (tree_attention_mask).

    Needs every sequence to have at least one prompt token (the position that predicts its first response
    token); use `layout` to fall back to padded rows where one has none.
    """
    batch, t = ids.size(0), ids.size(1) - n_prompt
    prompt_len = mask[:, :n_prompt].sum(1).tolist()
    response_len = mask[:, n_prompt:].sum(1).tolist()
    lengths = [p + r for p, r in zip(prompt_len, response_len, strict=True)]
    width, rows = packed_rows(lengths, hidden_size)
    row_of, start_of = [0] * batch, [0] * batch
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            row_of[i], start_of[i] = r, col
            col += lengths[i]
    start = torch.tensor([row_of[i] * width + start_of[i] for i in range(batch)], device=ids.device)  # (B,)
    n = torch.tensor(lengths, device=ids.device)  # (B,)
    p = torch.tensor(prompt_len, device=ids.device)  # (B,)

    # token k of sequence i (in order of its real tokens) goes to flat position start[i] + k
    real = mask.bool()  # (B, P + T)
    rank = real.cumsum(1) - 1  # (B, P + T) k of each real token
    dest = (start[:, None] + rank)[real]  # (N,) N = real tokens in the batch
    input_ids = torch.full((len(rows) * width,), pad_id, dtype=ids.dtype, device=ids.device)
    input_ids[dest] = ids[real]
    position_ids = torch.zeros(len(rows) * width, dtype=torch.long, device=ids.device)
    position_ids[dest] = rank[real]
    sequence = torch.full((len(rows) * width,), -1, dtype=torch.long, device=ids.device)
    sequence[dest] = torch.arange(batch, device=ids.device)[:, None].expand_as(real)[real]

    # response token j of sequence i sits at k = p_i + j of it; the output that predicts it at k - 1
    response_mask = mask[:, n_prompt:].bool()  # (B, T)
    j = torch.arange(t, device=ids.device)  # (T,)
    response_at = (start[:, None] + p[:, None] + j - 1)[response_mask]  # (N,)
    last_at = start + n - 1  # (B,)
    rows_shape = (len(rows), width)
    return TokenLayout(
        input_ids.view(rows_shape),
        tree_attention_mask(sequence.view(rows_shape), additive=additive),
        position_ids.view(rows_shape),
        response_mask,
        response_at,
        last_at,
        (sequence >= 0).long().view(rows_shape),
    )


def layout(
    ids: Tensor,
    mask: Tensor,
    n_prompt: int,
    pad_id: int,
    pack: bool,
    additive: bool,
    hidden_size: int | None = None,
    window: int | None = None,
) -> TokenLayout:
    """Packed rows when asked for and possible (every prompt has a token, and no sequence is longer than the
    models' sliding `window`, which a custom mask would drop), else padded rows."""
    # the longest sequence is read (a device sync) only where a sliding window may forbid packing
    fits = window is None or not pack or within_window(window, int(mask.sum(1).max()) if mask.numel() else 0)
    if pack and fits and bool(mask[:, :n_prompt].any(1).all()):
        return packed_layout(ids, mask, n_prompt, pad_id, additive, hidden_size)
    return padded_layout(ids, mask, n_prompt)
