"""Quality metrics every technique is judged by: perplexity and draft/target greedy agreement.

Perplexity is exp(mean next-token cross-entropy) over non-overlapping windows of held-out text;
the agreement of two models' argmax along a continuation is the greedy acceptance rate alpha that
speculative decoding's formulas take (Leviathan et al. 2023).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import formulas


def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D tensor, without special tokens."""
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, window: int = 512, max_windows: int | None = None,
               batch_size: int = 4, progress: bool = False) -> float:
    """exp of the mean cross-entropy over consecutive windows of ``ids`` (1-D), each window scored
    on its own (no context carried across windows). Only whole windows count: the last
    ``(len(ids) - 1) % window`` targets are left out, as llama.cpp's perplexity tool leaves out a
    last partial chunk, so every scored token has the same kind of context whatever the text's
    length (``scored_tokens`` says how many count). A text shorter than one window is scored as one
    window of all its tokens. ``progress``: a bar over the windows."""
    if not torch.is_tensor(ids) or ids.dim() != 1 or len(ids) < 2:
        raise ValueError("perplexity needs a 1-D tensor of at least 2 token ids")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"perplexity needs integer token ids, got {ids.dtype}")
    ids = ids.long()                     # cross_entropy takes long targets; the model takes int32 too
    formulas._positive_int(batch_size=batch_size)
    scored, n = _windows(len(ids), window, max_windows)          # checks window and max_windows
    ctx = model.config.max_position_embeddings
    if window > ctx:
        raise ValueError(f"window {window} exceeds the model's context of {ctx}")
    window = scored
    chunks = torch.stack([ids[i * window: (i + 1) * window + 1] for i in range(n)]).to(model.device)
    total, count = 0.0, 0
    bar = tqdm(total=n, desc="perplexity", unit="window", disable=not progress)
    for b in range(0, n, batch_size):
        x = chunks[b: b + batch_size]
        logits = model(x[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
        bar.update(len(x))
    bar.close()
    return math.exp(total / count)


def _windows(num_ids: int, window: int, max_windows: int | None) -> tuple[int, int]:
    """(window length, number of windows) ``perplexity`` scores in a text of num_ids tokens."""
    formulas._positive_int(window=window)
    if max_windows is not None:
        formulas._positive_int(max_windows=max_windows)
    window = min(window, num_ids - 1)
    n = (num_ids - 1) // window
    return window, n if max_windows is None else min(n, max_windows)


def scored_tokens(num_ids: int, window: int = 512, max_windows: int | None = None) -> int:
    """How many next-token predictions ``perplexity`` averages over for a text of num_ids tokens."""
    formulas._positive_int(num_ids=num_ids)
    if num_ids < 2:
        raise ValueError(f"a text of {num_ids} token has no next token to score")
    window, n = _windows(num_ids, window, max_windows)
    return window * n


def common_prefix(a, b) -> int:
    """How many leading tokens two sequences of token ids share (the position of the first
    difference, or the shorter length)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.inference_mode()
def greedy_agreement(target, draft, prompts: list[torch.Tensor], new_tokens: int = 64) -> dict:
    """How often the draft's argmax equals the target's along the target's own greedy continuation.

    Returns ``alpha`` (the fraction of positions that agree: the per-token acceptance rate of
    greedy speculative decoding) and ``per_prompt`` rates.
    """
    if target.config.vocab_size != draft.config.vocab_size:   # argmaxes of two vocabularies: alpha 0, no word
        raise ValueError(f"draft vocabulary ({draft.config.vocab_size}) differs from the target's "
                         f"({target.config.vocab_size}): they must share a tokenizer")
    if len(prompts) == 0:
        raise ValueError("greedy_agreement needs at least one prompt, got none")
    rates = []
    for p in prompts:
        seq = target.generate(p[None].to(target.device), max_new_tokens=new_tokens, stop_token_ids=())
        n = seq.shape[1] - p.numel()
        t_pred = target(seq[:, :-1]).argmax(-1)[0, -n:]
        d_pred = draft(seq[:, :-1].to(draft.device)).argmax(-1)[0, -n:].to(t_pred.device)
        rates.append((t_pred == d_pred).float().mean().item())
    return {"alpha": sum(rates) / len(rates), "per_prompt": rates}


def held_out_prompts(tokenizer, text: str, n: int = 16, prompt_tokens: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """``n`` prompts of ``prompt_tokens`` tokens taken at seeded random places in ``text``.

    A prompt starts with the tokenizer's BOS when it has one (then ``prompt_tokens - 1`` text
    tokens follow); without one, all ``prompt_tokens`` are text.
    """
    bos = tokenizer.bos_token_id
    formulas._positive_int(n=n, prompt_tokens=prompt_tokens)
    if bos is not None and prompt_tokens < 2:
        raise ValueError(f"prompt_tokens must be >= 2 (BOS and at least one text token), got {prompt_tokens}")
    ids = encode(tokenizer, text)
    if len(ids) <= prompt_tokens:
        raise ValueError(f"text of {len(ids)} tokens is too short for prompts of {prompt_tokens} tokens "
                         f"(need more than {prompt_tokens})")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - prompt_tokens, (n,), generator=g).tolist()
    if bos is None:
        return [ids[s: s + prompt_tokens].clone() for s in starts]
    return [torch.cat([torch.tensor([bos]), ids[s: s + prompt_tokens - 1]]) for s in starts]
