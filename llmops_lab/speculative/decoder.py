"""Speculative decoding with a KV cache per model (Leviathan et al. 2023; Chen et al. 2023).

Each step the draft proposes k tokens one at a time, the target scores all of them in one forward
pass of k+1 tokens, and a prefix is accepted: draft token d is kept with probability
min(1, p(d) / q(d)); the first rejected one is replaced by a sample from norm(max(0, p - q)); if all
k are kept, a bonus token is drawn from the target's last distribution. The output is distributed
exactly as the target's own samples. At temperature 0, p and q are one-hot and this reduces to
"keep drafts while they equal the target's argmax", token-for-token identical to greedy decoding.

Neither model ever re-reads the prefix: both keep their caches, and rejected drafts are rolled
back. Rows of a batch accept different numbers of tokens; their cache slots stay aligned and the
slots of a row's rejected drafts (and its left padding) are masked out, the same mechanism as
padding, so positions and attention see only the row's own tokens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..checks import is_int
from ..generation import as_stop_token_ids, check_attention_mask, check_sampling, logits_to_probs
from ..kv import KVCache
from ..lean import LeanModel
from ..measure import synchronize


@dataclass
class SpeculativeStats:
    k: int
    steps: int = 0
    accepted: list = field(default_factory=list)       # per step and row: drafts accepted (0..k)
    gained: list = field(default_factory=list)         # per step and row: tokens it kept (<= accepted + 1:
                                                         # none past a stop token or max_new_tokens)
    position_tries: list = None                         # per draft position: times it was verified
    position_accepts: list = None                       # ... and accepted
    drafts: int = 0                                      # draft tokens made, summed over steps (the last
                                                         # step may draft fewer than k, or none)
    draft_seconds: float = 0.0
    target_seconds: float = 0.0
    trace: list = field(default_factory=list)           # row 0, per step: drafts, accepted, fix

    def __post_init__(self):
        self.position_tries = [0] * self.k
        self.position_accepts = [0] * self.k

    @property
    def alpha(self) -> float:
        """Acceptance rate: accepted drafts / drafts verified (first rejection ends a step)."""
        tries = sum(self.position_tries)
        return sum(self.position_accepts) / tries if tries else float("nan")

    @property
    def alpha_per_position(self) -> list[float]:
        return [a / t if t else float("nan") for a, t in zip(self.position_accepts, self.position_tries)]

    @property
    def mean_tokens_per_step(self) -> float:
        """Tokens each row gains per target pass: accepted drafts + the corrected/bonus token, of
        which it keeps those before a stop token and within max_new_tokens (accepted drafts past
        them were counted: 5.0 for a row that stopped at its first token)."""
        return sum(self.gained) / len(self.gained) if self.gained else float("nan")

    @property
    def draft_time_per_step(self) -> float:
        return self.draft_seconds / max(self.steps, 1)

    @property
    def target_time_per_step(self) -> float:
        return self.target_seconds / max(self.steps, 1)

    def to_dict(self) -> dict:
        return {"k": self.k, "steps": self.steps, "alpha": self.alpha, "alpha_per_position": self.alpha_per_position,
                "mean_tokens_per_step": self.mean_tokens_per_step, "draft_time_per_step": self.draft_time_per_step,
                "target_time_per_step": self.target_time_per_step}


def _verify(t_logits, drafts, qs, temperature, top_k, top_p, generator) -> tuple[list[int], list[int]]:
    """Accepted draft count per row and the token each row adds after them, as Python ints (the
    bookkeeping that follows is plain Python).

    Sampling: keep draft d with probability min(1, p(d)/q(d)); the first rejected one is replaced
    by a draw from norm(max(0, p - q)), and after k accepted drafts a bonus token is drawn from p.
    Greedy is the same rule with one-hot p and q, which reduces to comparing argmaxes. With no
    drafts (k = 0: a plain target step) the token is drawn from p, as the target alone would.
    """
    B, k = drafts.shape
    if temperature == 0:
        t_tok, d_tok = t_logits.argmax(-1).tolist(), drafts.tolist()       # [B][k+1], [B][k]
        n_acc = []
        for t_row, d_row in zip(t_tok, d_tok):
            a = 0
            while a < k and d_row[a] == t_row[a]:
                a += 1
            n_acc.append(a)
        return n_acc, [t_row[a] for t_row, a in zip(t_tok, n_acc)]
    rows = torch.arange(B, device=drafts.device)
    p = logits_to_probs(t_logits, temperature, top_k, top_p)                # [B, k+1, V]
    if k == 0:
        return [0] * B, _draw(p[:, 0], generator).tolist()
    q = torch.stack(qs, 1)                                                   # [B, k, V]
    pd = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    qd = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(B, k, generator=generator, device=drafts.device)
    n_acc = torch.cumprod((u < (pd / qd).clamp(max=1.0)).long(), 1).sum(1)  # leading accepts
    at = n_acc.clamp(max=k - 1)
    residual = (p[rows, at] - q[rows, at]).clamp(min=0)
    dist = torch.where((n_acc < k)[:, None], residual, p[rows, k])
    dist = dist / dist.sum(-1, keepdim=True).clamp(min=1e-20)
    return n_acc.tolist(), _draw(dist, generator).tolist()


def _draw(probs, generator):
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Lane:
    """One model's cache and per-slot validity mask (what the row may attend to)."""

    def __init__(self, model, run, batch_size: int, capacity: int):
        self.run = run
        self.cache = KVCache.for_model(model, batch_size, capacity)
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.long, device=model.device)
        self.masked = batch_size > 1  # batch 1 never has holes: no mask, no bookkeeping

    def feed(self, tokens, valid=None, last_only: bool = False):
        """Append tokens [B, S] (valid [B, S] marks real ones; None: all are); returns logits
        [B, S, V] (or [B, 1, V] with ``last_only``)."""
        start, S = self.cache.length, tokens.shape[1]
        if not self.masked and valid is not None and not bool(valid.all()):
            self.masked = True
        if self.masked:
            self.valid[:, start:start + S] = 1 if valid is None else valid
        mask = self.valid[:, :start + S] if self.masked else None
        return self.run(tokens, self.cache, mask, last_only)

    def rollback(self, start: int, kept: list[int], written: int):
        """Of ``written`` slots from ``start``, row b keeps the first kept[b]; the cache shrinks to
        the longest row and the rest become holes."""
        if len(kept) == 1:  # one row: no holes, just forget the rejected slots
            self.cache.truncate(start + kept[0])
            return
        kept_t = torch.tensor(kept, device=self.valid.device)
        idx = torch.arange(written, device=self.valid.device)
        self.valid[:, start:start + written] *= (idx[None, :] < kept_t[:, None]).long()
        self.cache.truncate(start + max(kept))


