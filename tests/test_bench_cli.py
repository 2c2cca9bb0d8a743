"""The bench suite and the CLI run end to end at small sizes (the GPU run is the real one)."""
import json
import warnings

import pytest

from llmops_lab import bench, cli, formulas, roofline
from llmops_lab.kv import KVCache, kv_cache_budget
from llmops_lab.loader import embedded_fingerprint, load_model


def test_bench_quick_runs_and_writes_json(tmp_path):
    rows = bench.run("cpu", tmp_path, quick=True)
    errors = [r for r in rows if r["name"] == "error"]
    assert not errors, errors[0]["traceback"] if errors else ""      # a failing suite becomes a row
    names = {r["name"] for r in rows}
    assert "copy bandwidth (read+write)" in names and any(n.startswith("GEMM") for n in names)
    decode = [r for r in rows if r["name"].startswith("decode ours")]
    assert decode and all(r["greedy_tokens_identical"] for r in decode)  # same weights, same tokens
    assert all(r["value"] > 0 and r["ratio"] > 0 for r in decode)
    quant = [r for r in rows if r["suite"] == "quant"]                    # every batch: float and ours
    assert {r["batch"] for r in quant} == {1, 4, 16, 64}
    ours = [r for r in quant if "ours" in r["name"]]
    assert ours and all(r["ratio"] > 0 and r["peer"] == "fp32 F.linear" for r in ours)
    int4, fp = (next(r for r in quant if k in r["name"] and "b=1:" in r["name"]) for k in ("int4", "F.linear"))
    assert int4["weight_bytes"] < fp["weight_bytes"] / 6                 # 4 bits + scales vs 32 bits
    batching = [r for r in rows if r["suite"] == "batching" and r.get("peer")]
    assert batching and batching[0]["same_greedy_tokens"] and all(r["ratio"] > 0 for r in batching)
    # on a CPU the engine runs before and after static (quick: one round; the full bench two)
    assert [len(batching[0][f"{k}_runs_tok_s"]) for k in ("continuous", "static")] == [2, 1]
    from llmops_lab.paged import cpu_kernel                # which decode attention ran, said
    assert batching[0]["decode_attention"].startswith("C kernel") == cpu_kernel.available()
    assert batching[0]["static_step_ms_ctx256_sdpa"] > 0 and batching[0]["static_step_ms_ctx256_c_kernel"] > 0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert len(saved["rows"]) == len(rows) and saved["meta"]["quick"]
    assert saved["meta"]["models"] == embedded_fingerprint()          # which weights ran
    assert "ratio" in bench.format_table(rows)


def test_bench_checks_its_arguments_before_any_suite_runs(tmp_path, monkeypatch):
    """An --out that cannot be written failed after the first suite (its numbers lost); only=[] ran
    every suite; only="core" was read letter by letter."""
    ran = []
    monkeypatch.setattr(bench, "suites", lambda: {"core": lambda ctx: ran.append(1) or []})
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for kw, match in ((dict(out=blocker / "sub"), "cannot write"), (dict(only=[]), "non-empty list"),
                      (dict(only="core"), "non-empty list")):
        with pytest.raises(ValueError, match=match):
            bench.run("cpu", **kw)
    assert not ran


