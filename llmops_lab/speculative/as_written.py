"""The source document's ``SpeculativeDecoder``, re-implemented with its logic and quirks intact.

What it does, step by step, as the document wrote it:
- both models re-run the whole prefix every step (no KV cache: quadratic work);
- the loop condition counts the prompt in ``max_tokens`` and can overshoot it by up to k - 1 tokens
  (a step starts below max_tokens and adds at most k);
- after a rejection at draft i it appends ``argmax(target_logits[:, -(k - accepted)])``: the target's
  prediction one position *after* the rejected draft, conditioned on that rejected token, instead of
  ``target_logits[:, -(k + 1 - accepted)]``, the prediction at the rejected position. So its output
  is not the target's greedy output;
- when all k drafts are accepted it adds no bonus token.
Kept only to be measured against ``SpeculativeDecoder``; do not use it.
"""
from __future__ import annotations

import torch


class DocumentSpeculativeDecoder:
    def __init__(self, target_model, draft_model, tokenizer, k: int = 5):
        self.target = target_model
        self.draft = draft_model
        self.tokenizer = tokenizer
        self.k = k

    @torch.inference_mode()
    def generate_ids(self, input_ids: torch.Tensor, max_tokens: int = 256) -> tuple[torch.Tensor, list[dict]]:
        """The document's loop on token ids [1, S]; returns all ids and a trace of every step."""
        generated = input_ids.clone()
        trace = []
        while generated.shape[-1] < max_tokens:
            draft_tokens = []
            draft_input = generated.clone()
            for _ in range(self.k):  # the draft re-reads the whole prefix for every token
                draft_logits = self.draft(draft_input)[:, -1, :]
                draft_token = torch.argmax(draft_logits, dim=-1)
                draft_tokens.append(draft_token)
                draft_input = torch.cat([draft_input, draft_token.unsqueeze(0)], dim=-1)
            draft_tensor = torch.stack(draft_tokens, dim=-1)
            candidate = torch.cat([generated, draft_tensor], dim=-1)
            target_logits = self.target(candidate)  # the target re-reads it too
            accepted = 0
            for i in range(self.k):
                target_token = torch.argmax(target_logits[:, -(self.k + 1 - i), :], dim=-1)
                if target_token.item() == draft_tokens[i].item():
                    accepted += 1
                else:
                    break
            step = {"start": generated.shape[-1], "drafts": draft_tensor[0].tolist(), "accepted": accepted}
            if accepted > 0:
                generated = torch.cat([generated, draft_tensor[:, :accepted]], dim=-1)
            if accepted < self.k:
                next_token = torch.argmax(target_logits[:, -(self.k - accepted), :], dim=-1)  # off by one
                step["appended"] = int(next_token)
                step["target_would_append"] = int(torch.argmax(target_logits[:, -(self.k + 1 - accepted), :], dim=-1))
                generated = torch.cat([generated, next_token.unsqueeze(0)], dim=-1)
            trace.append(step)
        return generated, trace

    def generate(self, prompt: str, max_tokens: int = 256) -> str:
        input_ids = self.tokenizer.encode(prompt, return_tensors="pt")
        generated, _ = self.generate_ids(input_ids, max_tokens)
        return self.tokenizer.decode(generated[0])
