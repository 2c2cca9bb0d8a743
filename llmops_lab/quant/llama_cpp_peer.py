"""llama.cpp as a peer: a GGUF file run by llama-cpp-python, shaped like our ``LlamaModel``.

``LlamaCppPeer(path)`` answers ``peer(ids) -> logits`` and ``peer.generate(ids, max_new_tokens)``
(greedy) on token ids, never text, so a tokenizer difference cannot hide behind a model difference.
Because it has our model's calling convention, ``evaluate.perplexity``, ``evaluate.greedy_agreement``
and ``speed.decode_prefill_speed`` measure it with the very code that measures us: the same
windows, the same cross-entropy, the same timing. ``gguf_comparison`` does so for our weights
exported to GGUF at each format, against our own runtime.
"""
from __future__ import annotations

import warnings

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..checks import is_int
from ..corpus import read_slice
from .speed import decode_prefill_speed

GGML_TYPE_F32 = 0  # ggml_type of an fp32 tensor (llama_cpp.GGML_TYPE_F32), for the KV cache


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
    kv_f32: keep llama.cpp's KV cache in fp32. Its default is fp16 whatever the weights' type, which
        moves an F32 file's logits by a few 1e-3 from ours; the default here is llama.cpp's own, as
        its users run it.
    """

    def __init__(self, path: str | Path, n_ctx: int | None = None, n_threads: int | None = None,
                 n_batch: int = 512, kv_f32: bool = False):
        from llama_cpp import Llama
        from .gguf import read_gguf_metadata
        meta = read_gguf_metadata(path)
        ctx_train = int(meta["llama.context_length"])
        self.path = Path(path)
        threads = n_threads or torch.get_num_threads()
        kv = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if kv_f32 else {}
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx or ctx_train, n_batch=n_batch,
                         n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False, **kv)
        # llama.cpp rounds its context up (to 256) but keeps logits for the n_ctx asked for only
        n_ctx = min(self.llm.n_ctx(), self.llm.context_params.n_ctx)
        self.config = SimpleNamespace(max_position_embeddings=min(ctx_train, n_ctx),
                                      vocab_size=self.llm.n_vocab(),
                                      eos_token_ids=(self.llm.token_eos(),))
        self.device = torch.device("cpu")

    def _check_ids(self, input_ids) -> None:
        """Token ids llama.cpp can run: integers in [0, vocab), rows of 1 to the context's tokens (it
        otherwise fails with a raw numpy broadcast error or "llama_decode returned -1")."""
        if not torch.is_tensor(input_ids) or input_ids.is_floating_point() or input_ids.is_complex() \
                or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor of token ids, got "
                            f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        n, vocab, n_ctx = input_ids.shape[-1], self.config.vocab_size, self.config.max_position_embeddings
        if input_ids.numel() == 0 or n > n_ctx:
            raise ValueError(f"input_ids rows must hold 1 to {n_ctx} tokens (the context), got shape "
                             f"{tuple(input_ids.shape)}")
        if input_ids.min() < 0 or input_ids.max() >= vocab:
            raise ValueError(f"input_ids must lie in [0, {vocab}), got ids from {int(input_ids.min())} "
                             f"to {int(input_ids.max())}")

    def _run(self, ids: list[int]) -> np.ndarray:
        """Logits [S, V] for a fresh sequence (the KV cache is cleared first)."""
        self.llm.reset()
        self.llm.eval(ids)
        return self.llm.scores[: len(ids)]

    def __call__(self, input_ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits [B, S, V] (or [B, 1, V] with ``last_only``) for input_ids [B, S], row by row."""
        self._check_ids(input_ids)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        rows = []
        for row in input_ids.tolist():
            logits = self._run(row)
            rows.append(torch.from_numpy(np.array(logits[-1:] if last_only else logits, dtype=np.float32)))
        return torch.stack(rows)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, stop_token_ids=None,
                 temperature: float = 0.0, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy continuation [B, S + n] of input_ids [B, S] (argmax of llama.cpp's logits).

        Rows run one by one, unpadded: ``attention_mask`` is accepted only when it is all ones.
        Other sampling arguments of ``LlamaModel.generate`` (top_k, pad_token_id, generator...)
        are not taken: a TypeError names them rather than ignoring them.
        """
        if temperature != 0.0:
            raise ValueError("the llama.cpp peer decodes greedily only (temperature=0)")
        if not is_int(max_new_tokens) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if torch.is_tensor(input_ids) and input_ids.dim() == 1:
            input_ids = input_ids[None]
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [seq] or [batch, seq], got shape {tuple(getattr(input_ids, 'shape', ()))}")
        self._check_ids(input_ids)
        if attention_mask is not None:
            # Padding would be fed to llama.cpp as real tokens: refuse it, pass prompts unpadded.
            if torch.is_tensor(attention_mask) and attention_mask.dim() == 1:
                attention_mask = attention_mask[None]
            if not torch.is_tensor(attention_mask) or attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}")
            if not bool((attention_mask == 1).all()):
                raise ValueError("the llama.cpp peer runs each row unpadded: attention_mask must be all ones "
                                 "(generate each padded prompt separately without its padding)")
        stops = set(self.config.eos_token_ids if stop_token_ids is None else stop_token_ids)
        ctx = self.config.max_position_embeddings
        # as LlamaModel.generate: the last new token is sampled, never fed back, so a row gets
        # ctx - S + 1 at most (a prompt of the whole context still gets one), and a cut is said
        if input_ids.shape[1] + max_new_tokens - 1 > ctx:
            warnings.warn(f"generation truncated at the context: {ctx - input_ids.shape[1] + 1} new tokens, "
                          f"not {max_new_tokens}", stacklevel=2)
        out = []
        for row in input_ids.tolist():
            n = min(max_new_tokens, ctx - len(row) + 1)
            logits = self._run(row)[-1]
            new = []
            for step in range(n):
                tok = int(np.argmax(logits))
                new.append(tok)
                if tok in stops or step == n - 1:
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


@torch.inference_mode()
def gguf_comparison(model_name: str = "target", formats=("F32", "Q8_0", "Q4_0", "Q4_K_M"), out_dir=None,
                    n_prompts: int = 8, new_tokens: int = 32, window: int = 256, max_windows: int = 8,
                    speed_prompt_len: int = 32, speed_new_tokens: int = 64, repeats: int = 3,
                    n_threads: int | None = None) -> list[dict]:
    """Our fp32 runtime against llama.cpp running our weights exported to GGUF at each format.

    Every measurement goes through the same library function for both runtimes: perplexity on the
    held-out slice (``evaluate.perplexity``: same windows), greedy continuations of held-out
    prompts (token ids in, so tokenizers cannot differ), the teacher-forced argmax agreement along
    our continuation (``evaluate.greedy_agreement``) and decode speed (``decode_prefill_speed``).
    "Q4_K_M" is made by llama.cpp's quantizer from the F32 file (``gguf.quants`` cannot encode it).
    n_threads: threads of both runtimes (torch's are set for the call and restored; default torch's
        current count). On shared cores prefer 1: both runtimes' threads spin at barriers and
        crawl when another process holds a core.

    Returns one dict per runtime/format: runtime, format, threads, file_bytes (GGUF size; ours: the
    safetensors file), ppl, ppl_ratio (this / ours), greedy_prefix (mean fraction of the
    continuation identical to ours before the first difference), exact_prompts (continuations
    identical to ours), agreement (argmax agreement along our continuation), prefill_tok_s,
    decode_tok_s, decode_ratio (this / ours: > 1 is faster), tokenization_same.
    """
    import tempfile

    torch_threads = torch.get_num_threads()
    n_threads = n_threads or torch_threads
    torch.set_num_threads(n_threads)
    try:
        return _gguf_comparison(model_name, formats, Path(out_dir or tempfile.mkdtemp(prefix="llmops-gguf-")),
                                n_prompts, new_tokens, window, max_windows, n_threads,
                                dict(batch_sizes=(1,), prompt_len=speed_prompt_len, new_tokens=speed_new_tokens,
                                     repeats=repeats))
    finally:
        torch.set_num_threads(torch_threads)


def _gguf_comparison(model_name, formats, out_dir, n_prompts, new_tokens, window, max_windows, n_threads,
                     speed_kw) -> list[dict]:
    from .. import evaluate
    from ..loader import embedded_model_path, load_model, load_tokenizer
    from .gguf import GGUF_TYPES, export_gguf, requantize

    model = load_model(model_name, device="cpu")
    tok = load_tokenizer(model_name)
    text = read_slice("validation")
    ids = evaluate.encode(tok, text)
    prompts = evaluate.held_out_prompts(tok, text, n=n_prompts)
    ours_seqs = [model.generate(p[None], max_new_tokens=new_tokens, stop_token_ids=())[0, p.numel():].tolist()
                 for p in prompts]

    def row(runtime, fmt, runner, nbytes, seqs):
        speed = decode_prefill_speed({fmt: lambda: runner}, **speed_kw)[0]
        return {"runtime": runtime, "format": fmt, "threads": n_threads, "file_bytes": nbytes,
                "ppl": evaluate.perplexity(runner, ids, window=window, max_windows=max_windows),
                "greedy_prefix": sum(evaluate.common_prefix(a, b) for a, b in zip(seqs, ours_seqs)) / (new_tokens * len(prompts)),
                "exact_prompts": sum(a == b for a, b in zip(seqs, ours_seqs)),
                "agreement": evaluate.greedy_agreement(model, runner, prompts, new_tokens)["alpha"],
                "prefill_tok_s": 1e3 / speed["prefill_ms_per_token"],
                "decode_tok_s": 1e3 / speed["decode_ms_per_token"]}

    weights = embedded_model_path(model_name) / "model.safetensors" if model_name in ("target", "draft") else None
    rows = [row("ours", "fp32", model, weights.stat().st_size if weights else None, ours_seqs)]
    rows[0]["tokenization_same"] = True
    f32 = None
    for fmt in formats:
        path = out_dir / f"{model_name}-{fmt}.gguf"
        if fmt in GGUF_TYPES:
            export_gguf(model, tok, path, fmt)
        else:
            f32 = f32 or export_gguf(model, tok, out_dir / f"{model_name}-F32.gguf", "F32")
            requantize(f32, path, fmt)
        peer = LlamaCppPeer(path, n_threads=n_threads)
        seqs = [peer.generate(p[None], max_new_tokens=new_tokens, stop_token_ids=())[0, p.numel():].tolist()
                for p in prompts]
        r = row("llama.cpp", fmt, peer, path.stat().st_size, seqs)
        r["tokenization_same"] = compare_tokenization(peer, tok, text[:20_000])["same"]
        rows.append(r)
        peer.close()
    for r in rows:
        r["ppl_ratio"] = r["ppl"] / rows[0]["ppl"]
        r["decode_ratio"] = r["decode_tok_s"] / rows[0]["decode_tok_s"]
    return rows
