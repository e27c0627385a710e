"""Causal-LM loss without materialising the full-vocabulary logits of the batch.

At large batch the float32 logits of the whole batch (and their log-softmax and gradient) are most
of the peak memory of a depth-limited training step. Here the LM head runs over chunks of tokens;
each chunk's logits live only while its loss and the gradient with respect to the chunk's hidden
states are computed, during the forward pass. Backward then only scales the stored gradients, so
no logits are recomputed (the same FLOPs as the plain loss, a fraction of its memory).

Within a chunk the cross-entropy gradient `softmax(z) - onehot(y)` is formed in the logits buffer
itself (the algorithm Liger's and Unsloth's fused linear cross-entropy kernels run): one
vocabulary-wide buffer per chunk, where `log_softmax` + NLL + their backward hold four.

`enable_chunked_loss(model)` gives the same loss to any causal LM under a stock `Trainer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edge_llm.modeling import find_decoder_parts, postprocess_logits

IGNORE_INDEX = -100

# The chunk's logits are made about as large as the batch's hidden states (Liger's rule), but never
# fewer tokens than this: below it the LM head matmul gets too thin to run at full speed.
MIN_AUTO_CHUNK = 128

# The loss chunk a memory plan falls back to where the configured one does not fit: the most
# tokens, a power of two, whose float32 logits take at most this many bytes (64 tokens of
# SmolLM2's 49152-word vocabulary, 32 of Llama 3's 128256), and never fewer than `MIN_LEAN_CHUNK`.
LEAN_CHUNK_BYTES = 16 * 2**20
MIN_LEAN_CHUNK = 16

# Autograd nodes that do not keep their own output for backward: logits produced by one of these
# may be overwritten with their gradient in place. A custom `autograd.Function` says so itself with
# a class attribute `output_saved = False` (compressed layers' `CompressedMatmul`).
_OUTPUT_NOT_SAVED = {
    "MmBackward0",
    "AddmmBackward0",
    "AddBackward0",
    "SubBackward0",
    "MulBackward0",
    "DivBackward0",
    "ToCopyBackward0",
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
}

# Keyword arguments of a model's forward that its loss function also takes.
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def auto_chunk_size(num_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per loss chunk: a chunk's logits about the size of the hidden states of all
    `num_tokens` (Liger's rule: `num_tokens / ceil(vocab / hidden)`, up to a power of two), and
    at least `MIN_AUTO_CHUNK`."""
    tokens = math.ceil(num_tokens / math.ceil(vocab_size / max(hidden_size, 1)))
    return max(MIN_AUTO_CHUNK, 1 << max(tokens - 1, 0).bit_length())


