"""LLM: offline batched generation with vLLM's interface, on our continuous-batching engine.

The documents' snippet runs with only its import changed (and a model that exists here)::

    from llmops_lab.engine import LLM, SamplingParams
    llm = LLM(model="target", gpu_memory_utilization=0.9, max_num_batched_tokens=8192,
              max_num_seqs=256, block_size=16)
    outputs = llm.generate(["Explain quantum computing", "What is machine learning?"],
                           SamplingParams(temperature=0.7, max_tokens=256))

``model`` is a folder, a hub id (only where the network allows), ``"target"``/``"draft"``, an
already loaded ``LlamaModel``, or None for the embedded target.
"""
from __future__ import annotations

import dataclasses
import numbers
import warnings

import torch

from tqdm.auto import tqdm

from .config import EngineConfig
from .llm_engine import LLMEngine
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams, final_only

_ENGINE_KEYS = {f.name for f in dataclasses.fields(EngineConfig)}


class LLM:
    def __init__(self, model=None, tokenizer=None, dtype=None, device=None, tensor_parallel_size: int = 1,
                 trust_remote_code: bool = False, **engine_args):
        # vLLM's arguments a snippet often spells out: one GPU is all this engine runs on, and it never
        # runs a checkpoint's code (config.json and safetensors only), so trust_remote_code changes nothing
        if tensor_parallel_size != 1 or isinstance(tensor_parallel_size, bool):
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size!r}: this engine runs on one device "
                             f"(the KV calculator, llmops_lab.kv, sizes tensor-parallel setups)")
        if not isinstance(trust_remote_code, bool):
            raise TypeError(f"trust_remote_code must be True or False, got {trust_remote_code!r}")
        unknown = set(engine_args) - _ENGINE_KEYS
        if unknown:
            raise TypeError(f"LLM got unknown arguments {sorted(unknown)}; it accepts model, tokenizer, "
                            f"dtype, device and {sorted(_ENGINE_KEYS)}")
        from ..loader import load_model, load_tokenizer
        if model is None or isinstance(model, str):
            name = model or "target"
            model_obj = load_model(name, device=device, dtype=dtype)
            if tokenizer is None:
                tokenizer = load_tokenizer(name)
        else:
            if dtype not in (None, "auto") or device is not None:
                raise ValueError("dtype and device apply when LLM loads the model by name; move a loaded "
                                 "model yourself (model.to(device, dtype)) before passing it")
            model_obj = model
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        self.engine = LLMEngine(model_obj, tokenizer, EngineConfig(**engine_args))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Outputs in the order of ``prompts``: strings, lists of token ids, 1-D tensors, or vLLM's
        prompt dicts (``{"prompt": text}``, ``{"prompt_token_ids": ids}``); one prompt alone is
        one too, and a 2-D tensor is one prompt per row. A bad request gets an output whose
        ``error`` says why (with a warning); the others run."""
        prompts = _as_prompt_list(prompts)
        params = SamplingParams() if sampling_params is None else sampling_params   # [] is 0 params, not none
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        bad = next((sp for sp in params if not isinstance(sp, SamplingParams)), None)
        if bad is not None:               # before any request is queued
            raise TypeError(f"sampling_params must be SamplingParams (or a list of them), got {type(bad).__name__}")
        # each request's output once, when it is done (vLLM's LLM.generate asks for the same)
        final = {id(sp): final_only(sp) for sp in params}
        params = [final[id(sp)] for sp in params]
        eng = self.engine
        results: dict[str, RequestOutput] = {}
        order = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            rid = f"llm-{id(self)}-{len(eng.requests)}-{i}"
            order.append(rid)
            try:
                eng.add_request(rid, _unwrap(p), sp)
            except ValueError as e:
                warnings.warn(f"prompt {i} refused: {e}")
                results[rid] = _failed(rid, p, str(e))
        bar = tqdm(total=len(order), desc="generate", disable=not use_tqdm)
        bar.update(len(results))
        while eng.has_unfinished_requests():
            for out in eng.step():
                if not out.finished:          # a request added to the engine directly, still running
                    continue
                results[out.request_id] = out
                eng.release(out.request_id)
                bar.update(1)
        bar.close()
        return [results[r] for r in order]


def _as_prompt_list(prompts) -> list:
    """``generate``'s prompts as a list with one entry per request."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if torch.is_tensor(prompts):
        if prompts.dim() not in (1, 2):
            raise ValueError(f"a tensor of prompts must be 1-D (one prompt) or 2-D (one per row), "
                             f"got {prompts.dim()}-D")
        return [prompts] if prompts.dim() == 1 else list(prompts)
    if not isinstance(prompts, (list, tuple, range)) and not hasattr(prompts, "__iter__"):
        raise ValueError(f"prompts must be a string, a list of prompts or token ids, or a tensor, "
                         f"got {type(prompts).__name__}")
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], numbers.Integral):     # one prompt of token ids
        return [prompts]
    return prompts


def _unwrap(prompt):
    """vLLM's TextPrompt / TokensPrompt dicts to what ``add_request`` takes."""
    if not isinstance(prompt, dict):
        return prompt
    keys = set(prompt) & {"prompt", "prompt_token_ids"}
    if len(keys) != 1:
        raise ValueError(f"a prompt dict needs exactly one of 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
    other = sorted(map(str, set(prompt) - keys))
    if other:   # multi_modal_data, cache_salt, ...: run without them, the prompt would mean something else
        raise ValueError(f"prompt dict keys {other} are not supported here (only 'prompt' or 'prompt_token_ids')")
    return prompt[keys.pop()]


def _failed(rid, prompt, msg) -> RequestOutput:
    prompt = prompt.get("prompt", prompt.get("prompt_token_ids")) if isinstance(prompt, dict) else prompt
    if torch.is_tensor(prompt) and prompt.dim() == 1:
        prompt = prompt.tolist()
    ok = isinstance(prompt, (list, tuple)) and all(isinstance(t, numbers.Integral) for t in prompt)
    ids = [int(t) for t in prompt] if ok else []        # refused for not being token ids: none shown
    return RequestOutput(rid, prompt if isinstance(prompt, str) else None, ids,
                         [CompletionOutput(0, "", [], "error")], True, RequestMetrics(0.0), msg)
