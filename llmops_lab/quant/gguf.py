"""GGUF export: our Llama weights and tokenizer in llama.cpp's file format, and the read-back check.

GGUF (ggml's "GPT-Generated Unified Format") is one file holding typed key/value metadata (the
hyperparameters and the tokenizer) and named tensors, each stored at its own ggml type: F32, F16,
or a block format such as Q8_0 (blocks of 32 weights, int8 codes and one fp16 scale) and Q4_0
(blocks of 32, 4-bit codes in [-8, 7] and one fp16 scale). We write it with the ``gguf`` package's
``GGUFWriter`` and quantize with ``gguf.quants``; the k-quants (Q4_K, Q6_K) can only be dequantized
there, so for those we run llama.cpp's own quantizer on our F32 file (``requantize``).

llama.cpp's ``llama`` architecture applies RoPE to adjacent pairs (x[2i], x[2i+1]) while Hugging
Face's layout (ours) rotates the two halves of each head (x[i], x[i + D/2]); the export reorders
the rows of q_proj and k_proj per head so both compute the same attention (``permute_rope_rows``).
"""
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import numpy as np

from ..checks import check_float_model, is_int

# GGUF type names users know from llama.cpp, mapped to the LlamaFileType recorded in the file.
GGUF_TYPES = ("F32", "F16", "Q8_0", "Q4_0")
K_QUANT_TYPES = ("Q4_K_M", "Q6_K")
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0",
               "Q4_K_M": "MOSTLY_Q4_K_M", "Q6_K": "MOSTLY_Q6_K"}


# llama.cpp's hyperparameter keys (after "llama.") and the ModelConfig field each one holds.
_INT_HPARAMS = (("vocab_size", "vocab_size"), ("context_length", "max_position_embeddings"),
                ("embedding_length", "hidden_size"), ("block_count", "num_hidden_layers"),
                ("feed_forward_length", "intermediate_size"), ("attention.head_count", "num_attention_heads"),
                ("attention.head_count_kv", "num_key_value_heads"), ("attention.key_length", "head_dim"),
                ("attention.value_length", "head_dim"), ("rope.dimension_count", "head_dim"))
