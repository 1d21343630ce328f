"""Shared parts of the token-sequence objectives (ar, mlm, dear, vlm; docs/methods.md).

One :class:`~sslcore.models.sequence.SequenceTransformer` per method, causal or bidirectional;
``forward`` pools its hidden states for the probes; ``evaluate`` scores generation on the held-out
split: the mean negative log-likelihood (nats per token; perplexity = exp) of the continuation
``x[P:]`` given a prompt ``x[:P]``, for each prompt length P.

- causal models: the chain rule, ``(1/(L-P)) sum_{t>=P} -log p(x_t | x_<t)``, one pass;
- masked models, one pass (the default): positions ``>= P`` are masked and all predicted at once,
  ``(1/(L-P)) sum_{t>=P} -log p(x_t | x_<P)``;
- masked models, left to right (``left_to_right=True``): position t predicted with ``x_<t`` visible and
  ``>= t`` masked, the same chain-rule form as the causal models.

Masks and offsets are drawn from a generator seeded by ``(epoch, batch indices)``, so a resumed run
draws the same ones (without ``index``, e.g. in tests, from torch's global generator).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from ..checks import Fraction, PositiveInt
from ..models.sequence import POOLS, create_sequence_encoder
from .base import SSLMethod

PROMPTS = (0.25, 0.5, 0.75)
EVAL_SAMPLES = 512


def check_ratio(name: str, value) -> float:
    """``value`` if it is a number strictly inside (0, 1), else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def prompt_lengths(prompts, seq_len: int) -> list[tuple[str, int]]:
    """``(label, P)`` per prompt: a float in (0, 1) is a fraction of ``seq_len`` (``P = round(f L)``, at least 1),
    an int a length; every P must leave a continuation (``1 <= P < seq_len``)."""
    if isinstance(prompts, (int, float)):
        prompts = (prompts,)
    if not isinstance(prompts, (tuple, list)) or not prompts:
        raise ValueError(f"prompts must be a non-empty tuple of fractions in (0, 1) or lengths, got {prompts!r}")
    out = []
    for p in prompts:
        if isinstance(p, float):
            out.append((f"{round(100 * check_ratio('prompts', p))}%", min(max(1, round(p * seq_len)), seq_len - 1)))
        elif isinstance(p, int) and not isinstance(p, bool):
            if not 1 <= p < seq_len:
                raise ValueError(f"prompts: a prompt length must be in [1, seq_len) so that a continuation is left; "
                                 f"got {p} for sequences of {seq_len} tokens")
            out.append((str(p), p))
        else:
            raise ValueError(f"prompts must hold fractions in (0, 1) or integer lengths, got {p!r}")
    return out


def step_generator(index: torch.Tensor | None, epoch: int | None) -> torch.Generator | None:
    """A CPU generator seeded by ``(epoch, index)`` (int hashing is not salted: same seed every run).

    None without ``index``.
    """
    if index is None:
        return None
    return torch.Generator().manual_seed(hash((epoch or 0, *index.detach().cpu().tolist())) & (2 ** 63 - 1))


def mask_count(ratio, seq_len: int) -> torch.Tensor:
    """Masked positions per sequence, ``clamp(round(ratio L), 1, L-1)``; ``ratio`` a float or a tensor."""
    return (torch.as_tensor(ratio, dtype=torch.float64) * seq_len).round().clamp(1, seq_len - 1).long()


