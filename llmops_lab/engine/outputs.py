"""What a request gives back, with vLLM's names: ``RequestOutput`` holding ``CompletionOutput``s, and
the per-request latency metrics (time to first token, time per output token, end-to-end)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None      # "stop", "length", "abort", "error", None while running
    stop_reason: int | str | None = None  # the stop token id or string that ended it
    num_preemptions: int = 0
    cumulative_logprob: float | None = None   # vLLM's fields for log-probabilities: not computed
    logprobs: list | None = None              # here (SamplingParams refuses logprobs), so None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Seconds on ``time.perf_counter``'s clock; the derived latencies are None until known."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_output_tokens: int = 0          # the longest sample's (n > 1): the length of the request's decode
    last_token_time: float | None = None   # static batching: the row is done but waits for its batch

    @property
    def ttft(self) -> float | None:
        """Time to first token: arrival to the first sampled token (queueing and prefill)."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (finish - first token) / (tokens - 1)."""
        if self.finish_time is None or self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def e2e(self) -> float | None:
        """End-to-end latency: arrival to the last token."""
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    metrics: RequestMetrics | None = None
    error: str | None = None              # why the request failed (finish_reason "error")
    prompt_logprobs: list | None = None   # vLLM's field; not computed here (SamplingParams refuses it)
