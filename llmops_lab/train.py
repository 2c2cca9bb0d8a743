"""Train the embedded tokenizer and the target/draft model pair on Shakespeare.

    python -m llmops_lab.train all            # slices, tokenizer, target, draft, model card
    python -m llmops_lab.train target --max-minutes 40

A byte-level BPE tokenizer (``tokenizers``), then two Llama-shaped models trained from scratch with
AdamW and a cosine schedule on random 1024-token windows of the training works. Runs are seeded
and resumable (a checkpoint in safetensors plus a JSON state every ``--save-every`` steps) and are
written as Hugging Face checkpoints that ``AutoModelForCausalLM.from_pretrained`` loads offline.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import corpus
from .checks import is_int
from .config import ModelConfig
from .loader import DATA_DIR, save_model
from .model import LlamaModel

RUNS = Path("runs")
TOKENIZER_DIR = DATA_DIR / "tokenizer"
VOCAB_SIZE = 4096
SPECIALS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2

CONTEXT = 1024          # the embedded models' context: training sequences no longer than it
SHAPES = {
    # ~8.1M parameters, grouped-query (8 query heads share 2 KV heads), 1024-token context.
    "target": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=2),
    # ~2.4M parameters, same tokenizer; shallow, because at these sizes a step's cost is mostly
    # per-layer overhead, and the draft/target cost ratio c decides what speculation gains.
    "draft": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2),
}
DEFAULTS = {"target": dict(steps=1200, lr=1.5e-3, batch=4), "draft": dict(steps=1000, lr=3e-3, batch=4)}
# The draft learns from the trained target's next-token distribution as well as from the text
# (knowledge distillation, Hinton et al. 2015): what speculative decoding needs is agreement.
DISTILL_WEIGHT = 0.5


def model_config(which: str, vocab_size: int = VOCAB_SIZE) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, max_position_embeddings=CONTEXT, rms_norm_eps=1e-5,
                       rope_theta=10000.0, bos_token_id=0, eos_token_id=1, name=which, **SHAPES[which])


def train_tokenizer(train_texts: list[str], out: Path = TOKENIZER_DIR) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(train_texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=1024)
    fast.save_pretrained(str(out))
    return out


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """All works as one 1-D stream: <s> work </s> <s> work </s> ..."""
    ids = []
    for t in texts:
        ids.extend(tokenizer(t, verbose=False)["input_ids"] + [tokenizer.eos_token_id])
    return torch.tensor(ids, dtype=torch.int32)


def batches(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([stream[s: s + seq_len + 1] for s in starts.tolist()]).long()
        yield x[:, :-1], x[:, 1:]


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq_len: int = 1024, max_windows: int = 64) -> float:
    """Mean next-token cross-entropy over consecutive non-overlapping windows."""
    model.eval()
    n = min(max_windows, (len(stream) - 1) // seq_len)
    losses = []
    for i in range(n):
        x = stream[i * seq_len: (i + 1) * seq_len + 1].long()[None].to(model.device)
        logits = model(x[:, :-1])
        losses.append(F.cross_entropy(logits[0].float(), x[0, 1:]).item())
    model.train()
    return sum(losses) / len(losses)


def lr_at(step: int, steps: int, lr: float, warmup: int = 100) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_state(run: Path, model, opt, step: int, log: list, commands: list) -> None:
    from safetensors.torch import save_file
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
               or not model.config.tie_word_embeddings}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, val in opt.state.get(p, {}).items():
                if torch.is_tensor(val) and val.dim() > 0:
                    tensors[f"opt.{names[id(p)]}.{key}"] = val.contiguous()
    opt_steps = {names[id(p)]: float(s["step"]) for p, s in opt.state.items()}
    save_file(tensors, str(run / "state.safetensors"))
    (run / "state.json").write_text(json.dumps({"step": step, "log": log, "opt_steps": opt_steps,
                                                "commands": commands}))


def load_state(run: Path, model, opt) -> tuple[int, list, list]:
    from safetensors.torch import load_file
    meta = json.loads((run / "state.json").read_text())
    tensors = load_file(str(run / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
    for n, p in model.named_parameters():
        if n in meta["opt_steps"]:
            opt.state[p] = {"step": torch.tensor(meta["opt_steps"][n]),
                            "exp_avg": tensors[f"opt.{n}.exp_avg"], "exp_avg_sq": tensors[f"opt.{n}.exp_avg_sq"]}
    return meta["step"], meta["log"], meta.get("commands", [])


def check_run(steps, lr, batch, seq_len, max_minutes=None, save_every=1, eval_every=1,
              distill_weight=0.0, threads=None) -> None:
    """A training run's numbers, checked before the corpus is fetched and the model loaded."""
    for name, v in (("steps", steps), ("batch", batch), ("seq_len", seq_len), ("save_every", save_every),
                    ("eval_every", eval_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if max_minutes is not None and not 0 < max_minutes:
        raise ValueError(f"max_minutes must be > 0 (or None for no limit), got {max_minutes}")
    if seq_len > CONTEXT:       # RoPE positions past the context the model is configured for
        raise ValueError(f"seq_len must be at most the models' context of {CONTEXT}, got {seq_len}")
    if not (isinstance(distill_weight, (int, float)) and 0.0 <= distill_weight <= 1.0):   # NaN too
        raise ValueError(f"distill_weight must be in [0, 1], got {distill_weight!r}")
    if threads is not None and (not is_int(threads) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1 (or None), got {threads!r}")


def train_model(which: str, steps: int, lr: float, batch: int, seq_len: int = 1024, seed: int = 0,
                max_minutes: float | None = None, save_every: int = 100, eval_every: int = 250,
                threads: int | None = None, distill: bool | None = None,
                distill_weight: float = DISTILL_WEIGHT) -> dict:
    from transformers import AutoTokenizer
    check_run(steps, lr, batch, seq_len, max_minutes, save_every, eval_every, distill_weight, threads)
    if threads:
        torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    train_works, val_works = corpus.split(corpus.load_works(corpus.fetch_texts()))
    train_stream = token_stream(list(train_works.values()), tok)
    val_stream = token_stream(list(val_works.values()), tok)
    torch.manual_seed(seed)
    config = model_config(which, len(tok))
    model = LlamaModel(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name, p in model.named_parameters():  # GPT-2 style init, residual projections scaled down
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * config.num_hidden_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    teacher = None
    if distill if distill is not None else which == "draft":
        from .loader import load_model
        teacher = load_model("target", device=device).eval()
        teacher.requires_grad_(False)
    run = RUNS / which
    run.mkdir(parents=True, exist_ok=True)
    step, log, commands = (load_state(run, model, opt) if (run / "state.json").exists() else (0, [], []))
    if step < steps:  # record the command of every run that trains (resumes included)
        commands.append("python -m llmops_lab.train " + " ".join(sys.argv[1:]))
    gen = torch.Generator().manual_seed(seed + step)  # resumed runs draw fresh but reproducible windows
    data = batches(train_stream, batch, seq_len, gen)
    t0, tokens_per_step = time.time(), batch * seq_len
    prior_seconds = log[-1]["seconds"] if log else 0.0
    bar = tqdm(range(step, steps), initial=step, total=steps, desc=f"train {which}")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        x, y = next(data)
        with torch.autocast(device.type, dtype=torch.bfloat16):  # fp32 master weights, bf16 matmuls
            logits = model(x.to(device))
        loss = ce = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten())
        if teacher is not None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                t_logp = teacher(x.to(device)).float().log_softmax(-1)
            kl = F.kl_div(logits.float().log_softmax(-1), t_logp, log_target=True, reduction="batchmean") / seq_len
            loss = (1 - distill_weight) * ce + distill_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed = prior_seconds + time.time() - t0
        entry = {"step": step + 1, "loss": ce.item(), "seconds": round(elapsed, 1)}  # cross-entropy on the text
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            entry["val_loss"] = evaluate(model, val_stream, seq_len, max_windows=16)
        log.append(entry)
        bar.set_postfix(loss=f"{ce.item():.3f}", val=entry.get("val_loss", ""))
        out_of_time = max_minutes is not None and elapsed > max_minutes * 60
        if (step + 1) % save_every == 0 or step + 1 == steps or out_of_time:
            save_state(run, model, opt, step + 1, log, commands)
        if out_of_time:
            print(f"stopping at step {step + 1}: --max-minutes {max_minutes} reached (resume to continue)")
            break
    model.eval().cpu()
    n_steps = log[-1]["step"]
    train_loss = sum(e["loss"] for e in log[-50:]) / len(log[-50:])
    val_loss = evaluate(model, val_stream, seq_len)
    out = DATA_DIR / "models" / which
    save_model(model, out)
    tok.save_pretrained(str(out))
    result = {"model": which, "commands": commands, "parameters": sum(p.numel() for p in model.parameters()),
              "steps": n_steps, "planned_steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr,
              "seed": seed, "distilled_from_target": teacher is not None,
              "distill_weight": distill_weight if teacher is not None else None, "tokens_seen": n_steps * tokens_per_step, "train_loss": round(train_loss, 4),
              "val_loss": round(val_loss, 4), "val_perplexity": round(math.exp(val_loss), 2),
              "seconds": log[-1]["seconds"], "hardware": hardware(), "torch": torch.__version__}
    (out / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    from .device import capabilities
    return f"{capabilities()['device_name']} ({platform.machine()}), {torch.get_num_threads()} threads"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m llmops_lab.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["slices", "tokenizer", "target", "draft", "card", "all"])
    ap.add_argument("--steps", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--distill-weight", type=float, default=DISTILL_WEIGHT,
                    help="draft only: weight of the KL to the target's distribution against the "
                         "text's cross-entropy (1.0: learn from the target alone)")
    ap.add_argument("--fresh", action="store_true", help="discard a saved run instead of resuming it")
    a = ap.parse_args(argv)
    # a flag left out takes the model's default; a 0 given is refused, not replaced by the default
    runs = {which: {k: DEFAULTS[which][k] if getattr(a, k) is None else getattr(a, k) for k in ("steps", "lr", "batch")}
            for which in ("target", "draft") if a.what in (which, "all")}
    if not runs:                                 # slices/tokenizer/card: the run options still apply
        try:
            check_run(1, 1.0, 1, a.seq_len, a.max_minutes, distill_weight=a.distill_weight, threads=a.threads)
        except ValueError as e:
            ap.error(str(e))
    for r in runs.values():                      # before anything is fetched or trained
        try:
            check_run(r["steps"], r["lr"], r["batch"], a.seq_len, a.max_minutes,
                      distill_weight=a.distill_weight, threads=a.threads)
        except ValueError as e:
            ap.error(str(e))
    texts = corpus.fetch_texts()
    if a.what in ("slices", "all"):
        print(corpus.write_slices(texts, DATA_DIR / "corpus"))
    if a.what in ("tokenizer", "all"):
        train, _ = corpus.split(corpus.load_works(texts))
        print("tokenizer ->", train_tokenizer(list(train.values())))
    for which, r in runs.items():
        if a.fresh and (RUNS / which).exists():
            shutil.rmtree(RUNS / which)
        print(json.dumps(train_model(which, r["steps"], r["lr"], r["batch"], a.seq_len, a.seed, a.max_minutes,
                                     threads=a.threads, distill_weight=a.distill_weight), indent=2))
    if a.what in ("card", "all"):
        from .model_card import write_card
        print("card ->", write_card())


if __name__ == "__main__":
    main()
