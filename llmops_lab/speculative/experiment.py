"""Measuring speculative decoding: speedup against k, temperature and batch, next to the formulas.

Every prediction is fed measured inputs: alpha from the run's own acceptance statistics, c from
timed single-token decode steps of each model, and the verify cost (a k+1-token target pass over
a 1-token one) timed on the same cache. Nothing here prints.
"""
from __future__ import annotations

import torch

from .. import formulas, measure
from ..kv import KVCache
from ..lean import LeanModel, generate_lean
from .decoder import SpeculativeDecoder


@torch.inference_mode()
def step_time(model, tokens: int = 1, context: int = 64, batch_size: int = 1, repeats: int = 20,
              lean: bool = True) -> float:
    """Median seconds of one cached forward of ``tokens`` new tokens after ``context`` cached ones,
    through the forward speculative decoding uses (``LeanModel``; ``lean=False``: the model's)."""
    dev = model.device
    cache = KVCache.for_model(model, batch_size, context + tokens)
    ids = torch.randint(3, model.config.vocab_size, (batch_size, context + tokens), device=dev,
                        generator=torch.Generator(device=dev).manual_seed(0))
    run = LeanModel(model) if lean else (lambda x, c: model(x, cache=c))
    run(ids[:, :context], cache)

    def once():
        cache.truncate(context)
        return run(ids[:, context:], cache)
    return measure.time_fn(once, warmup=3, repeats=repeats, device=dev).median


def cost_ratio(target, draft, context: int = 64, batch_size: int = 1) -> float:
    """c = T_draft / T_target for one decode step each (Leviathan et al.'s c)."""
    return step_time(draft, 1, context, batch_size) / step_time(target, 1, context, batch_size)


def verify_cost(target, k: int, context: int = 64, batch_size: int = 1) -> float:
    """Time of the target's k+1-token verify pass in units of its 1-token decode step."""
    return step_time(target, k + 1, context, batch_size) / step_time(target, 1, context, batch_size)


# transformers' own drafting policy, switched off so that assisted generation drafts our k: up to
# 20 drafts a step, cut short where the draft's confidence falls under a threshold it adapts.
_FIXED_K = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")


def fix_assistant_k(hf_draft, k: int) -> bool:
    """Make transformers' assisted generation draft exactly k tokens a step with ``hf_draft`` (its
    ``generation_config``: num_assistant_tokens = k, schedule "constant", confidence threshold 0,
    which turns the early stop off). Returns whether this transformers version has all three
    settings; where it lacks one, assisted generation may still draft by its own policy."""
    gc = hf_draft.generation_config
    values = dict(zip(_FIXED_K, (k, "constant", 0.0)))
    supported = [name for name in _FIXED_K if hasattr(gc, name)]
    for name in supported:
        setattr(gc, name, values[name])
    return len(supported) == len(_FIXED_K)


@torch.inference_mode()
def compare_assisted(target, draft, prompts, new_tokens: int = 64, k: int = 4, repeats: int = 3) -> dict:
    """Ours, transformers' assisted generation on the same weights, and the target alone: seconds
    summed over ``prompts`` (one [1, S] tensor or a list), each decoded at batch 1, the three timed
    in alternation per prompt (``measure.time_interleaved``). Greedy, no stop token.

    Both speculative decoders draft the same k tokens a step: transformers' adaptive drafting is
    set to a constant k (``fix_assistant_k``). ``assisted_fixed_k`` says whether this transformers
    version allowed it; where it is False, assisted generation ran its own default policy."""
    from ..peers import hf_twin
    prompts = [prompts] if torch.is_tensor(prompts) else list(prompts)
    hf_t, hf_d = hf_twin(target), hf_twin(draft)
    fixed = fix_assistant_k(hf_d, k)
    dec, runner = SpeculativeDecoder(target, draft, k), LeanModel(target)
    kw = dict(max_new_tokens=new_tokens, eos_token_id=None, do_sample=False, pad_token_id=2, assistant_model=hf_d)
    res = {"ours_s": 0.0, "assisted_s": 0.0, "target_s": 0.0, "same_tokens": True, "k": k,
           "assisted_fixed_k": fixed}
    for p in prompts:
        p = p.reshape(1, -1).to(target.device)
        out = {}
        fns = {"ours": lambda: out.__setitem__("ours", dec.generate(p, new_tokens, stop_token_ids=())[0]),
               "assisted": lambda: out.__setitem__("assisted", hf_t.generate(p, **kw)),
               "target": lambda: generate_lean(target, p, new_tokens, lean=runner)}
        times = measure.time_interleaved(fns, warmup=1, repeats=repeats, device=target.device)
        for name in ("ours", "assisted", "target"):
            res[f"{name}_s"] += times[name].median
        res["same_tokens"] &= torch.equal(out["ours"], out["assisted"][:, : out["ours"].shape[1]])
    return res


def _chi2(obs: torch.Tensor, exp: torch.Tensor) -> dict:
    """Pearson's chi-square of observed against expected counts, with its upper-tail p-value."""
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                            torch.tensor(chi2 / 2, dtype=torch.float64)))
    return {"chi2": chi2, "dof": dof, "p_value": p_value}


