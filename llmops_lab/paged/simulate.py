"""Replaying a mix of request lengths through contiguous and paged KV allocation.

Kwon et al. 2023 (vLLM), section 3 and figure 2: systems that give each request a contiguous
region for its maximum length keep only 20.4-38.2% of that memory busy with actual token states
(Orca with max-length, power-of-two and oracle reservation); with blocks of 16 tokens, vLLM wastes
under 4%. Here a sampled mix of prompt and output lengths (lognormal, like chat traffic) is
allocated both ways. Paged memory is counted by the real ``BlockManager`` (blocks it hands out)
and set against ``formulas.paged_reserved_tokens``; the waste fractions come from
``formulas.kv_waste_fraction_contiguous`` and ``formulas.kv_waste_fraction_paged``.
Plain Python: no tensors.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .. import formulas
from ..checks import is_int, is_real
from ..engine import BlockManager, Sequence

# Kwon et al. 2023, figure 2 (time averages over a serving run): share of reserved KV memory holding
# token states in Orca reserving each request's maximum length (20.4%) and, as an oracle, its exact
# final length (38.2%; the rest there is reservation ahead of the tokens and external fragmentation,
# which our oracle scheme does not have), and the waste vLLM measured with paging.
VLLM_PAPER = {"orca_max_used": 0.204, "orca_oracle_used": 0.382, "paged_waste_below": 0.04}


@dataclass(frozen=True)
class Request:
    prompt_len: int
    output_len: int

    def __post_init__(self):
        if not is_int(self.prompt_len) or self.prompt_len < 1:
            raise ValueError(f"prompt_len must be an integer >= 1, got {self.prompt_len!r}")
        if not is_int(self.output_len) or self.output_len < 0:
            raise ValueError(f"output_len must be an integer >= 0, got {self.output_len!r}")

    @property
    def total(self) -> int:
        return self.prompt_len + self.output_len


def sample_requests(n: int = 1000, max_len: int = 2048, prompt_median: float = 100, output_median: float = 200,
                    sigma: float = 1.0, seed: int = 0) -> list[Request]:
    """n requests with lognormal prompt and output lengths (medians in tokens; sigma = 1 gives means
    of about 1.65 x the median, near ShareGPT's 161 prompt / 338 output tokens), each cut to max_len."""
    if not is_int(n) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not is_int(max_len) or max_len < 2:     # a float would give fractional lengths
        raise ValueError(f"max_len must be an integer >= 2, got {max_len!r}")
    for name, v in (("prompt_median", prompt_median), ("output_median", output_median)):
        if not (is_real(v) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v}")
    if not (is_real(sigma) and math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = min(max(1, round(rng.lognormvariate(math.log(prompt_median), sigma))), max_len - 1)
        o = min(max(1, round(rng.lognormvariate(math.log(output_median), sigma))), max_len - p)
        out.append(Request(p, o))
    return out


def in_flight(requests: list[Request], when: str = "end", seed: int = 0) -> tuple[list[Request], list[int]]:
    """The requests a snapshot finds, and the tokens each holds in its KV cache.

    "end": every request at the end of its generation (its peak). "during": a snapshot of a busy
    server in steady state, the time average the vLLM paper's figure 2 reports. A request stays in
    the server for as many steps as it generates tokens, so a snapshot finds a long request more
    often than a short one (length-biased sampling): as many requests as given are drawn, with
    replacement, in proportion to their output tokens (one step, the prefill, for a request with
    none), and each is caught at a uniformly random step of its decode. Drawing every request once
    instead would over-count short ones: at a 2048-token reservation, 84% waste where the time
    average is 75% (``tests/test_paged.py``)."""
    if when == "end":
        return list(requests), [r.total for r in requests]
    if when != "during":
        raise ValueError(f"when must be 'end' or 'during', got {when!r}")
    rng = random.Random(seed)
    found = rng.choices(requests, weights=[max(r.output_len, 1) for r in requests], k=len(requests))
    return found, [r.prompt_len + (rng.randint(1, r.output_len) if r.output_len else 0) for r in found]


def current_lengths(requests: list[Request], when: str = "end", seed: int = 0) -> list[int]:
    """Tokens in the KV cache of each request ``in_flight`` finds."""
    return in_flight(requests, when, seed)[1]


def paged_blocks_used(seq_lens: list[int], block_size: int) -> int:
    """Blocks the BlockManager hands out for sequences of these lengths (no sharing)."""
    need = sum(formulas.num_blocks(s, block_size) for s in seq_lens)
    bm = BlockManager(max(need, 1), block_size, enable_prefix_caching=False)
    for s in seq_lens:
        bm.allocate(Sequence([0] * s))
    return len(bm.blocks) - bm.num_free_blocks


def memory_report(requests: list[Request], max_len: int, block_size: int, when: str = "end",
                  seed: int = 0) -> dict:
    """KV slots (tokens) reserved and used by each allocation scheme, and the fractions wasted.

    Schemes: "contiguous, max length" (each request reserves max_len), "contiguous, oracle"
    (reserves exactly its final length: the best a contiguous allocator can do), "paged"
    (ceil(s / block_size) blocks, counted by the BlockManager).
    """
    if not requests:
        raise ValueError("no requests to report on")
    if not all(isinstance(r, Request) for r in requests):
        raise TypeError("requests must be a list of Request")
    if not is_int(max_len) or max_len < 1:
        raise ValueError(f"max_len must be an integer >= 1, got {max_len!r}")
    longest = max(r.total for r in requests)
    if longest > max_len:       # "during" lengths may fit, but the request cannot end in max_len slots
        raise ValueError(f"max_len {max_len} is shorter than a request ({longest} tokens at its end)")
    found, lens = in_flight(requests, when, seed)
    used = sum(lens)
    paged = paged_blocks_used(lens, block_size) * block_size
    reserved = {"contiguous, max length": len(lens) * max_len,
                "contiguous, oracle": sum(r.total for r in found),
                "paged": paged}
    return {
        "block_size": block_size, "used_tokens": used, "reserved_tokens": reserved,
        "paged_formula_tokens": sum(formulas.paged_reserved_tokens(s, block_size) for s in lens),
        "waste": {name: 1 - used / r for name, r in reserved.items()},
        "waste_formula": {"contiguous, max length": formulas.kv_waste_fraction_contiguous(lens, max_len),
                          "paged": formulas.kv_waste_fraction_paged(lens, block_size)},
        "paged_saving_vs_max_length": 1 - paged / reserved["contiguous, max length"],
    }


def parallel_sampling_blocks(prompt_len: int, output_lens: list[int], block_size: int) -> dict:
    """Blocks n samples of one prompt take when they share the prompt's blocks (fork, then
    copy-on-write), against n separate copies; counted by the BlockManager."""
    if not is_int(prompt_len) or prompt_len < 1:
        raise ValueError(f"prompt_len must be an integer >= 1, got {prompt_len!r}")
    if isinstance(output_lens, (str, bytes)) or not hasattr(output_lens, "__iter__"):
        raise TypeError(f"output_lens must be a list of output lengths, one per sample, got {output_lens!r}")
    output_lens = list(output_lens)
    if not output_lens or not all(is_int(o) and o >= 0 for o in output_lens):
        raise ValueError(f"output_lens must be one or more integers >= 0 (one per sample), got {output_lens!r}")
    n = len(output_lens)
    bm = BlockManager(sum(formulas.num_blocks(prompt_len + o, block_size) for o in output_lens),
                      block_size, enable_prefix_caching=False)
    parent = Sequence(list(range(prompt_len)))
    bm.allocate(parent)
    seqs = [parent]
    for _ in range(n - 1):
        child = Sequence(parent.token_ids)
        bm.fork(parent, child)
        seqs.append(child)
    copies = 0
    for s, o in zip(seqs, output_lens):
        for t in range(o):
            s.append_token(t)
            copies += bm.append_slot(s) is not None
    return {"shared_blocks": len(bm.blocks) - bm.num_free_blocks, "copies": copies,
            "separate_blocks": sum(formulas.num_blocks(prompt_len + o, block_size) for o in output_lens)}
