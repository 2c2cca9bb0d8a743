"""Calibration data for GPTQ and AWQ: token ids [n_seq, seq_len] from a list or the embedded slice.

Both methods fit the quantized weights to the activations a few hundred sequences produce (GPTQ's
Hessian X^T X, AWQ's per-channel activation scale). The embedded corpus ships a calibration slice
(``data/corpus/calibration.txt``: up to 3,000 characters from the middle of each of the 40 training
works, in turn; the training distribution, never the held-out validation text).
"""
from __future__ import annotations

import torch

DEFAULT_SEQUENCES, DEFAULT_SEQ_LEN = 8, 128


def embedded_calibration(n_seq: int = DEFAULT_SEQUENCES, seq_len: int = DEFAULT_SEQ_LEN) -> torch.Tensor:
    """[n_seq, seq_len] token ids of the embedded calibration slice, for the embedded models: n_seq
    windows of seq_len tokens at seeded random places (seed 0) anywhere in the whole slice, drawn by
    ``quality.calibration_ids`` (the sampler of the notebook's calibration study, GPTQ's own way of
    sampling C4), so the windows come from works across the slice, not one work's excerpt. Windows
    may overlap. The default 8 x 128 takes windows from 7 different works, from 2% to 79% of the way
    through the file. (It used to take the slice's first n_seq x seq_len tokens: the default was
    then all *All's Well That Ends Well* and a few lines of the next work.)"""
    from ..formulas import _positive_int
    from ..loader import load_tokenizer
    from .quality import calibration_ids
    _positive_int(n_seq=n_seq, seq_len=seq_len)        # 0 windows: a ValueError, not torch.stack's error
    return calibration_ids(load_tokenizer("target"), "calibration", n_seq, seq_len, seed=0)


def as_calibration_ids(calibration) -> torch.Tensor:
    """A 2-D tensor [n_seq, seq_len] from a 2-D tensor or a list of 1-D token-id tensors (cut to
    the shortest, so every sequence has the same length); None -> ``embedded_calibration()``.
    Shape and length errors are left to ``gptq.check_calibration``, which knows the model."""
    if calibration is None:
        return embedded_calibration()
    if isinstance(calibration, torch.Tensor):
        return calibration
    if isinstance(calibration, (str, bytes)):
        raise ValueError("calibration takes token ids, not text: tokenize it first")
    seqs = [torch.as_tensor(s) for s in calibration]
    flat = next((s for s in seqs if s.dim() != 1), None)
    if flat is not None:      # a [n, len] tensor in a list was flattened into one sequence across rows
        raise ValueError(f"a calibration list holds 1-D sequences of token ids, got an element of shape "
                         f"{tuple(flat.shape)} (a 2-D tensor goes in as it is, not in a list)")
    if not seqs:
        raise ValueError("the calibration set is empty (0 sequences)")
    n = min(len(s) for s in seqs)
    return torch.stack([s[:n] for s in seqs])
