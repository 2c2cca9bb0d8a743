"""A token-by-token picture of speculative decoding: accepted drafts, rejections, corrections."""
from __future__ import annotations

import html


def trace_html(trace: list[dict], tokenizer, max_steps: int = 40) -> str:
    """HTML: accepted drafts green, the first rejected draft struck through in red, the target's
    corrected token blue (a bonus token, after k accepted drafts, bold blue); one step per bracket."""
    def tok(i):
        return html.escape(tokenizer.decode([i])).replace("\n", "⏎")
    parts = []
    for step in trace[:max_steps]:
        a, d = step["accepted"], step["drafts"]
        cells = [f'<span style="background:#c8f7c5">{tok(t)}</span>' for t in d[:a]]
        if a < len(d):
            cells.append(f'<span style="background:#f7c5c5;text-decoration:line-through">{tok(d[a])}</span>')
        weight = "bold" if step["bonus"] else "normal"
        cells.append(f'<span style="background:#c5d8f7;font-weight:{weight}">{tok(step["fix"])}</span>')
        parts.append("[" + "".join(cells) + "]")
    legend = ('<p><span style="background:#c8f7c5">accepted draft</span> '
              '<span style="background:#f7c5c5;text-decoration:line-through">rejected draft</span> '
              '<span style="background:#c5d8f7">target correction</span> '
              '<span style="background:#c5d8f7;font-weight:bold">bonus token</span></p>')
    return legend + '<div style="font-family:monospace;line-height:1.8">' + " ".join(parts) + "</div>"