@torch.inference_mode()
def distribution_test(target, draft, prompt, n: int = 2000, temperature: float = 0.8, top_k=None, top_p=None,
                      k: int = 3, seed: int = 0) -> dict:
    """Two chi-square tests that speculative sampling draws from the target's distribution: ``n``
    rows of one prompt decoded as one batch, k + 1 new tokens each, so the first step drafts all k
    tokens and token k+1 is the bonus wherever a row accepted all k.

    - ``first_token``: the first new token's counts against the target's distribution.
    - ``token_k_plus_1``: token k+1 against the target's distribution given the row's own first k
      tokens. Each row has its own distribution there, so the test is on the randomized
      probability integral transform u = P(X < x) + V P(X = x), V uniform: u is uniform on [0, 1)
      exactly when x is drawn from that distribution; the u are counted in equal bins.

    ``p_value`` is the smaller of the two doubled (Bonferroni), so ``p_value < a`` rejects an
    exact sampler with probability at most a. A k the decoder would shrink (the prompt too close
    to the context) is refused."""
    from ..generation import logits_to_probs
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ids = prompt.reshape(1, -1).to(target.device)
    S = ids.shape[1]
    probs = logits_to_probs(target(ids)[0, -1], temperature, top_k, top_p).double()
    expected = probs.cpu() * n
    keep = expected >= 5                      # pool rare tokens into one cell, as the test requires
    # The test needs at least 2 cells (dof >= 1); with fewer it has nothing to test. Checked before
    # sampling, since the expected counts do not depend on the samples.
    cells = int(keep.sum()) + int(expected[~keep].sum() >= 5)
    bins = min(20, n // 5)                    # equal bins of u, each expecting n / bins >= 5
    if cells < 2 or bins < 2:
        raise ValueError(f"n={n} is too small for this distribution: only {min(cells, bins)} cell(s) expect >= 5 "
                         f"draws, and the chi-square test needs 2 or more; use a larger n")
    gen = torch.Generator(device=ids.device).manual_seed(seed)
    out, st = SpeculativeDecoder(target, draft, k).generate(
        ids.expand(n, -1), k + 1, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen,
        stop_token_ids=())
    if len(st.trace[0]["drafts"]) != k:
        raise ValueError(f"the decoder drafted {len(st.trace[0]['drafts'])} tokens, not k={k}, in its first step "
                         f"(a prompt of {S} tokens leaves too little context): this test cannot honour k")
    # First new token: one distribution for every row.
    counts = torch.bincount(out[:, S], minlength=probs.numel()).double().cpu()
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
    first = _chi2(obs, exp)
    # Token k+1: each row's own distribution given its first k new tokens.
    cond = logits_to_probs(target(out[:, :S + k])[:, -1], temperature, top_k, top_p).double().cpu()
    x = out[:, S + k].cpu()
    # The tokens ranked most likely first (ties by id): a token drawn from the wrong distribution
    # tends to rank low, so u piles up near 1. Any order fixed by the prefix keeps u uniform.
    order = cond.argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1).gather(1, x[:, None])
    p_x = cond.gather(1, x[:, None]).squeeze(1)
    below = cond.gather(1, order).cumsum(1).gather(1, rank).squeeze(1) - p_x
    v = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    u = (below + v * p_x).clamp(0, 1 - 1e-12)
    u_counts = torch.bincount((u * bins).long(), minlength=bins).double()
    last = _chi2(u_counts, torch.full((bins,), n / bins, dtype=torch.float64))
    first_accepts = st.accepted[:n]           # the first step: every row, in order
    last["bonus_rows"] = sum(a == k for a in first_accepts)
    return {"first_token": first, "token_k_plus_1": last, "k": k, "n": n, "alpha": st.alpha,
            "p_value": min(1.0, 2 * min(first["p_value"], last["p_value"])),
            "impossible_tokens": int(counts[expected == 0].sum()) + int((p_x == 0).sum())}


def predictions(alpha: float, k: int, c: float, t_target: float, verify: float) -> dict:
    """The document's formula, Leviathan et al.'s, and Leviathan's with the measured verify cost."""
    return {
        "as_written": formulas.speculative_speedup_as_written(t_target, c * t_target, alpha, k),
        "leviathan": formulas.speculative_speedup(alpha, k, c),
        "with_verify_cost": formulas.speculative_speedup_with_verify_cost(alpha, k, c, verify),
    }