_FLOAT_HPARAMS = (("rope.freq_base", "rope_theta"), ("attention.layer_norm_rms_epsilon", "rms_norm_eps"))


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("GGUF export needs the gguf package: pip install 'llmops-lab[gguf]'") from e
    return gguf


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection [H*D, in] from half-split RoPE order to interleaved-pair order.

    Within each head, row i (i < D/2) and row i + D/2 form one rotated pair in Hugging Face's
    layout; llama.cpp wants them at rows 2i and 2i + 1.
    """
    out, inp = w.shape
    D = out // n_heads
    return w.reshape(n_heads, 2, D // 2, inp).swapaxes(1, 2).reshape(out, inp)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of ``permute_rope_rows``: interleaved-pair rows back to half-split order."""
    out, inp = w.shape
    D = out // n_heads
    return w.reshape(n_heads, D // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def check_exportable(config, qtype: str) -> None:
    """Raise a clear error for what the ``llama`` GGUF export does not cover."""
    if qtype not in GGUF_TYPES:
        raise ValueError(f"GGUF type {qtype!r} is not written here; choose one of {GGUF_TYPES} "
                         f"(k-quants {K_QUANT_TYPES} come from requantize())")
    problems = []
    if config.attention_bias:
        problems.append("q/k/v biases (Qwen2)")
    if config.rope_scaling is not None:
        problems.append(f"RoPE scaling {config.rope_scaling}")
    if config.sliding_window is not None:
        problems.append(f"a sliding window of {config.sliding_window}")
    if problems:
        raise ValueError(f"the llama GGUF export covers plain Llama/Mistral shapes, not {', '.join(problems)}")
    if qtype in ("Q8_0", "Q4_0"):
        block = 32
        for name, n in (("hidden_size", config.hidden_size), ("intermediate_size", config.intermediate_size),
                        ("num_attention_heads * head_dim", config.num_attention_heads * config.head_dim)):
            if n % block:
                raise ValueError(f"{qtype} quantizes rows in blocks of {block}, but {name} = {n} "
                                 f"is not a multiple of {block}; export at F16 or F32 instead")


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """Our state dict under llama.cpp's tensor names, as float32 arrays in GGUF row order."""
    c = model.config
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": state["model.embed_tokens.weight"],
           "output_norm.weight": state["model.norm.weight"]}
    if not c.tie_word_embeddings:  # tied: llama.cpp reuses token_embd for the output
        out["output.weight"] = state["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for ours, theirs in names.items():
            w = state[f"model.layers.{i}.{ours}.weight"]
            if theirs == "attn_q":
                w = permute_rope_rows(w, c.num_attention_heads)
            elif theirs == "attn_k":
                w = permute_rope_rows(w, c.num_key_value_heads)
            out[f"blk.{i}.{theirs}.weight"] = w
    return out


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", tokenizer)
    return json.loads(backend.to_str())


def tokenizer_metadata(tokenizer, config=None) -> dict:
    """Tokens (by id), token types, merges and special ids of a byte-level BPE tokenizer, and
    whether it adds BOS / EOS to a text (llama.cpp adds them to every prompt as the file says).

    A tokenizer that names no BOS or EOS takes the model ``config``'s: with none in the file,
    llama.cpp falls back to ids of its own (11, ")" here) and starts and stops every text there."""
    tj = _tokenizer_json(tokenizer)
    model = tj["model"]
    if model.get("type") != "BPE" or (tj.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise ValueError("the GGUF export writes byte-level BPE tokenizers (GPT-2 style) only")
    vocab = dict(model["vocab"])
    special = {t["id"]: t["content"] for t in tj.get("added_tokens", [])}
    vocab.update({content: i for i, content in special.items()})
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]  # ids nothing maps to stay unused
    types = [5] * n                           # gguf.TokenType.UNUSED
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = 3 if i in special else 1   # CONTROL or NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if config is not None:
        bos = config.bos_token_id if bos is None else bos
        eos = (config.eos_token_ids or (None,))[0] if eos is None else eos
    # what the tokenizer's own post-processor does to a text, not what we expect of it
    plain, full = (tokenizer("a", add_special_tokens=flag).input_ids for flag in (False, True))
    return {"tokens": tokens, "token_types": types, "merges": merges, "bos": bos, "eos": eos,
            "pad": tokenizer.pad_token_id, "add_bos": full[:1] != plain[:1], "add_eos": full[-1:] != plain[-1:]}


def _quantize(gguf, w: np.ndarray, qtype: str) -> tuple[np.ndarray, object]:
    """Encoded data and its ggml type; 1-D tensors (norm weights) stay F32 as llama.cpp keeps them."""
    T = gguf.GGMLQuantizationType
    if w.ndim == 1 or qtype == "F32":
        return w.astype(np.float32), T.F32
    if qtype == "F16":
        return w.astype(np.float16), T.F16
    t = getattr(T, qtype)
    return gguf.quants.quantize(w.astype(np.float32), t), t


def export_gguf(model, tokenizer, path: str | Path, qtype: str = "F32", name: str = "") -> Path:
    """Write ``model`` and ``tokenizer`` as a llama.cpp GGUF file.

    Args:
        qtype: the type of every 2-D weight ("F32", "F16", "Q8_0", "Q4_0"); norm weights stay F32.
        name: ``general.name`` (default: the config's name).

    Returns:
        The path written.
    """
    gguf = _gguf()
    c = model.config
    check_float_model(model, "export_gguf")   # GGUF quantizes at qtype itself, from the float weights
    check_exportable(c, qtype)
    if not isinstance(name, str):
        raise TypeError(f"name must be a str (general.name), got {type(name).__name__}")
    if tokenizer is None:
        raise TypeError("export_gguf needs the model's tokenizer (the GGUF file holds its vocabulary), got None")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path {path} is a folder; pass the .gguf file to write")
    tok = tokenizer_metadata(tokenizer, c)
    if len(tok["tokens"]) != c.vocab_size:
        raise ValueError(f"tokenizer has {len(tok['tokens'])} tokens, the model {c.vocab_size} rows")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed onto it at the end: a failure part way leaves an
    # existing file at ``path`` intact, never truncated.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _write_gguf(gguf, model, tok, tmp, qtype, name)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_gguf(gguf, model, tok: dict, path: Path, qtype: str, name: str) -> None:
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name or c.name or "llmops-lab")
    w.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[qtype])))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, attr in _INT_HPARAMS:
        w.add_uint32(f"llama.{key}", getattr(c, attr))
    for key, attr in _FLOAT_HPARAMS:
        w.add_float32(f"llama.{key}", getattr(c, attr))

    w.add_tokenizer_model("gpt2")   # byte-level BPE with merges
    w.add_tokenizer_pre("gpt-2")    # GPT-2's pre-tokenizer regex, which ByteLevel(use_regex) applies
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["token_types"])
    w.add_token_merges(tok["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
        if tok[key] is not None:
            add(tok[key])
    w.add_add_bos_token(tok["add_bos"])   # as the tokenizer does: llama.cpp adds it to every prompt
    w.add_add_eos_token(tok["add_eos"])

    for tname, data in gguf_tensors(model).items():
        enc, t = _quantize(gguf, data, qtype)
        w.add_tensor(tname, enc, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _metadata(reader) -> dict:
    return {key: field.contents() for key, field in reader.fields.items()
            if not key.startswith("GGUF.") and field.types}


# What gguf's reader raises on a file that is not GGUF or is cut short (its numpy views of the
# memory map fail to reshape, or a header field reads as garbage).
_READ_ERRORS = (ValueError, TypeError, IndexError, KeyError, OverflowError, MemoryError)


def _not_gguf(path, err) -> ValueError:
    return ValueError(f"{path} is not a complete GGUF file ({type(err).__name__}: {str(err)[:200]})")


def _reader(path: str | Path):
    gguf = _gguf()
    if not Path(path).is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        return gguf.GGUFReader(str(path))
    except _READ_ERRORS as err:
        raise _not_gguf(path, err) from err


def read_gguf_metadata(path: str | Path) -> dict:
    """The key/value metadata of a GGUF file (hyperparameters, tokenizer), tensors left unread."""
    return _metadata(_reader(path))


def read_gguf(path: str | Path) -> tuple[dict, dict[str, tuple[str, np.ndarray]]]:
    """Metadata (scalars, strings, arrays) and tensors as (ggml type name, dequantized float32 array)."""
    gguf = _gguf()
    reader = _reader(path)
    meta = _metadata(reader)
    tensors = {}
    try:
        for t in reader.tensors:
            shape = tuple(int(s) for s in reversed(t.shape))   # GGUF lists ne0 (the row length) first
            data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
            tensors[t.name] = (t.tensor_type.name, data.astype(np.float32))
    except _READ_ERRORS as err:
        raise _not_gguf(path, err) from err
    return meta, tensors


# Largest |w - dequant(quant(w))| per block, as a multiple of the block's max |w|: half a step of
# the code grid plus the fp16 rounding of the scale times the largest code. Q4_0 maps the signed
# extreme to -8, so the opposite extreme clips at +7: a whole step. The k-quant rows are loose
# (llama.cpp searches scales and mins), one full step of the asymmetric range.
_BLOCK_BOUND = {"Q8_0": 0.5 / 127 + 2.0 ** -11, "Q4_0": 1 / 8 + 2.0 ** -10,
                "Q4_K": 2 / 15, "Q5_K": 2 / 31, "Q6_K": 2 / 63}
# The codes are chosen against the fp32 scale d, then d is stored in fp16 (to nearest). A normal
# fp16 d is off by at most 2^-11 of itself (above); a block with amax under about 7.8e-3 (Q8_0)
# or 4.9e-4 (Q4_0) has a subnormal d, off by up to half the subnormal spacing, 2^-24 / 2 = 2^-25,
# whatever its size: times the largest |code| (127 for Q8_0, 8 for Q4_0), an absolute term.
_BLOCK_ABSOLUTE = {"Q8_0": 127 * 2.0 ** -25, "Q4_0": 8 * 2.0 ** -25}


def block_error_bound(amax: np.ndarray, ggml_type: str) -> np.ndarray:
    """Bound on |w - dequant(quant(w))| in a block whose max |w| is ``amax`` (Q8_0, Q4_0, k-quants):
    the relative part of ``_BLOCK_BOUND`` plus, where defined, the subnormal-scale term."""
    return amax * _BLOCK_BOUND[ggml_type] + _BLOCK_ABSOLUTE.get(ggml_type, 0.0)


def error_bound(w: np.ndarray, ggml_type: str) -> np.ndarray:
    """Per-element bound on the round-trip error of ``w`` [rows, cols] stored as ``ggml_type``."""
    if ggml_type == "F32":
        return np.zeros_like(w)
    if ggml_type == "F16":
        return np.abs(w) * 2.0 ** -11 + 2.0 ** -24
    block = 256 if ggml_type.endswith("_K") else 32
    rows, cols = w.shape
    amax = np.abs(w.reshape(rows, cols // block, block)).max(-1, keepdims=True)
    bound = np.broadcast_to(block_error_bound(amax, ggml_type), (rows, cols // block, block))
    return bound.reshape(rows, cols) * (1 + 1e-6) + 1e-12


def check_gguf(path: str | Path, model, tokenizer=None) -> dict:
    """Read ``path`` back and compare it with ``model`` (and ``tokenizer``).

    Returns ``ok``, ``tensors`` (one row per tensor: its type, max error, max error / bound) and
    ``mismatches`` (metadata or tensor names that differ).
    """
    c = model.config
    meta, tensors = read_gguf(path)
    expected = {"general.architecture": "llama", **{f"llama.{k}": getattr(c, a) for k, a in _INT_HPARAMS}}
    mismatches = [f"{k}: {meta.get(k)!r} != {v!r}" for k, v in expected.items() if meta.get(k) != v]
    for key, attr in _FLOAT_HPARAMS:    # stored as float32
        k, v = f"llama.{key}", getattr(c, attr)
        if not np.isclose(meta.get(k, np.nan), v, rtol=1e-6):
            mismatches.append(f"{k}: {meta.get(k)!r} != {v!r}")
    if tokenizer is not None:
        tok = tokenizer_metadata(tokenizer, c)
        for k, ours in (("tokenizer.ggml.tokens", tok["tokens"]), ("tokenizer.ggml.merges", tok["merges"]),
                        ("tokenizer.ggml.bos_token_id", tok["bos"]), ("tokenizer.ggml.eos_token_id", tok["eos"]),
                        ("tokenizer.ggml.add_bos_token", tok["add_bos"]),
                        ("tokenizer.ggml.add_eos_token", tok["add_eos"])):
            if meta.get(k) != ours:
                mismatches.append(f"{k} differs from the tokenizer's")
    ours = gguf_tensors(model)
    if set(ours) != set(tensors):
        mismatches.append(f"tensor names differ: missing {sorted(set(ours) - set(tensors))[:3]}, "
                          f"extra {sorted(set(tensors) - set(ours))[:3]}")
    rows = []
    for name in sorted(set(ours) & set(tensors)):
        ggml_type, back = tensors[name]
        w = ours[name]
        if back.shape != w.shape:
            rows.append({"name": name, "type": ggml_type, "max_err": float("inf"), "err_over_bound": float("inf")})
            continue
        err = np.abs(back - w)
        bound = error_bound(w.reshape(w.shape[0], -1) if w.ndim > 1 else w[None], ggml_type).reshape(w.shape)
        over = float((err / np.maximum(bound, 1e-30)).max()) if err.any() else 0.0
        rows.append({"name": name, "type": ggml_type, "max_err": float(err.max()), "err_over_bound": over})
    ok = not mismatches and all(r["err_over_bound"] <= 1.0 for r in rows)
    return {"ok": ok, "tensors": rows, "mismatches": mismatches}


def requantize(src: str | Path, dst: str | Path, qtype: str = "Q4_K_M", threads: int = 0) -> Path:
    """Quantize a GGUF file with llama.cpp's own quantizer (``llama-quantize``), for the k-quants
    that ``gguf.quants`` cannot encode. Q4_K_M keeps half of the attn_v/ffn_down tensors and the
    output at Q6_K, as llama.cpp chooses; rows must be multiples of 256 or it falls back to others.
    ``src`` should be an F32 or F16 file: llama.cpp refuses to requantize an already quantized one.
    """
    import llama_cpp
    import llama_cpp._logger
    if qtype not in K_QUANT_TYPES:
        raise ValueError(f"requantize writes {K_QUANT_TYPES}, not {qtype!r}")
    if not is_int(threads) or threads < 0:
        raise ValueError(f"threads must be an integer >= 0 (0: llama.cpp's default), got {threads!r}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"no GGUF file at src={src}")
    # llama.cpp maps src and writes dst from the start: the same file crashes the process (bus
    # error) and leaves src truncated.
    if dst.resolve() == src.resolve():
        raise ValueError(f"dst is src ({src}); write the quantized file elsewhere")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{_FILE_TYPES[qtype]}")
    params.nthread = threads
    dst.parent.mkdir(parents=True, exist_ok=True)
    lines = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):   # keep llama.cpp's log for the error message, print nothing
        lines.append(text.decode("utf-8", "replace").strip())

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
    if rc != 0:
        # its reason is the line "llama_model_quantize: failed to quantize: ..."
        reason = next((ln.split("failed to quantize:")[-1].strip() for ln in reversed(lines)
                       if "failed to quantize" in ln), f"return code {rc}")
        raise RuntimeError(f"llama.cpp could not quantize {src} to {qtype}: {reason}")
    return dst
