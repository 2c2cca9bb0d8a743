"""llama.cpp as a peer: a GGUF file run by llama-cpp-python, shaped like our ``LlamaModel``.

``LlamaCppPeer(path)`` answers ``peer(ids) -> logits`` and ``peer.generate(ids, max_new_tokens)``
(greedy) on token ids, never text, so a tokenizer difference cannot hide behind a model difference.
Because it has our model's calling convention, ``evaluate.perplexity``, ``evaluate.greedy_agreement``
and ``experiment.decode_prefill_speed`` measure it with the very code that measures us: the same
windows, the same cross-entropy, the same timing.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:     # not installed, or its shared library failed to load
        return False
    return True


class LlamaCppPeer:
    """A GGUF model in llama.cpp (CPU), with ``LlamaModel``'s ``__call__`` and ``generate``.

    n_ctx: the context llama.cpp allocates (default the file's training context).
    n_threads: default torch's thread count, so both runtimes use the same cores.
    """

    def __init__(self, path: str | Path, n_ctx: int | None = None, n_threads: int | None = None,
                 n_batch: int = 512):
        from llama_cpp import Llama
        from .gguf import read_gguf_metadata
        meta = read_gguf_metadata(path)
        ctx_train = int(meta["llama.context_length"])
        self.path = Path(path)
        threads = n_threads or torch.get_num_threads()
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx or ctx_train, n_batch=n_batch,
                         n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)
        self.config = SimpleNamespace(max_position_embeddings=min(ctx_train, self.llm.n_ctx()),
                                      vocab_size=self.llm.n_vocab(),
                                      eos_token_ids=(self.llm.token_eos(),))
        self.device = torch.device("cpu")

    def _run(self, ids: list[int]) -> np.ndarray:
        """Logits [S, V] for a fresh sequence (the KV cache is cleared first)."""
        self.llm.reset()
        self.llm.eval(ids)
        return self.llm.scores[: len(ids)]

    def __call__(self, input_ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits [B, S, V] (or [B, 1, V] with ``last_only``) for input_ids [B, S], row by row."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        rows = []
        for row in input_ids.tolist():
            logits = self._run(row)
            rows.append(torch.from_numpy(np.array(logits[-1:] if last_only else logits, dtype=np.float32)))
        return torch.stack(rows)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, stop_token_ids=None,
                 temperature: float = 0.0, **_) -> torch.Tensor:
        """Greedy continuation [B, S + n] of input_ids [B, S] (argmax of llama.cpp's logits)."""
        if temperature != 0.0:
            raise ValueError("the llama.cpp peer decodes greedily only (temperature=0)")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        stops = set(self.config.eos_token_ids if stop_token_ids is None else stop_token_ids)
        out = []
        for row in input_ids.tolist():
            room = self.config.max_position_embeddings - len(row)
            logits = self._run(row)[-1]
            new = []
            for step in range(min(max_new_tokens, room)):
                tok = int(np.argmax(logits))
                new.append(tok)
                if tok in stops or step == max_new_tokens - 1:
                    break
                self.llm.eval([tok])
                logits = self.llm.scores[self.llm.n_tokens - 1]
            out.append(row + new)
        width = max(map(len, out))
        pad = next(iter(stops), 0)
        return torch.tensor([r + [pad] * (width - len(r)) for r in out], dtype=torch.long)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of ``text`` (no BOS, special tokens not parsed)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def close(self) -> None:
        self.llm.close()


def compare_tokenization(peer: LlamaCppPeer, tokenizer, text: str) -> dict:
    """Does llama.cpp tokenize ``text`` as our tokenizer does? ``same``, both lengths, and the
    first differing position (None when equal)."""
    from ..evaluate import encode
    ours = encode(tokenizer, text).tolist()
    theirs = list(peer.tokenize(text))
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if first is None and len(ours) != len(theirs):
        first = min(len(ours), len(theirs))
    return {"same": first is None, "n_ours": len(ours), "n_llama_cpp": len(theirs), "first_diff": first}
