"""The default calibration set (embedded_calibration, which quantize(..., "gptq"/"awq") and the CLI's
``perplexity --quantize`` use without a calibration set) draws on the whole calibration slice.

It used to be the slice's first 8 x 128 = 1,024 tokens: 3,241 of its 118,126 characters, all of
them *All's Well That Ends Well* bar a few lines of the next work, though the slice is up to 3,000
characters from each of the 40 training works."""
import pytest
import torch

import llmops_lab
from llmops_lab import corpus
from llmops_lab.evaluate import encode
from llmops_lab.quant import as_calibration_ids, embedded_calibration
from llmops_lab.quant.quality import calibration_ids

# corpus.write_slices: the slice is each training work's excerpt of at most 120,000 // 40 characters,
# joined by blank lines, so two places in the text at least this far apart are in different works.
PER_WORK = 3000


def char_offsets(ids):
    """Where each row of token ids starts in the calibration text (each must be found there)."""
    tok, text = llmops_lab.load_tokenizer("target"), corpus.read_slice("calibration")
    offsets = [text.find(tok.decode(row.tolist())) for row in ids]
    assert -1 not in offsets, "a window does not decode to a piece of the calibration text"
    return sorted(offsets), len(text)


def works_at_least(offsets):
    """A lower bound on the distinct works the windows start in: a chain of starts each at least
    one work's excerpt past the last."""
    chain = [offsets[0]]
    for o in offsets[1:]:
        if o - chain[-1] >= PER_WORK:
            chain.append(o)
    return len(chain)


def test_the_slice_is_one_excerpt_per_work():
    text = corpus.read_slice("calibration")
    assert len(text) <= 40 * PER_WORK + 39 * 2          # what PER_WORK assumes


def test_default_windows_come_from_across_the_slice():
    ids = embedded_calibration()
    assert ids.shape == (8, 128) and torch.equal(ids, embedded_calibration())     # seeded
    offsets, n_chars = char_offsets(ids)
    assert works_at_least(offsets) >= 6                  # 7 works: Henry VI 2, Richard II, ... (seed 0)
    assert offsets[-1] - offsets[0] >= 0.6 * n_chars     # 2% to 79% of the file
    # the old default, the slice's first 8 x 128 tokens, fails both
    tok = llmops_lab.load_tokenizer("target")
    old = encode(tok, corpus.read_slice("calibration"))[: 8 * 128].view(8, 128)
    old_offsets, _ = char_offsets(old)
    assert works_at_least(old_offsets) == 1 and old_offsets[-1] - old_offsets[0] < 0.03 * n_chars


def test_default_is_the_calibration_studys_sampler():
    """One sampler: the quality study's 'calibration' source at seed 0, at any size."""
    tok = llmops_lab.load_tokenizer("target")
    for n_seq, seq_len in ((8, 128), (4, 64), (2, 16)):
        assert torch.equal(embedded_calibration(n_seq, seq_len), calibration_ids(tok, "calibration", n_seq, seq_len))
    assert torch.equal(as_calibration_ids(None), embedded_calibration())      # what quantize() takes


@pytest.mark.parametrize("n_seq, seq_len", [(0, 128), (8, 0), (-1, 16)])
def test_no_windows_is_refused(n_seq, seq_len):
    with pytest.raises(ValueError):
        embedded_calibration(n_seq, seq_len)
