"""The ``llmops-lab`` command.

    llmops-lab info                        the machine and the embedded models
    llmops-lab bench [--device cuda] ...   the benchmark suite (python -m llmops_lab.bench)
    llmops-lab kv llama-2-70b --gpu "H100 80GB"
                                           what fits in a GPU's KV cache (vLLM's start-up sum)
    llmops-lab generate "To be, or" --max-tokens 40 [--quantize gptq --bits 4]
                                           generation through the continuous-batching engine
    llmops-lab perplexity [--quantize awq --bits 3]
                                           perplexity on the held-out text, and the weights' bytes
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

DEFAULT_GPU = "H100 80GB"
KV_EPILOG = """\
The figures are vLLM's start-up sum with the formulas, not a measurement, and are upper bounds on
what vLLM logs: vLLM also subtracts the memory allocated outside PyTorch (CUDA context, cuBLAS and
NCCL workspaces: about 0.5 to 1+ GiB per GPU; --non-torch-gib) and the activations of its profiling
run (--activation-gib), both 0 by default here. For a sliding-window model vLLM v1 holds
cdiv(min(W - 1 + max_num_batched_tokens, max_model_len), block_size) + 1 blocks per sequence (the
window plus a prefill chunk); without --max-num-batched-tokens the chunk is left out.
--kv-dtype fp8 is 1 byte per element (vLLM's per-tensor scales); int8 adds one fp16 scale per
token and KV head, as llmops_lab.kv.Int8KVCache stores it (1 + 2/head_dim bytes per element)."""


def info() -> str:
    from . import device
    from .loader import DATA_DIR
    lines = [device.describe(), ""]
    card = DATA_DIR / "models" / "card.json"
    if card.exists():
        c = json.loads(card.read_text())
        for w, r in c["training"].items():
            ppl = c["measured"]["val_perplexity_1024"][w]
            lines.append(f"embedded {w}: {r['parameters'] / 1e6:.2f}M parameters, {r['tokens_seen'] / 1e6:.1f}M "
                         f"tokens seen, validation perplexity {ppl:.1f}")
        lines.append(f"draft/target greedy acceptance rate: {c['measured']['greedy_acceptance']:.3f}")
        lines.append(f"model card: {DATA_DIR / 'models' / 'README.md'}")
    else:
        lines.append("embedded models: not trained yet (python -m llmops_lab.train all)")
    return "\n".join(lines)


def model_config(name: str):
    """A preset's ``ModelConfig`` (``llmops_lab.presets``), else a checkpoint's: ``target``/``draft``,
    a folder holding config.json, or a config.json itself."""
    from .config import ModelConfig
    from .loader import EMBEDDED, embedded_model_path
    from .presets import PRESETS, get_preset
    if name.strip().lower() in PRESETS:
        return get_preset(name)
    try:
        return ModelConfig.from_json(embedded_model_path(name) if name in EMBEDDED else Path(name).expanduser())
    except FileNotFoundError:
        raise ValueError(f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint folder "
                         f"or config.json on this machine") from None


def kv(a) -> str:
    """The calculator's answer for the parsed ``kv`` arguments, as text."""
    from . import formulas
    from .kv.calculator import GPU_MEMORY, KV_CACHE_DTYPES, default_weight_bits, kv_cache_budget, kv_heads_per_gpu
    config = model_config(a.model)
    if a.gpu_memory_gib is not None and a.gpu is not None:
        raise ValueError(f"give --gpu or --gpu-memory-gib, not both (got {a.gpu!r} and {a.gpu_memory_gib:g})")
    if a.gpu_memory_gib is not None:
        total, gpu = a.gpu_memory_gib * 2**30, f"{a.gpu_memory_gib:g} GiB"
    else:
        names = {k.lower().replace(" ", ""): k for k in GPU_MEMORY}
        key = names.get((a.gpu or DEFAULT_GPU).lower().replace(" ", ""))
        if key is None:
            raise ValueError(f"unknown GPU {a.gpu!r}; known: {', '.join(GPU_MEMORY)} (or give --gpu-memory-gib)")
        total, gpu = GPU_MEMORY[key], key
    kv_dtype = KV_CACHE_DTYPES[a.kv_dtype]
    elem, scale = kv_dtype["dtype_bytes"], kv_dtype["scale_bytes"]
    weight_bits = a.weight_bits if a.weight_bits is not None else default_weight_bits(elem)
    weight_bytes = formulas.weight_bytes(config, weight_bits)
    b = kv_cache_budget(config, total, a.gpu_memory_utilization, block_size=a.block_size, weight_bytes=weight_bytes,
                        activation_bytes=a.activation_gib * 2**30, non_torch_bytes=a.non_torch_gib * 2**30,
                        max_model_len=a.max_model_len, tensor_parallel_size=a.tensor_parallel_size,
                        max_num_batched_tokens=a.max_num_batched_tokens, **kv_dtype)
    gib, tp = 2**30, a.tensor_parallel_size
    heads = config.num_key_value_heads
    L, hkv, D = config.num_hidden_layers, kv_heads_per_gpu(config, tp), config.head_dim
    if scale:       # codes and scales apart: 2 x L x Hkv x (D x bytes + scale)
        vectors = 2 * L * hkv
        per_token = (f"{b.bytes_per_token / 2**10:.1f} KiB ({a.kv_dtype}: 2 x {L} x {hkv} x ({D} x {elem:g} + "
                     f"{scale:g}) bytes: {vectors * D * elem / 2**10:.1f} KiB of codes + {vectors * scale:,.0f} "
                     f"bytes of scales, one per token and KV head as Int8KVCache stores them)")
    else:
        per_token = f"{b.bytes_per_token / 2**10:.1f} KiB ({a.kv_dtype}: 2 x {L} x {hkv} x {D} x {elem:g} bytes)"
    chunk = (f" and a prefill chunk of up to {b.max_num_batched_tokens:,} tokens (vLLM v1's count)"
             if b.max_num_batched_tokens is not None else "")
    if b.blocks_per_sequence == formulas.num_blocks(b.max_model_len, b.block_size):
        window_note = ""
    elif b.max_model_len > b.sliding_window:
        window_note = (f"; with its sliding window of {b.sliding_window:,} tokens{chunk} it holds "
                       f"{b.blocks_per_sequence:,} blocks ({b.blocks_per_sequence * b.bytes_per_block / gib:.3f} "
                       f"GiB): blocks that leave the window are freed")
    else:           # the window covers the whole request: only vLLM v1's count, one block more, differs
        window_note = (f"; its sliding window of {b.sliding_window:,} tokens covers the whole request, "
                       f"and vLLM v1's count gives it {b.blocks_per_sequence:,} blocks (the one a window "
                       f"may straddle added)")
    rows = [
        ("model", f"{config.name or a.model}: {L} layers, {heads} KV heads "
                  f"of {D} (of {config.num_attention_heads} query heads)"),
        ("GPU", f"{gpu} x {a.gpu_memory_utilization:g} = {total * a.gpu_memory_utilization / gib:.2f} GiB"
                + (f" on each of {tp} GPUs (tensor parallel; the lines below are one GPU's)" if tp > 1 else "")),
        ("weights", f"{b.weight_bytes / gib:.2f} GiB at {weight_bits:g} bits"),
        ("activations", f"{b.activation_bytes / gib:.2f} GiB"),
        ("non-torch", f"{b.non_torch_bytes / gib:.2f} GiB"),
        ("KV cache", f"{max(b.kv_bytes_available, 0) / gib:.2f} GiB"),
        ("KV per token", per_token),
        ("KV per sequence", f"{b.bytes_per_token * b.max_model_len / gib:.3f} GiB at {b.max_model_len:,} tokens"
         + window_note),
        ("blocks", f"{b.num_gpu_blocks:,} of {b.block_size} tokens"),
        ("sequences", f"{b.max_num_seqs:,} of {b.max_model_len:,} tokens at once ({b.max_concurrency:.2f}x)"),
    ]
    notes = []
    missing = [what for what, given in (("its profiled activations (--activation-gib)", b.activation_bytes),
                                        ("its non-torch memory, CUDA context etc., ~0.5-1+ GiB per GPU "
                                         "(--non-torch-gib)", b.non_torch_bytes)) if not given]
    if missing:
        notes.append("upper bounds: vLLM also subtracts " + " and ".join(missing))
    if b.sliding_window is not None and b.max_num_batched_tokens is None:
        notes.append("vLLM v1 also holds a prefill chunk per sliding-window sequence: "
                     "cdiv(min(W - 1 + max_num_batched_tokens, max_model_len), block_size) + 1 blocks; "
                     "without --max-num-batched-tokens the chunk is left out and the concurrency is an upper bound")
    rows += [("note", n) for n in notes]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n" + b.log_line()


def generate(a) -> tuple[str, int]:
    """Run the parsed ``generate`` arguments through ``LLM``: (a description of the outputs, how
    many prompts were refused)."""
    import time
    import warnings

    from .engine import LLM, SamplingParams
    params = SamplingParams(n=a.n, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                            max_tokens=a.max_tokens, seed=a.seed, stop=a.stop or None, min_tokens=a.min_tokens,
                            stop_token_ids=a.stop_token_id or None, ignore_eos=a.ignore_eos)
    model, tokenizer = load_quantized(a)
    llm = LLM(model=model, tokenizer=tokenizer, max_num_seqs=a.max_num_seqs)
    t0 = time.perf_counter()
    with warnings.catch_warnings():         # a refused prompt: the line below says so, once
        warnings.filterwarnings("ignore", message=r"prompt \d+ refused")
        outs = llm.generate(a.prompts, params, use_tqdm=len(a.prompts) > 1)
    seconds = time.perf_counter() - t0
    lines, tokens, refused = [], 0, 0
    for o in outs:
        if o.error:
            lines.append(f"{_short(o.prompt)}: refused: {o.error}")
            refused += 1
            continue
        for c in o.outputs:
            tokens += len(c.token_ids)
            tag = f"[{c.index}] " if len(o.outputs) > 1 else ""
            lines.append(f"{tag}{o.prompt}{c.text}")
            cut = (f", at the model's context of {llm.engine.max_model_len:,} tokens before --max-tokens "
                   f"{a.max_tokens:,}" if c.finish_reason == "length" and len(c.token_ids) < a.max_tokens else "")
            lines.append(f"    ({len(c.token_ids)} tokens, finished: {c.finish_reason}{cut})")
    dev = llm.engine.model.device
    lines.append(f"{tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tok/s) on {dev}")
    return "\n".join(lines), refused


def _short(prompt, limit: int = 60) -> str:
    """A prompt as a refusal quotes it: its repr, cut to ``limit`` characters of text."""
    if isinstance(prompt, str) and len(prompt) > limit:
        return f"{prompt[:limit]!r}... ({len(prompt):,} characters)"
    return repr(prompt)


def load_quantized(a):
    """(model, tokenizer) of the parsed ``--model``, ``--device`` and ``--dtype``, quantized in place
    by ``--quantize`` (``llmops_lab.quant.quantize``) with ``--bits``, ``--group-size``, ``--sym``."""
    from .loader import check_tokenizer, load_model, load_tokenizer
    check_tokenizer(a.model)                    # before the model loads, not after
    model = load_model(a.model, device=a.device, dtype=a.dtype)
    if a.quantize:
        from .quant import quantize
        opts = {k: v for k, v in (("bits", a.bits), ("group_size", a.group_size), ("sym", a.sym)) if v is not None}
        quantize(model, method=a.quantize, progress=False, **opts)
    elif any(v is not None for v in (a.bits, a.group_size, a.sym)):
        raise ValueError("--bits, --group-size and --sym go with --quantize")
    return model, load_tokenizer(a.model)


def perplexity(a) -> str:
    """Perplexity of the parsed ``perplexity`` arguments' model on the held-out text (the
    ``validation`` slice), and the bytes of its weights."""
    from . import corpus
    from .evaluate import encode
    from .evaluate import perplexity as ppl
    from .measure import module_bytes
    model, tokenizer = load_quantized(a)
    ids = encode(tokenizer, corpus.read_slice("validation"))
    window = min(a.window, model.config.max_position_embeddings)
    value = ppl(model, ids, window=window, max_windows=a.windows, progress=True)
    scored = min(a.windows, (len(ids) - 1) // window) * window
    how = "unquantized" if not a.quantize else " ".join(
        [a.quantize] + [f"{k} {v}" for k, v in (("bits", a.bits), ("group size", a.group_size), ("sym", a.sym))
                        if v is not None])
    return (f"{a.model} ({how}): perplexity {value:.3f} on {scored:,} held-out tokens in windows of {window}; "
            f"model {module_bytes(model) / 2**20:.2f} MiB")


def _fraction(text: str) -> float:
    x = float(text)
    if not (math.isfinite(x) and 0 < x <= 1):
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return x


def _weight_bits(text: str) -> float:
    """Bits per weight: 1 (binary) to 32 (fp32); 1.58 (ternary) and the like are fine."""
    x = float(text)
    if not (math.isfinite(x) and 1 <= x <= 32):
        raise argparse.ArgumentTypeError(f"bits per weight must lie in [1, 32], got {text}")
    return x


def _positive(kind):
    def parse(text: str):
        x = kind(text)
        if not (math.isfinite(x) and x > 0):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return x
    parse.__name__ = kind.__name__      # argparse names the type in its error: "invalid int value"
    return parse


def _nonneg(text: str) -> float:
    x = float(text)
    if not (math.isfinite(x) and x >= 0):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return x


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmops-lab", description="LLM inference optimisation, measured.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="device, capabilities and the embedded models' card")
    sub.add_parser("bench", help="the benchmark suite (same as python -m llmops_lab.bench)", add_help=False)

    k = sub.add_parser("kv", help="what fits in a GPU's KV cache: blocks, tokens, sequences (vLLM's start-up "
                                  "sum; upper bounds)",
                       description="The KV-cache calculator (llmops_lab.kv.calculator): of the GPU's memory x "
                                   "utilization, less weights, activations and non-torch memory, how many blocks, "
                                   "tokens and full-length sequences fit.",
                       epilog=KV_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from .kv.calculator import GPU_MEMORY, KV_CACHE_DTYPES
    from .presets import PRESETS
    k.add_argument("model", help=f"a preset ({', '.join(PRESETS)}), target, draft, "
                                 "or a checkpoint folder / config.json")
    k.add_argument("--gpu", help=f"a known GPU: {', '.join(GPU_MEMORY)} (default: {DEFAULT_GPU}); its memory "
                                 "as nvidia-smi reports it")
    k.add_argument("--gpu-memory-gib", type=_positive(float), help="the GPU's memory in GiB, instead of --gpu")
    k.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9, help="default: %(default)s")
    k.add_argument("--kv-dtype", choices=sorted(KV_CACHE_DTYPES), default="bf16",
                   help="default: %(default)s; int8 counts one fp16 scale per token and KV head (Int8KVCache)")
    k.add_argument("--weight-bits", type=_weight_bits,
                   help="bits per weight (default: 16, the bf16/fp16 weights an fp8 or int8 KV cache sits "
                        "beside; 32 with --kv-dtype fp32); give 4 for an int4 model")
    k.add_argument("--block-size", type=_positive(int), default=16, help="default: %(default)s")
    k.add_argument("--max-model-len", type=_positive(int), help="tokens per request (default: the model's context)")
    k.add_argument("--activation-gib", type=_nonneg, default=0.0,
                   help="peak activation memory, which vLLM profiles (default: 0)")
    k.add_argument("--non-torch-gib", type=_nonneg, default=0.0,
                   help="memory outside PyTorch per GPU (CUDA context etc.), which vLLM measures: about 0.5 "
                        "to 1+ GiB (default: 0)")
    k.add_argument("--max-num-batched-tokens", type=_positive(int),
                   help="vLLM's tokens per scheduler step: a sliding-window sequence also holds this prefill "
                        "chunk (default: left out)")
    k.add_argument("--tensor-parallel-size", "-tp", type=_positive(int), default=1,
                   help="GPUs the model is split over (default: 1)")

    g = sub.add_parser("generate", help="generate from prompts with the continuous-batching engine",
                       description="Prompts through llmops_lab.engine.LLM (the embedded target by default).")
    g.add_argument("prompts", nargs="+", help="one or more prompts")
    g.add_argument("--model", default="target", help="target, draft, or a checkpoint folder (default: target)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    g.add_argument("-n", type=int, default=1, help="completions per prompt")
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="a stop string (repeatable)")
    g.add_argument("--stop-token-id", type=int, action="append", help="a token id that stops (repeatable)")
    g.add_argument("--min-tokens", type=int, default=0, help="tokens before EOS or a stop may end (default: 0)")
    g.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-sequence token")
    g.add_argument("--max-num-seqs", type=int, default=256)
    _model_options(g)

    q = sub.add_parser("perplexity", help="perplexity on the held-out text, quantized or not",
                       description="Perplexity of a model on the embedded held-out text (data/corpus/validation.txt), "
                                   "after --quantize if given, and the bytes its weights take.")
    q.add_argument("--model", default="target", help="target, draft, or a checkpoint folder (default: target)")
    q.add_argument("--window", type=_positive(int), default=512, help="tokens per scored window (default: 512)")
    q.add_argument("--windows", type=_positive(int), default=8, help="windows scored (default: 8)")
    _model_options(q)
    return ap


def _model_options(p) -> None:
    """Options shared by generate and perplexity: where the model runs, and how it is quantized."""
    from .quant.quant_linear import METHODS
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    p.add_argument("--quantize", choices=METHODS, help="quantize the linear layers first (gptq and awq calibrate "
                                                       "on the embedded calibration text)")
    p.add_argument("--bits", type=int, help="rtn/gptq/awq bits (default: 4)")
    p.add_argument("--group-size", type=int, help="rtn/gptq/awq group size (default: 128; -1 = per channel)")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric (no zero point) or not (rtn/gptq/awq)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = parser()
    a, rest = ap.parse_known_args(argv)
    if a.cmd != "bench" and rest:       # only bench passes its arguments on; anything else is a typo
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if a.cmd == "bench":
            from .bench.__main__ import main as bench_main
            bench_main(rest)
        elif a.cmd == "info":
            print(info())
        elif a.cmd == "kv":
            print(kv(a))
        elif a.cmd == "perplexity":
            print(perplexity(a))
        elif a.cmd == "generate":
            text, refused = generate(a)
            print(text)
            if refused:                         # the others ran; the exit status says not all did
                ap.exit(1)
    except KeyboardInterrupt:               # Ctrl-C: one line and the shell's status for SIGINT
        ap.exit(130, f"llmops-lab {a.cmd}: interrupted\n")
    except BrokenPipeError:                 # the reader left (``| head``): nothing more to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        sys.exit(1)
    except (ValueError, TypeError, OSError) as e:      # bad input or an unreadable file: one line
        ap.exit(2, f"llmops-lab {a.cmd}: error: {e}\n")


if __name__ == "__main__":
    main()
