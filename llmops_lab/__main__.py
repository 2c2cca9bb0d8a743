"""``python -m llmops_lab``: the ``llmops-lab`` command (``info``, ``bench``)."""
from .cli import main

main()