def test_a_failing_suite_becomes_an_error_row(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("boom")
    monkeypatch.setattr(bench, "suites", lambda: {"core": broken, "flash": lambda ctx: [bench.row("flash", "x", 1.0, "u")]})
    rows = bench.run("cpu", tmp_path)
    assert [r["name"] for r in rows] == ["error", "x"] and "boom" in rows[0]["error"]
    assert len(json.loads((tmp_path / "bench.json").read_text())["rows"]) == 2
    # a second run into the same folder keeps the first run's file (it was overwritten)
    first = (tmp_path / "bench.json").read_text()
    bench.run("cpu", tmp_path, only=["flash"])
    kept = sorted(tmp_path.glob("bench-*.json"))
    assert len(kept) == 1 and kept[0].read_text() == first
    assert len(json.loads((tmp_path / "bench.json").read_text())["rows"]) == 1
    bench.run("cpu", tmp_path, only=["flash"])
    assert len(list(tmp_path.glob("bench-*.json"))) == 2


def test_recorded_gpu_runs_load_by_suite():
    meta, rows = bench.recorded("core")
    assert meta["device"] and meta["run"] and rows and {r["suite"] for r in rows} == {"core"}
    bound = next(r for r in rows if r["name"].startswith("decode roofline"))["value"]
    for r in rows:                            # each decode row's fraction is its speed over the run's bound
        if "roofline_fraction" in r:
            assert abs(r["roofline_fraction"] - r["value"] / bound) < 1e-9
    with pytest.raises(FileNotFoundError):
        bench.recorded(run="no-such-run")


def test_cli_info_names_the_models(capsys):
    cli.main(["info"])
    out = capsys.readouterr().out
    assert "torch" in out and "embedded target" in out


def test_cli_refuses_unknown_arguments():
    """``info`` used to exit 0 past a typo (parse_known_args kept it for bench); ``bench --only``
    with no suite named used to mean every suite."""
    import subprocess
    import sys
    for argv in (["info", "--bogus-flag"], ["--bogus", "info"], ["bench", "--only"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2, argv
    r = subprocess.run([sys.executable, "-m", "llmops_lab", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "info" in r.stdout and "bench" in r.stdout


def test_cli_kv_prints_vllm_lines_and_refuses_bad_input(capsys):
    from llmops_lab.kv.calculator import GPU_MEMORY
    h100 = GPU_MEMORY["H100 80GB"]
    assert h100 == 81559 * 2**20                                   # what nvidia-smi reports, not 80 GiB
    cli.main(["kv", "llama-2-70b", "--gpu", "h100 80gb", "-tp", "4", "--max-model-len", "4096"])
    out = capsys.readouterr().out
    want = kv_cache_budget("llama-2-70b", h100, 0.9, max_model_len=4096, tensor_parallel_size=4)
    assert want.log_line() in out and "80.0 KiB" in out          # 2 x 80 x (8/4) x 128 x 2 bytes
    cli.main(["kv", "target", "--gpu-memory-gib", "1", "--kv-dtype", "int8"])
    assert "1.1 KiB (int8: 2 x 8 x 2 x (32 x 1 + 2) bytes" in capsys.readouterr().out   # codes and fp16 scales
    # an fp8 KV cache leaves the weights in bf16: sized at 16 bits, not at the KV cache's 8
    cli.main(["kv", "llama-2-7b", "--kv-dtype", "fp8"])
    fp8 = capsys.readouterr().out
    want = kv_cache_budget("llama-2-7b", h100, 0.9, dtype_bytes=1,
                           weight_bytes=kv_cache_budget("llama-2-7b", h100).weight_bytes)
    assert "at 16 bits" in fp8 and want.log_line() in fp8
    cli.main(["kv", "llama-2-7b", "--kv-dtype", "fp32"])
    assert "at 32 bits" in capsys.readouterr().out
    cli.main(["kv", "mistral-7b"])                                # its window bounds a sequence's blocks
    out = capsys.readouterr().out
    assert "sliding window of 4,096 tokens it holds 257 blocks" in out
    assert kv_cache_budget("mistral-7b", h100, 0.9).log_line() in out
    for argv in (["kv", "llama-2-70b"],                          # 138 GB of weights on one GPU
                 ["kv", "no-such-model"], ["kv", "llama-2-7b", "--gpu", "abacus"],
                 ["kv", "llama-2-7b", "--gpu-memory-utilization", "1.5"],
                 ["kv", "llama-2-7b", "--block-size", "0"], ["kv", "llama-2-7b", "--max-model-len", "5000"],
                 ["kv", "llama-2-70b", "-tp", "3"], ["kv", "llama-2-7b", "--gpu-memory-gib", "nan"],
                 ["kv", "llama-2-7b", "--gpu", "L4 24GB", "--gpu-memory-gib", "8"],    # which one?
                 ["kv", "llama-2-7b", "--weight-bits", "0.001"], ["kv", "llama-2-7b", "--weight-bits", "64"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2, argv
        assert "error" in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        cli.main(["kv", "llama-2-70b", "-tp", "2.5"])
    assert "invalid int value: '2.5'" in capsys.readouterr().err     # the type's name, not the parser's
    with pytest.raises(SystemExit):                                  # the error in the units of the table
        cli.main(["kv", "llama-2-7b", "--gpu-memory-gib", "8"])
    assert "7.20 GiB usable" in capsys.readouterr().err


def test_cli_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch):
    def interrupted(a):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "kv", interrupted)
    with pytest.raises(SystemExit) as e:
        cli.main(["kv", "llama-2-7b"])
    assert e.value.code == 130 and capsys.readouterr().err == "llmops-lab kv: interrupted\n"


def test_cli_generate_greedy_matches_the_engine(capsys, tmp_path):
    from llmops_lab.engine import LLM, SamplingParams
    cli.main(["generate", "To be, or not", "ROMEO:", "--max-tokens", "6"])
    out = capsys.readouterr().out
    want = LLM().generate(["To be, or not", "ROMEO:"], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    for o in want:
        assert o.prompt + o.outputs[0].text in out
    assert "12 tokens in" in out
    first = want[1].outputs[0].token_ids[0]               # SamplingParams' stop options reach the engine
    cli.main(["generate", "ROMEO:", "--max-tokens", "6", "--stop-token-id", str(first)])
    assert "(1 tokens, finished: stop)" in capsys.readouterr().out
    cli.main(["generate", "ROMEO:", "--max-tokens", "6", "--stop-token-id", str(first), "--min-tokens", "2"])
    assert "(1 tokens" not in capsys.readouterr().out     # held back until 2 tokens are out
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # the refusal is said once, in the output, not warned too
        with pytest.raises(SystemExit) as e:
            cli.main(["generate", "", "ROMEO:", "--max-tokens", "2"])      # one refused, the other runs
    assert e.value.code == 1 and "refused" in capsys.readouterr().out
    long = "to be or not " * 2000                                      # 26,000 characters, 8,000 tokens
    with pytest.raises(SystemExit):
        cli.main(["generate", long, "--max-tokens", "2"])
    out = capsys.readouterr().out
    assert "refused" in out and "(26,000 characters)" in out and len(out) < 600   # quoted, not echoed whole
    cli.main(["generate", "ROMEO:", "--max-tokens", "5000", "--model", "draft"])   # past its context: said
    assert "at the model's context of 1,024 tokens before --max-tokens 5,000" in capsys.readouterr().out
    for argv in (["generate", "x", "--temperature", "-1"], ["generate", "x", "--model", str(tmp_path / "none")],
                 ["generate", "x", "--model", "/no/such/folder"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and "error" in capsys.readouterr().err, argv


def test_cli_perplexity_is_evaluate_perplexity_of_the_quantized_model(capsys):
    from llmops_lab import corpus
    from llmops_lab.evaluate import encode, perplexity
    from llmops_lab.loader import load_tokenizer
    from llmops_lab.quant import quantize
    cli.main(["perplexity", "--quantize", "rtn", "--bits", "8", "--group-size", "-1", "--windows", "2",
              "--window", "128"])
    out = capsys.readouterr().out
    model = quantize(load_model("target", device="cpu"), "rtn", bits=8, group_size=-1, progress=False)
    ids = encode(load_tokenizer("target"), corpus.read_slice("validation"))
    assert f"perplexity {perplexity(model, ids, window=128, max_windows=2):.3f} on 256 held-out tokens" in out
    assert "rtn bits 8 group size -1" in out
    for argv in (["perplexity", "--bits", "4"],                              # bits without a method
                 ["perplexity", "--quantize", "rtn", "--bits", "9"],          # no 9-bit codes
                 ["perplexity", "--quantize", "bnb_nf4", "--bits", "4"],      # NF4 has its own format
                 ["perplexity", "--quantize", "lol"], ["perplexity", "--windows", "0"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and "error" in capsys.readouterr().err, argv


def test_kv_cache_allocates_exactly_the_formula():
    m = load_model("target", device="cpu")
    c = m.config
    for B, S in [(1, 64), (3, 100), (8, 1024)]:
        cache = KVCache.for_model(m, B, S)
        assert cache.nbytes == formulas.kv_cache_bytes(c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                                                       S, 4, B)


def test_roofline_bound_grows_with_batch_and_is_finite():
    m = load_model("target", device="cpu")
    b1, b8 = (roofline.decode_bound(m, b, 64, 10e9) for b in (1, 8))
    assert 0 < b1 < b8 < 8 * b1 + 1e-9
    t = roofline.decode_throughput(m, 2, prompt_len=8, new_tokens=4, repeats=1)
    assert t.median > 0


@pytest.mark.parametrize("method", ["int4_split", "int4_gemv_fast", "int8_gemv_fast"])
def test_quant_bench_candidate_rows_and_failure(monkeypatch, method):
    """The GPU suite's kernel candidates: their rows carry the float time of their own pass, and a
    candidate that fails becomes one row saying so instead of losing the suite."""
    import torch

    from llmops_lab.bench import quant as bq
    from llmops_lab.quant import experiment
    shapes = [("q", 16, 64)]
    rows, failed = bq.candidate_rows(method, (1, 2), shapes, torch.device("cpu"), torch.float32, repeats=1, label="cand")
    assert not failed and [r["batch"] for r in rows] == [1, 2]
    assert all(r["method"] == method and r["float_ms"] > 0 for r in rows)
    assert bq._targets(method, 1) == (">= 3.0x" if method.startswith("int4") else ">= 1.6x")

    def broken(*a, **k):
        raise RuntimeError("no such kernel")
    monkeypatch.setattr(experiment, "linear_speed", broken)
    rows, failed = bq.candidate_rows(method, (1,), shapes, torch.device("cpu"), torch.float32, repeats=1, label="cand")
    assert rows == [] and failed[0]["name"] == "cand: failed" and "no such kernel" in failed[0]["error"]


def test_batching_candidates_rows_and_failure(random_llama, monkeypatch):
    """The GPU suite's engine candidates (prefill graphs; async scheduling on top) run here too, on
    the CPU's eager path: each row compares with the default engine's run and agrees with it; a
    candidate that fails becomes one row saying so."""
    from llmops_lab.bench import batching
    from llmops_lab.config import ModelConfig
    from llmops_lab.engine import experiment
    from llmops_lab.engine import workload as wlmod
    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    model = random_llama(cfg)
    wl = wlmod.make_workload(list(range(2, 120)) * 4, 6, prompt_len=(4, 12), mean_output=6, max_output=12)
    res = experiment.compare(model, wl, max_num_seqs=3, max_num_batched_tokens=256)
    rows = batching.candidate_rows(model, wl, 3, res["continuous"], res["static"])
    assert [r["name"].split(" (")[0] for r in rows] == [
        "continuous, prefill graphs", "continuous, prefill graphs + async scheduling",
        "continuous, prefill graphs + async scheduling + fused ops"]
    assert all(r["prefix_agreement"] == 1 and r["vs_default"] > 0 for r in rows)
    assert rows[1]["overlapped_steps"] > 0 and rows[0]["overlapped_steps"] == 0

    def broken(*a, **k):
        raise RuntimeError("capture failed")
    monkeypatch.setattr(wlmod, "run_continuous", broken)
    rows = batching.candidate_rows(model, wl, 3, res["continuous"], res["static"])
    assert len(rows) == 3 and all("capture failed" in r["error"] for r in rows)