def sweep_k(target, draft, prompts, ks=(1, 2, 3, 4, 5, 6, 8), new_tokens: int = 64, temperature: float = 0.0,
            repeats: int = 3, context: int = 64) -> list[dict]:
    """Measured speedup over the target alone, per k, with the three predictions beside it.

    ``prompts``: one [1, S] tensor or a list of them, decoded one at a time (batch 1); times are
    summed over the prompts (the median of ``repeats`` each) and alpha pooled over all their draft
    positions. Per prompt the target alone and every k are timed in alternation
    (``measure.time_interleaved``), so a machine that speeds up or slows down during the sweep does
    not show as a speedup.
    """
    prompts = [prompts] if torch.is_tensor(prompts) else list(prompts)
    if not prompts or not all(torch.is_tensor(p) and p.numel() for p in prompts):
        raise ValueError("sweep_k needs at least one prompt, each a non-empty tensor of token ids")
    ks = tuple(ks)
    if not ks:
        raise ValueError("sweep_k needs at least one k")
    prompts = [p.reshape(1, -1).to(target.device) for p in prompts]
    runner = LeanModel(target)
    decoders = {k: SpeculativeDecoder(target, draft, k) for k in ks}
    base, seconds, stats = 0.0, {k: 0.0 for k in ks}, {k: [] for k in ks}
    for p in prompts:
        last = {}

        def spec(k):
            g = torch.Generator(device=p.device).manual_seed(0)
            last[k] = decoders[k].generate(p, new_tokens, temperature=temperature, generator=g,
                                           stop_token_ids=())[1]

        def alone():    # the same sampling as the speculative runs, so only speculation differs
            g = torch.Generator(device=p.device).manual_seed(0)
            generate_lean(target, p, new_tokens, temperature=temperature, generator=g, lean=runner)
        fns = {"target": alone}
        fns.update({k: (lambda k=k: spec(k)) for k in ks})
        times = measure.time_interleaved(fns, warmup=1, repeats=repeats, device=target.device)
        base += times["target"].median
        for k in ks:
            seconds[k] += times[k].median
            stats[k].append(last[k])
    t_step = step_time(target, 1, context)
    c = step_time(draft, 1, context) / t_step
    rows = []
    for k in ks:
        runs = stats[k]
        alpha = sum(sum(st.position_accepts) for st in runs) / sum(sum(st.position_tries) for st in runs)
        steps = sum(len(st.gained) for st in runs)
        tokens = sum(sum(st.gained) for st in runs)                # accepted drafts + one token, as kept
        v = step_time(target, k + 1, context) / t_step
        # The same two costs as the decoder met them inside its loop (its own clocks: the draft
        # after each target pass has evicted its weights from cache), in units of the target
        # alone's time per token in its own loop (base: every prompt's new_tokens, prefill included).
        t_alone = base / (len(prompts) * new_tokens)
        # per draft token made: the last step of a request drafts only what it still needs
        c_loop = sum(st.draft_seconds for st in runs) / max(sum(st.drafts for st in runs), 1) / t_alone
        v_loop = sum(st.target_seconds for st in runs) / steps / t_alone
        rows.append({"k": k, "temperature": temperature, "alpha": alpha, "tokens_per_step": tokens / steps,
                     "expected_tokens_per_step": formulas.expected_tokens_per_step(min(alpha, 1 - 1e-9), k),
                     "speedup": base / seconds[k], "c": c, "verify_cost": v, "seconds": seconds[k],
                     "target_seconds": base, "n_prompts": len(prompts), "c_in_loop": c_loop,
                     "verify_cost_in_loop": v_loop,
                     **{f"predicted_{name}": val for name, val in predictions(alpha, k, c, t_step, v).items()},
                     "predicted_in_loop": formulas.speculative_speedup_with_verify_cost(
                         min(alpha, 1 - 1e-9), k, c_loop, v_loop)})
    return rows


def sweep_batch(target, draft, prompts_ids, batch_sizes=(1, 2, 4, 8), k: int = 4, new_tokens: int = 32,
                repeats: int = 2) -> list[dict]:
    """Speedup against batch size: the target's batched step gets cheaper per row, the draft's
    relative cost and the verify cost grow, and rows wait for each other."""
    if not torch.is_tensor(prompts_ids):
        raise TypeError(f"prompts_ids must be a [rows, S] tensor, got {type(prompts_ids).__name__}")
    if prompts_ids.dim() != 2:
        raise ValueError(f"prompts_ids must be a [rows, S] tensor, got shape {tuple(prompts_ids.shape)}")
    rows_given = prompts_ids.shape[0]
    for B in batch_sizes:
        if not 1 <= B <= rows_given:     # a larger B would run fewer rows than it reports
            raise ValueError(f"batch size {B} in batch_sizes must be between 1 and the {rows_given} "
                             f"rows of prompts_ids")
    rows = []
    runner, dec = LeanModel(target), SpeculativeDecoder(target, draft, k)
    for B in batch_sizes:
        ids = prompts_ids[:B].to(target.device)
        last = {}
        times = measure.time_interleaved(
            {"target": lambda: generate_lean(target, ids, new_tokens, lean=runner),
             "spec": lambda: last.__setitem__("stats", dec.generate(ids, new_tokens, stop_token_ids=())[1])},
            warmup=1, repeats=repeats, device=target.device)
        base, t = times["target"].median, times["spec"].median
        rows.append({"batch_size": B, "k": k, "alpha": last["stats"].alpha, "speedup": base / t,
                     "target_tokens_per_s": B * new_tokens / base, "speculative_tokens_per_s": B * new_tokens / t})
    return rows
