"""Shared test setup: a non-interactive plot backend, two threads, and GPU tests skipped on a CPU."""
import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def random_llama():
    """A factory: ``random_llama(config)`` is a LlamaModel with seeded N(0, 0.08^2) weights, in eval mode."""
    from llmops_lab.model import LlamaModel

    def make(config, std: float = 0.08, seed: int = 0):
        torch.manual_seed(seed)
        m = LlamaModel(config).eval()
        for p in m.parameters():
            torch.nn.init.normal_(p, std=std)
        return m
    return make


@pytest.fixture(scope="session")
def compiled_variants():
    """``compiled_variants(kernel)``: how many specialisations of a Triton kernel have been compiled
    in this process (the cache's layout moved between Triton versions: ``device_caches`` since 3.x,
    ``cache`` before)."""
    def count(kernel) -> int:
        caches = getattr(kernel, "device_caches", None)
        if caches is not None:
            return sum(len(c[0]) for c in caches.values())
        return sum(len(c) for c in kernel.cache.values())
    return count
