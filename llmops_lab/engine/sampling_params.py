"""SamplingParams: how one request is decoded, with vLLM's field names and defaults.

``SamplingParams(temperature=0.7, max_tokens=256)`` means what it means in vLLM: a temperature under
1e-5 is greedy (0 included; below that, logits / temperature overflows fp32), ``top_k`` of 0 or -1
and ``top_p`` of 1 switch those filters off, ``n`` samples share the prompt's KV blocks, ``stop``
strings end a completion (and are cut from its text; they are looked for in the text each new
token adds), ``min_tokens`` holds back the end-of-sequence token and ``stop_token_ids`` (their
logits are masked) and the stop strings until that many tokens are out, ``ignore_eos`` keeps going
past the end-of-sequence token (benchmarks use it to fix output lengths). As in vLLM, the stop
string or stop token that ends a completion is left out of its text unless
``include_stop_str_in_output``. ``output_kind`` (vLLM's ``RequestOutputKind``) says what
``LLMEngine.step`` returns for the request while it runs: its whole output so far (``CUMULATIVE``,
vLLM's default), only what is new since the last one (``DELTA``), or nothing until it finishes
(``FINAL_ONLY``, what ``LLM.generate`` and the benchmarks use).
Validated on construction: a bad value is an error here, never a silent change of behaviour. vLLM's
fields that this engine does not implement (log-probabilities, penalties, special tokens in the
text) are accepted at their defaults, so snippets that spell them out run, and refused otherwise.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import Enum

from ..checks import is_int as _is_int
from ..checks import is_real as _is_real


GREEDY_BELOW = 1e-5     # temperatures under this sample greedily

# vLLM's fields that are not implemented here, each with the only value accepted (vLLM's default)
NOT_IMPLEMENTED = {"logprobs": None, "prompt_logprobs": None, "presence_penalty": 0.0,
                   "frequency_penalty": 0.0, "repetition_penalty": 1.0, "skip_special_tokens": True}


class RequestOutputKind(Enum):
    """What ``LLMEngine.step`` returns for a running request (vLLM's enum, same members)."""
    CUMULATIVE = 0       # every step that adds tokens: the whole completion so far
    DELTA = 1            # every step that adds tokens: only the tokens and text new since the last output
    FINAL_ONLY = 2       # once, when it finishes


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] | list[str] | str | None = None
    stop_token_ids: tuple[int, ...] | list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"SamplingParams: {msg}")
        for name, default in NOT_IMPLEMENTED.items():
            value = getattr(self, name)
            if value is not default and (isinstance(value, bool) != isinstance(default, bool) or value != default):
                bad(f"{name}={value!r} is not implemented by this engine (only vLLM's default, {default!r})")
        if self.max_tokens is None:
            bad("max_tokens=None (vLLM: up to the model's context) is not supported here: give a number "
                "(a completion also ends at the model's context)")
        if not _is_int(self.n) or self.n < 1:
            bad(f"n must be an integer >= 1, got {self.n!r}")
        # a NaN passes every comparison below and would sample from NaN probabilities
        if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            bad(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            bad(f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            bad(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        for name in ("ignore_eos", "include_stop_str_in_output"):   # "no" is truthy: a silent flip
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.output_kind, RequestOutputKind):
            bad(f"output_kind must be a RequestOutputKind ({', '.join(k.name for k in RequestOutputKind)}), "
                f"got {self.output_kind!r}")
        if self.seed is not None and not _is_int(self.seed):
            bad(f"seed must be an integer or None, got {self.seed!r}")
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            bad(f"stop must be a string or a list of strings, got {self.stop!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            bad(f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            bad(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        ids = tuple(self.stop_token_ids or ())
        if any(not _is_int(t) or t < 0 for t in ids):
            bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature under ``GREEDY_BELOW`` (vLLM's sampling epsilon)."""
        return self.temperature < GREEDY_BELOW

    def banned_tokens(self, eos_ids, num_output_tokens: int) -> list[int]:
        """Token ids that may not be sampled next, after ``num_output_tokens`` tokens: before
        ``min_tokens``, the end-of-sequence ids (unless ``ignore_eos``) and ``stop_token_ids``."""
        if num_output_tokens >= self.min_tokens:
            return []
        return sorted(set(self.stop_token_ids) | (set() if self.ignore_eos else set(eos_ids)))

    @property
    def top_k_or_none(self) -> int | None:
        return self.top_k if self.top_k > 0 else None

    @property
    def top_p_or_none(self) -> float | None:
        return self.top_p if self.top_p < 1 else None


def stop_reason(seq, tok: int, eos_ids, max_model_len: int, tokenizer=None):
    """Why seq (whose newest token is tok) ends now: ("stop", the stop token id or string; None for
    the end-of-sequence token, as vLLM reports it), ("length", None), or (None, None) to go on.
    Shared by the engine and the static baseline. A stop string counts where it overlaps the text
    the newest token added (``stop_string_at``), and only from the token after the first
    ``min_tokens`` (vLLM's rule), so one that appeared before then does not end the completion later."""
    p = seq.sampling_params
    n_out = seq.num_completion_tokens
    if n_out >= p.min_tokens:                # stop tokens are masked until then (``banned_tokens``)
        if not p.ignore_eos and tok in eos_ids:
            return "stop", None
        if tok in p.stop_token_ids:
            return "stop", tok
        if p.stop and n_out > p.min_tokens:
            prompt = seq.prompt_token_ids
            texts = _texts(tokenizer, seq.output_token_ids, prompt)  # decoded once for every stop string
            for s in p.stop:
                if stop_string_at(tokenizer, seq.output_token_ids, s, texts, prompt) >= 0:
                    return "stop", s
    if n_out >= p.max_tokens or len(seq) >= max_model_len:
        return "length", None
    return None, None


DETOKENIZE_CONTEXT = 5   # prompt tokens decoded ahead of the completion (vLLM's detokenizer starts 5 back)


def decode_completion(tokenizer, output_ids, prompt_ids=()) -> str:
    """The completion's text as it reads after its prompt (special tokens skipped).

    Decoded alone, a completion can lose its first character: SentencePiece-style tokenizers
    (Llama's, Mistral's: a "▁" marks a space) drop the space of the first token of a string, so
    " Paris" came back "Paris" and prompt + text was not the decoded sequence. So the last few
    prompt tokens are decoded too, and their text taken off the front, as vLLM's detokenizer does.
    A byte-level tokenizer (the embedded one) gives the same text either way.
    """
    return _after(tokenizer, output_ids, *_tail(tokenizer, prompt_ids))


def _tail(tokenizer, prompt_ids) -> tuple[list[int], str | None]:
    """The prompt's last DETOKENIZE_CONTEXT tokens and their text (None without a prompt)."""
    ctx = list(prompt_ids[-DETOKENIZE_CONTEXT:]) if len(prompt_ids) else []
    return ctx, (tokenizer.decode(ctx, skip_special_tokens=True) if ctx else None)


def _after(tokenizer, output_ids, ctx: list[int], pre: str | None) -> str:
    """``decode_completion`` with the prompt's tail ``ctx`` already decoded as ``pre``."""
    if ctx:
        full = tokenizer.decode(ctx + list(output_ids), skip_special_tokens=True)
        # a prompt ending inside a character that the completion finishes: its text is no prefix
        if full.startswith(pre):
            return full[len(pre):]
    return tokenizer.decode(output_ids, skip_special_tokens=True)


def _texts(tokenizer, output_ids, prompt_ids=()) -> tuple[str, str]:
    """The completion's text with and without its last token (special tokens skipped); the prompt's
    tail is decoded once for both (this runs at every step of a request with stop strings)."""
    tail = _tail(tokenizer, prompt_ids)
    return _after(tokenizer, output_ids, *tail), _after(tokenizer, output_ids[:-1], *tail)


def stop_string_at(tokenizer, output_ids, stop: str, texts: tuple[str, str] | None = None,
                   prompt_ids=()) -> int:
    """Where ``stop`` starts in the completion's text (special tokens skipped, as the text
    returned), counting only an occurrence that overlaps what the last token added; -1 if none.
    ``texts``: ``_texts`` of these ids, when already decoded."""
    text, before = texts or _texts(tokenizer, output_ids, prompt_ids)
    # A character split across byte tokens decodes as U+FFFD until its last byte comes: the text
    # before this token may end in one where the full text has the real character, so the search
    # starts where the two texts stop agreeing, not at len(before) (which skipped a stop like "é").
    same = len(before.rstrip("\ufffd"))
    return text.find(stop, max(0, same - len(stop) + 1))


def final_only(params: SamplingParams) -> SamplingParams:
    """params, asking for the request's output only when it finishes (``LLM.generate``, benchmarks)."""
    if params.output_kind is RequestOutputKind.FINAL_ONLY:
        return params
    return dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)


def streamed_text(text: str, params: SamplingParams) -> str:
    """The part of a running completion's text that is safe to hand out: without a trailing
    character still being assembled from byte tokens (U+FFFD until its last byte comes), and, when
    stop strings are cut from the text, without the last ``len(longest stop) - 1`` characters,
    which may turn out to begin a stop string (vLLM's detokenizer holds the same back)."""
    text = text.rstrip("\ufffd")
    if params.stop and not params.include_stop_str_in_output:
        text = text[:max(0, len(text) - (max(map(len, params.stop)) - 1))]
    return text


def completion_text(tokenizer, output_ids, stop_reason, finish_reason=None, include_stop: bool = False,
                    prompt_ids=()) -> str:
    """The completion's text (special tokens skipped), cut before the stop string that ended it,
    and without the stop token (a ``stop_token_ids`` entry or end-of-sequence) that ended it, as
    vLLM leaves them out; the token ids keep it. ``include_stop`` (``include_stop_str_in_output``):
    the text keeps the stop token's text, or runs to the end of the stop string. ``prompt_ids``:
    the prompt, whose last tokens are decoded ahead of the completion (``decode_completion``)."""
    if tokenizer is None:
        return ""
    if finish_reason == "stop" and not isinstance(stop_reason, str) and not include_stop:
        output_ids = output_ids[:-1]
    text = decode_completion(tokenizer, output_ids, prompt_ids)
    if isinstance(stop_reason, str):
        at = stop_string_at(tokenizer, output_ids, stop_reason, prompt_ids=prompt_ids)
        if at >= 0:
            text = text[:at + (len(stop_reason) if include_stop else 0)]
    return text