def _runner(model, lean: bool):
    """The forward a lane calls: ``LeanModel`` (fused weights, lean step) or the model itself."""
    if lean and model.config.sliding_window is None:
        return LeanModel(model)
    return lambda ids, cache, mask, last_only: model(ids, cache=cache, attention_mask=mask, last_only=last_only)


class SpeculativeDecoder:
    """``SpeculativeDecoder(target, draft, k).generate(ids, max_new_tokens)`` -> (tokens, stats)."""

    def __init__(self, target, draft, k: int = 4, lean: bool = True):
        if not is_int(k) or k < 1:
            raise ValueError(f"k (draft tokens per step) must be an integer >= 1, got {k!r}")
        if target.config.vocab_size != draft.config.vocab_size:
            raise ValueError(f"draft vocabulary ({draft.config.vocab_size}) differs from the target's "
                             f"({target.config.vocab_size}): they must share a tokenizer")
        # The same size is not the same tokenizer: special ids that differ mean the ids do too.
        t_cfg, d_cfg = target.config, draft.config
        if (t_cfg.bos_token_id != d_cfg.bos_token_id
                or set(t_cfg.eos_token_ids) != set(d_cfg.eos_token_ids)):
            raise ValueError(f"draft special tokens (bos {d_cfg.bos_token_id}, eos {d_cfg.eos_token_ids}) differ "
                             f"from the target's (bos {t_cfg.bos_token_id}, eos {t_cfg.eos_token_ids}): "
                             f"they must share a tokenizer")
        self.target, self.draft, self.k = target, draft, k
        # lean=False runs both models through LlamaModel.forward: the slow twin of the lean step.
        self.runs = (_runner(target, lean), _runner(draft, lean))

    def _time(self, fn, *args):
        synchronize(self.target.device)
        t0 = time.perf_counter()
        out = fn(*args)
        synchronize(self.target.device)
        return out, time.perf_counter() - t0

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_k=None, top_p=None,
                 attention_mask=None, generator=None, stop_token_ids=None, pad_token_id=None):
        """New tokens after a (left-padded) batch of prompts: returns ([B, S + n], stats), as
        ``generation.generate`` does: a row stops at any of ``stop_token_ids`` (default: the
        target config's eos ids; ``()`` for none) and is filled with ``pad_token_id`` afterwards
        (default: the first stop id, 0 without stops); n is max_new_tokens, or fewer when every
        row stopped earlier."""
        if not torch.is_tensor(input_ids):
            raise TypeError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            if torch.is_tensor(attention_mask) and attention_mask.dim() == 1:
                attention_mask = attention_mask[None]
        for m in (self.target, self.draft):
            m.check_ids(input_ids)
        check_sampling(temperature, top_k, top_p)
        if not is_int(max_new_tokens) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        vocab = self.target.config.vocab_size
        stop_ids = as_stop_token_ids(stop_token_ids, vocab, self.target.config.eos_token_ids)
        if pad_token_id is not None and (not is_int(pad_token_id) or not 0 <= pad_token_id < vocab):
            raise ValueError(f"pad_token_id must be a token id in [0, {vocab}), got {pad_token_id!r}")
        if pad_token_id is None:
            pad_token_id = stop_ids[0] if stop_ids else 0
        stops = set(stop_ids)
        B, S = input_ids.shape
        check_attention_mask(attention_mask, input_ids)
        ctx = min(self.target.config.max_position_embeddings, self.draft.config.max_position_embeddings)
        n_prompt = attention_mask.sum(-1) if attention_mask is not None else torch.full((B,), S)
        # The last new token is sampled, never fed back (as in ``generate``): prompt + new tokens may
        # reach the context plus one, and a prompt of the whole context still gets one token.
        if int(n_prompt.max()) > ctx:
            raise ValueError(f"prompt ({int(n_prompt.max())}) exceeds the context shared by target and "
                             f"draft ({ctx})")
        if int(n_prompt.max()) + max_new_tokens > ctx + 1:
            raise ValueError(f"prompt ({int(n_prompt.max())}) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"context shared by target and draft ({ctx}) plus the one token sampled last")
        # k - 1 drafts plus the target's own token already give k tokens: drafting as many tokens
        # as are left to generate would only waste a draft pass and a verify position
        k, dev = min(self.k, max_new_tokens - 1), input_ids.device
        prompt_valid = attention_mask.long().to(dev) if attention_mask is not None else torch.ones_like(input_ids)
        # Cache slots (positions plus the holes rollbacks leave in a batch): each step writes at most
        # k + 1 past the kept ones and keeps at most k + 1 more, one row's worth (the longest); summed
        # over the steps, what is kept is at most every row's committed tokens.
        capacity = S + min((k + 1) * (max_new_tokens + 1), B * (max_new_tokens + 1) + k + 2)
        tgt, dft = (_Lane(m, run, B, capacity) for m, run in zip((self.target, self.draft), self.runs))
        stats = SpeculativeStats(k)
        # Invariant: each cache holds every committed token but the last one ("pending").
        if S > 1:
            tgt.feed(input_ids[:, :-1], prompt_valid[:, :-1])
            if k > 0:                                # one new token: the draft never runs
                dft.feed(input_ids[:, :-1], prompt_valid[:, :-1])
        pending = input_ids[:, -1:]                  # [B, 1]: the last committed token of each row
        carry = None                                 # drafts of rows that accepted all k (draft never saw d_k)
        new = [[] for _ in range(B)]
        done = [False] * B
        # RoPE position of each row's pending token. A finished row keeps none of what it is fed
        # later (its rollback keeps nothing), so its position stays where it finished.
        pend_pos = [int(n) - 1 for n in n_prompt.tolist()]
        k_max = k
        while not all(done):
            # Near the end of the context the step drafts fewer tokens: the target scores pending
            # + k drafts at positions up to pend_pos + k, which must stay inside the context. And
            # it drafts no more than the longest row still needs: left - 1 drafts and the target's
            # token make left. k = 0 is a plain target step; the context bound never goes below 0:
            # a live row's pending position is at most ctx - 1 (prompt + new <= ctx + 1), and a
            # finished row's stays where its last step began, at most ctx - 1.
            left = max(max_new_tokens - len(new[b]) for b in range(B) if not done[b])
            k = min(k_max, ctx - 1 - max(pend_pos), left - 1)
            # 1. Draft k tokens autoregressively.
            t0 = time.perf_counter()
            if carry is not None:
                d_in = torch.cat([carry[0], pending], 1)
                d_valid = None if carry[1] is None else torch.cat([carry[1], torch.ones_like(pending)], 1)
            else:
                d_in, d_valid = pending, None
            d_start = dft.cache.length
            qs, drafts = [], []
            if k > 0:     # a plain target step leaves the draft alone (what it skipped is carried)
                logits = dft.feed(d_in, d_valid, last_only=True)[:, -1]
            for j in range(k):
                if temperature == 0:
                    d = logits.argmax(-1)
                else:
                    qs.append(logits_to_probs(logits, temperature, top_k, top_p))
                    d = _draw(qs[-1], generator)
                drafts.append(d)
                if j < k - 1:
                    logits = dft.feed(d[:, None], last_only=True)[:, -1]
            drafts = torch.stack(drafts, 1) if k else pending[:, :0]     # [B, k]
            synchronize(dev)
            stats.draft_seconds += time.perf_counter() - t0
            stats.drafts += k
            # 2. The target scores pending + k drafts in one pass.
            t_start = tgt.cache.length
            t_logits, dt = self._time(tgt.feed, torch.cat([pending, drafts], 1))
            stats.target_seconds += dt
            n_acc, fix = _verify(t_logits, drafts, qs, temperature, top_k, top_p, generator)
            # 3. Commit, record, roll back the caches to what each row kept (plain Python from here).
            stats.steps += 1
            d_tok = drafts.tolist()
            for b in range(B):
                if done[b]:
                    continue
                a = n_acc[b]
                stats.accepted.append(a)
                for j in range(min(a + 1, k)):
                    stats.position_tries[j] += 1
                    stats.position_accepts[j] += int(j < a)
                before = len(new[b])
                for tok in d_tok[b][:a] + [fix[b]]:
                    if len(new[b]) < max_new_tokens and not done[b]:
                        new[b].append(tok)
                        done[b] = tok in stops or len(new[b]) >= max_new_tokens
                stats.gained.append(len(new[b]) - before)
                if b == 0:   # a bonus (after k accepted drafts) only if it was drafted for and kept
                    kept_fix = len(new[0]) - before == a + 1
                    stats.trace.append({"drafts": d_tok[0], "accepted": a, "fix": fix[0],
                                        "bonus": k > 0 and a == k and kept_fix})
            if all(done):
                break
            n_in = d_in.shape[1]
            live = [not d for d in done]                                  # finished rows keep nothing more
            tgt.rollback(t_start, [(a + 1) * v for a, v in zip(n_acc, live)], k + 1)   # pending + accepted drafts
            pend_pos = [p + (a + 1) * v for p, a, v in zip(pend_pos, n_acc, live)]
            if k == 0:
                # The draft was not fed (a row at the context capped the step; the batch goes on): all
                # it skipped is committed and waits for its next feed. Rolling it back as if fed cut
                # its cache one slot past its length ("cannot truncate a cache of length 38 to 39").
                carry = (d_in, d_valid)
                pending = torch.tensor(fix, device=dev)[:, None]
                continue
            dft.rollback(d_start, [(min(a, k - 1) + n_in) * v for a, v in zip(n_acc, live)], n_in + k - 1)
            full = [a == k for a in n_acc]
            if any(full):
                carry = (drafts[:, -1:], None if all(full) else torch.tensor(full, device=dev).long()[:, None])
            else:
                carry = None
            pending = torch.tensor(fix, device=dev)[:, None]
        width = max(len(row) for row in new)      # as generate: it stops once every row has
        out = torch.full((B, S + width), pad_token_id, dtype=torch.long, device=dev)
        out[:, :S] = input_ids
        for b in range(B):
            out[b, S:S + len(new[b])] = torch.tensor(new[b], dtype=torch.long)
        return out, stats