def random_mask(batch: int, seq_len: int, ratio, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool ``[batch, seq_len]``: in each row ``mask_count(ratio, L)`` positions, uniformly at random
    (MAE's argsort of noise); ``ratio`` is a float or a per-row tensor."""
    n = mask_count(torch.as_tensor(ratio, dtype=torch.float64).expand(batch), seq_len)
    ranks = torch.rand(batch, seq_len, generator=generator).argsort(1).argsort(1)
    return ranks < n[:, None]


def suffix_mask(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Bool ``[B, seq_len]``: the last ``lengths[b]`` positions of row b."""
    return torch.arange(seq_len) >= (seq_len - lengths)[:, None]


class SequenceMethod(SSLMethod):
    """A transformer over token sequences with one objective (subclasses define ``loss``).

    Options every sequence method takes (``create``): ``pool`` (mean | first | last: the probe features),
    ``prompts`` (generation prompt lengths: fractions or token counts), ``eval_samples`` (held-out sequences
    scored), ``left_to_right`` (masked models: also score the continuation left to right).
    ``--encoder``: transformer-tiny | transformer-small | transformer-base (the default ``smallcnn`` means small).
    """

    n_views = 1
    data_kinds = ("tokens",)
    causal = False

    @classmethod
    def data_defaults(cls, data) -> dict:
        """Options whose ``None`` default depends on the data."""
        return {}

    @classmethod
    def create(cls, data, *, encoder: str, pool: Literal[POOLS] = "mean",
               prompts: tuple[Fraction | PositiveInt, ...] | Fraction | PositiveInt = PROMPTS,
               eval_samples: PositiveInt = EVAL_SAMPLES, left_to_right: bool = False,
               **options) -> "SequenceMethod":
        if getattr(data, "kind", None) not in cls.data_kinds:
            raise ValueError(f"method {cls.name!r} trains on token sequences (--data pystdlib, text:PATH, "
                             f"imagetokens:DATA), not {getattr(data, 'kind', type(data).__name__)} data")
        prompt_lengths(prompts, data.seq_len)
        if isinstance(eval_samples, bool) or not isinstance(eval_samples, int) or eval_samples <= 0:
            raise ValueError(f"eval_samples must be a positive integer, got {eval_samples!r}")
        for key, value in cls.data_defaults(data).items():
            if options.get(key) is None:
                options[key] = value
        model = cls(create_sequence_encoder(encoder, data.vocab_size, data.seq_len, causal=cls.causal, pool=pool),
                    **options)
        model.prompts, model.eval_samples, model.left_to_right = prompts, eval_samples, bool(left_to_right)
        return model

    def __init__(self, encoder):
        super().__init__(encoder)
        self.prompts, self.eval_samples, self.left_to_right = PROMPTS, EVAL_SAMPLES, False  # create() sets them

    def _tokens(self, views) -> torch.Tensor:
        (x,) = views
        if x.ndim != 2 or x.shape[1] < 2:
            raise ValueError(f"token sequences must be [B, L] with L >= 2, got {tuple(x.shape)}")
        return x

    def targets_per_sequence(self, seq_len: int) -> float:
        """Supervised target tokens per training sequence (the expectation when the count is random): ``L - 1`` for
        the causal objectives, the masked count for the masked ones (``ar-vs-mlm --equalise targets``)."""
        if not self.causal:
            raise NotImplementedError(f"{type(self).__name__} must define targets_per_sequence")
        return float(seq_len - 1)

    def next_token_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Causal models: logits for the token after each hidden state."""
        return self.encoder.logits(h)

    @torch.no_grad()
    def position_nll(self, x: torch.Tensor, visible: int) -> torch.Tensor:
        """Mean over the batch of ``-log p(x_t | context)`` for ``t = visible..L-1`` (``[L - visible]``):
        causal models condition on ``x_<t``; masked models on ``x_<visible`` with the rest masked (one pass)."""
        length = x.shape[1]
        if self.causal:
            logits = self.next_token_logits(self.encoder.hidden(x[:, :-1]))[:, visible - 1:]
        else:
            mask = (torch.arange(length, device=x.device) >= visible).expand(len(x), -1)
            logits = self.encoder.logits(self.encoder.hidden(x, mask)[:, visible:])
        nll = F.cross_entropy(logits.float().transpose(1, 2), x[:, visible:], reduction="none")
        return nll.mean(0)

    @torch.no_grad()
    def evaluate(self, data) -> dict[str, float]:
        """Generation loss and perplexity of the held-out continuations per prompt (see the module docstring)."""
        device = next(self.parameters()).device
        x_all = data.x_test[:self.eval_samples]
        length = x_all.shape[1]
        prompts = prompt_lengths(self.prompts, length)
        first = min(p for _, p in prompts)
        batches = [x_all[i:i + 256].to(device) for i in range(0, len(x_all), 256)]
        weights = [len(b) / len(x_all) for b in batches]

        def nll(visible: int) -> torch.Tensor:
            return sum(w * self.position_nll(b, visible) for w, b in zip(weights, batches))

        out: dict[str, float] = {"eval_samples": len(x_all), "seq_len": length}
        if self.causal:
            per_pos = nll(first)  # the chain rule from one pass: position t's term does not depend on P
            one_pass = {p: per_pos[p - first:].mean().item() for _, p in prompts}
        else:
            one_pass = {p: nll(p).mean().item() for _, p in prompts}
        for label, p in prompts:
            out[f"gen_loss@{label}"] = one_pass[p]
            out[f"gen_ppl@{label}"] = math.exp(one_pass[p])
        if not self.causal and self.left_to_right:
            per_pos = torch.stack([nll(t)[0] for t in range(first, length)])
            for label, p in prompts:
                loss = per_pos[p - first:].mean().item()
                out[f"gen_loss_l2r@{label}"] = loss
                out[f"gen_ppl_l2r@{label}"] = math.exp(loss)
        return out


class MaskedSequenceMethod(SequenceMethod):
    """Bidirectional model; ``loss = mean over masked positions of -log p(x_t | x with the mask applied)``.
    Subclasses define ``draw_mask(batch, seq_len, generator) -> bool [batch, seq_len]``."""

    causal = False

    def loss(self, views, *, index=None, epoch=None) -> torch.Tensor:
        x = self._tokens(views)
        mask = self.draw_mask(len(x), x.shape[1], step_generator(index, epoch)).to(x.device)
        h = self.encoder.hidden(x, mask)
        return F.cross_entropy(self.encoder.logits(h[mask]).float(), x[mask])