def lean_chunk_size(vocab_size: int) -> int:
    """Tokens per loss chunk when memory is short: `LEAN_CHUNK_BYTES` of float32 logits."""
    tokens = max(LEAN_CHUNK_BYTES // (4 * max(vocab_size, 1)), 1)
    return max(MIN_LEAN_CHUNK, 1 << (tokens.bit_length() - 1))


def chunk_tokens(chunk_size: int | str | None, num_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk that an `EdgeLLMConfig.loss_chunk_size` setting gives for `num_tokens`
    targets (`None`: all of them, the full logits)."""
    if chunk_size is None:
        return num_tokens
    if chunk_size == "auto":
        return auto_chunk_size(num_tokens, hidden_size, vocab_size)
    return chunk_size


def shift_for_causal_lm(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions `t` predict `labels[t + 1]`, or `shift_labels[t]` where the caller shifted them
    already (as transformers' loss takes them); keep only positions with a real target."""
    if shift_labels is None:
        targets = labels[:, 1:].reshape(-1)
        states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    else:
        targets = shift_labels.reshape(-1).to(hidden.device)
        states = hidden.reshape(-1, hidden.shape[-1])
    keep = targets != ignore_index
    return states[keep], targets[keep]


def _cross_entropy_and_grad_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of float32 `logits` (n, V); turns `logits` into its gradient in place."""
    index = targets.unsqueeze(1)
    target_logits = logits.gather(1, index).squeeze(1)
    top = logits.amax(dim=1, keepdim=True)
    probs = logits.sub_(top).exp_()
    norm = probs.sum(dim=1, keepdim=True)
    probs.div_(norm)
    probs.scatter_add_(1, index, torch.full_like(target_logits, -1.0).unsqueeze(1))
    return (top.squeeze(1) + norm.log().squeeze(1) - target_logits).sum()


def _float_logits_to_overwrite(out: torch.Tensor) -> torch.Tensor:
    """`out` as float32 logits outside autograd that may be overwritten: a fresh copy for
    half-precision output (or a head run under autocast), or `out` itself when autograd does not
    need it back."""
    if out.dtype != torch.float32:
        return out.detach().float()
    grad_fn = out.grad_fn
    if grad_fn is None or type(grad_fn).__name__ in _OUTPUT_NOT_SAVED:
        return out.detach()
    if getattr(getattr(grad_fn, "_forward_cls", None), "output_saved", True) is False:
        return out.detach()
    return out.detach().clone()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states, targets, head_fn, chunk_size, denominator, *params):
        grad_states = torch.zeros_like(states)
        grad_params = [torch.zeros_like(p) for p in params]
        total = states.new_zeros((), dtype=torch.float32)
        for start in range(0, states.shape[0], chunk_size):
            with torch.enable_grad():
                chunk = states[start : start + chunk_size].detach().requires_grad_(True)
                out = head_fn(chunk)
                logits = _float_logits_to_overwrite(out)
                total += _cross_entropy_and_grad_(logits, targets[start : start + chunk_size]).detach()
                grads = torch.autograd.grad(out, [chunk, *params], grad_outputs=logits.to(out.dtype))
            del out, logits
            grad_states[start : start + chunk_size] = grads[0]
            for accumulated, grad in zip(grad_params, grads[1:], strict=True):
                accumulated += grad
        ctx.save_for_backward(grad_states, *grad_params)
        ctx.denominator = denominator
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        grad_states, *grad_params = ctx.saved_tensors
        scale = grad_output / ctx.denominator
        return (grad_states * scale.to(grad_states.dtype), None, None, None, None, *(g * scale for g in grad_params))


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head_fn: Callable[[torch.Tensor], torch.Tensor],
    trainable_params: list[nn.Parameter],
    chunk_size: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of `head_fn(hidden)` against `labels`, computed in chunks.

    Args:
        hidden: `(batch, seq, hidden)` normed hidden states, as the LM head receives them.
        labels: `(batch, seq)` token ids, `ignore_index` where there is no target (not shifted).
        head_fn: maps `(n, hidden)` states to `(n, vocab)` logits (LM head plus post-processing).
        trainable_params: parameters inside `head_fn` that need gradients (e.g. a per-exit head).
        chunk_size: tokens per chunk; extra memory is about `chunk_size * vocab * 4` bytes (twice
            that for a half-precision head). `None`: `auto_chunk_size` of the batch.
        num_items_in_batch: divide the summed loss by this (as transformers does under gradient
            accumulation) instead of by the number of targets here.
        shift_labels: targets already shifted (`(batch, seq)`, position `t`'s own target), which
            then replace `labels`, as in transformers' `ForCausalLMLoss`.
    """
    states, targets = shift_for_causal_lm(hidden, labels, ignore_index, shift_labels)
    if num_items_in_batch is None:
        denominator = max(int(targets.numel()), 1)
    else:
        denominator = num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    if states.shape[0] == 0:
        return hidden.sum() * 0.0
    if chunk_size is None:
        vocab = head_fn(states[:1].detach()).shape[-1]
        chunk_size = auto_chunk_size(states.shape[0], states.shape[-1], vocab)
    return _ChunkedLinearCrossEntropy.apply(states, targets, head_fn, chunk_size, denominator, *trainable_params)


class DeferredHead(nn.Module):
    """Stands in for the LM head in a training pass: keeps its input (the normed hidden states) and
    returns an empty tensor, so the model never computes full-vocabulary logits; `loss` then
    computes the loss chunk by chunk from the kept states."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.inputs: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.inputs = hidden_states
        return hidden_states.new_empty(*hidden_states.shape[:-1], 0)

    def loss(
        self, config: Any, labels: torch.Tensor, chunk_size: int | None, loss_kwargs: dict[str, Any]
    ) -> torch.Tensor:
        head = self.head
        return chunked_causal_lm_loss(
            self.inputs,
            labels,
            head_fn=lambda states: postprocess_logits(config, head(states)),
            trainable_params=[p for p in head.parameters() if p.requires_grad],
            chunk_size=chunk_size,
            num_items_in_batch=loss_kwargs.get("num_items_in_batch"),
            ignore_index=loss_kwargs.get("ignore_index", IGNORE_INDEX),
            shift_labels=loss_kwargs.get("shift_labels"),
        )


def replace_output_fields(output: Any, **changes: Any) -> Any:
    """A copy of a transformers ModelOutput with some fields replaced (None removes a field)."""
    fields = {**dict(output.items()), **changes}
    return type(output)(**{k: v for k, v in fields.items() if v is not None})


class ChunkedLossHandle:
    """Returned by `enable_chunked_loss`; `remove()` restores the model's own loss."""

    def __init__(self, model: nn.Module, chunk_size: int | None) -> None:
        if chunk_size is not None and (
            not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
        ):
            raise ValueError(f"enable_chunked_loss: chunk_size must be a positive integer or None, got {chunk_size!r}.")
        self.model = model
        self.parts = find_decoder_parts(model)
        self.chunk_size = chunk_size
        self._pass: tuple[nn.Module, DeferredHead, torch.Tensor, dict[str, Any]] | None = None
        self._handles = [
            model.register_forward_pre_hook(self._begin, with_kwargs=True),
            model.register_forward_hook(self._finish, with_kwargs=True),
            model.register_forward_hook(self._restore, with_kwargs=True, always_call=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _begin(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        labels = kwargs.get("labels")
        # Only training passes: evaluation and generation want logits.
        if self._pass is not None or labels is None or not torch.is_grad_enabled():
            return args, kwargs
        kwargs = dict(kwargs)
        kwargs.pop("labels")
        loss_kwargs = {k: kwargs[k] for k in LOSS_KWARGS if k in kwargs}
        deferred = DeferredHead(self.parts.head(model))
        original = self.parts.swap(model, self.parts.head_path, deferred)
        self._pass = (original, deferred, labels, loss_kwargs)
        kwargs["return_dict"] = True
        return args, kwargs

    def _finish(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._pass is None:
            return output
        _, deferred, labels, loss_kwargs = self._pass
        loss = deferred.loss(model.config, labels, self.chunk_size, loss_kwargs)
        return replace_output_fields(output, loss=loss, logits=None)

    def _restore(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._pass is not None:
            self.parts.swap(model, self.parts.head_path, self._pass[0])
            self._pass = None


def enable_chunked_loss(model: nn.Module, chunk_size: int | None = None) -> ChunkedLossHandle:
    """Make `model`'s training forward passes compute their causal-LM loss in chunks.

    Works on any causal LM that `find_decoder_parts` understands, and on a `PeftModel` wrapping one
    (LoRA, QLoRA, ...), under a stock `transformers.Trainer` or a plain loop: whenever the model is
    called with `labels` while autograd is on, the LM head is deferred, the returned output has the
    same `loss` as the model's own (up to float rounding) and no `logits`. Passes without labels or
    under `torch.no_grad()` (evaluation, generation) are untouched.

    Args:
        model: a transformers causal LM, or a `PeftModel` around one.
        chunk_size: tokens per chunk; `None` picks `auto_chunk_size` per batch.

    Returns:
        A handle; `handle.remove()` restores the model's own loss.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return ChunkedLossHandle(base, chunk_size)
