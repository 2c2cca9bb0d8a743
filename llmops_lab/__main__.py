"""``python -m llmops_lab``: the ``llmops-lab`` command (``info``, ``bench``, ``kv``,
``generate``, ``perplexity``: ``llmops_lab.cli``)."""
from .cli import main

main()
