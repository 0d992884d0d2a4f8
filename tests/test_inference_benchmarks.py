"""The inference benchmarks: their small helpers against plain references, and quick smoke runs that
print complete tables (decode speed, serve load through the engine, precision agreement)."""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import decode_speed  # noqa: E402
import serve_load  # noqa: E402


@pytest.mark.parametrize("q", [1, 50, 95, 100])
def test_percentile_is_the_nearest_rank(q):
    values = sorted([0.3, 0.1, 0.7, 0.2, 0.9, 0.5, 0.4])
    rank = math.ceil(q / 100 * len(values))  # written out: the smallest value with q% of them at or below it
    assert serve_load.percentile(values, q) == values[rank - 1]
    assert math.isnan(serve_load.percentile([], q))


def test_agreement_counts_tokens_before_the_first_difference():
    ref = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    other = torch.tensor([[1, 2, 9, 4], [5, 6, 7, 8]])  # row 0 differs at 2 (its later match does not count)
    assert decode_speed.agreement(ref, other) == pytest.approx((2 / 4 + 4 / 4) / 2)


def test_clients_parse_spaces_and_commas():
    assert serve_load.parse_clients(["1,8,32"]) == [1, 8, 32]
    assert serve_load.parse_clients(["1", "4", "8"]) == [1, 4, 8]
    with pytest.raises(SystemExit):
        serve_load.parse_clients(["0"])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="CPU accounting reads Linux's /proc")
def test_cpu_accounting_reads_a_child_process_own_count():
    """serve_load's /proc reading of a child's CPU time against the child's own clock (time.process_time)."""
    import subprocess

    burn = ("import sys, time\nwhile time.process_time() < 0.3: pass\n"
            "print(time.process_time(), flush=True)\nsys.stdin.readline()")
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        own = float(child.stdout.readline())
        assert child.pid in serve_load.children_of(os.getpid())
        assert serve_load.cpu_seconds(child.pid) == pytest.approx(own, abs=0.05)  # the kernel counts in 10 ms ticks
    finally:
        child.communicate("\n")
    assert math.isnan(serve_load.cpu_seconds(child.pid))  # gone: no count, not a stale one


def test_serve_load_quick_through_the_engine(capsys):
    serve_load.main(["--quick"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+[12]\s+\d+\s", line)]
    assert [r[0] for r in rows] == ["1", "2"]
    assert all(float(r[3].replace(",", "")) > 0 for r in rows)  # tokens/s
    assert "failed request" not in out


def test_the_http_client_reads_every_token_of_a_streamed_reply(tmp_path):
    """serve_load's asyncio client against a live server: the usage count, one arrival per text chunk, in order;
    with a stagger, the later clients start later."""
    import asyncio

    pytest.importorskip("uvicorn", reason="the server needs the serve extra")
    from tests.test_serve_fixtures import live_server, make_tiny_checkpoint

    tiny = make_tiny_checkpoint(tmp_path / "run", context=256)
    with live_server(tiny.path, "--engine", "process") as server:
        driver = serve_load.HttpDriver(server.url, 12, 0.0)
        result = asyncio.run(driver(0, 1))
        assert result.tokens == 12 and 1 <= len(result.arrivals) <= 12
        assert result.arrivals == sorted(result.arrivals) and 0 < result.ttft <= result.total
        level = serve_load.run_level(driver, 2, 1, 60, stagger=0.2, meter=serve_load.CpuMeter(server.proc.pid))
    assert level["requests"] == 2 and level["tokens"] == 24 and not level["errors"]
    assert set(level["cpu"]) == {"server", "engine", "client"}  # the engine process counted with the server
    assert level["cpu"]["server"] >= level["cpu"]["engine"] >= 0
    assert level["seconds"] >= 0.2  # the second client waited its turn


@pytest.mark.slow  # ~20 s: imports transformers and times five decoders
def test_decode_speed_quick_prints_every_candidate(capsys):
    decode_speed.main(["--quick"])
    out = capsys.readouterr().out
    for name in ("ours fp32", "ours bf16", "ours int8", "transformers fp32"):
        assert len(re.findall(rf"^{name}\s+[\d,]+\s", out, flags=re.M)) == 2, name  # batch 1 and 2
    # our fp32 and transformers decode the same weights greedily: the same tokens
    assert all(line.split()[-1] == "1.00" for line in out.splitlines() if line.startswith("transformers fp32"))


def test_inference_precision_on_a_small_checkpoint(tmp_path, capsys):
    import inference_precision

    from cogni_mamba.config import Config, ModelConfig
    from cogni_mamba.model import CogniMamba
    from cogni_mamba.tokenizer import SimpleTokenizer
    from cogni_mamba.train.checkpoint import save_checkpoint

    tok = SimpleTokenizer()
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, hidden_dim=96,
                      max_seq_len=64)
    save_checkpoint(tmp_path / "run", "step-1", CogniMamba(cfg), Config(model=cfg), tokenizer=tok)
    text = tmp_path / "text.jsonl"  # one document per line
    text.write_text("".join(f'{{"text": "Story {i}: the fox ran to the river and back."}}\n' for i in range(6)))
    before = os.environ.get("COGNI_MAMBA_INT8")
    inference_precision.main(["--checkpoint", str(tmp_path / "run"), "--data", str(text), "--prompts", "3",
                              "--tokens", "4", "--eval-tokens", "500",  # int8-compiled: test_inference_compiled.py
                              "--variants", "fp32-prepared", "bf16", "int8", "int8-fbgemm"])
    assert os.environ.get("COGNI_MAMBA_INT8") == before  # int8-fbgemm's switch does not outlive it
    out = capsys.readouterr().out
    names = ("fp32", "fp32-prepared", "bf16", "int8", "int8-fbgemm")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in [[n] for n in names]}
    assert set(rows) == set(names)
    assert rows["fp32"][1:3] == ["1.000", "3/3"] and float(rows["fp32"][-1]) == 0
    assert rows["fp32-prepared"][1:3] == ["1.000", "3/3"]  # the lean decode step: the same tokens as the forward
    assert all(abs(float(r[-1])) < 0.05 for r in rows.values())  # eval-loss deltas: small for a random model


def test_int8_products_prints_both_kernels_and_their_errors(capsys, monkeypatch):
    from cogni_mamba.inference import int8_kernel, precision

    if not int8_kernel.available() or not precision.fbgemm_available():
        pytest.skip("needs our int8 kernel and fbgemm")
    import int8_products

    monkeypatch.setattr(sys, "argv", ["int8_products.py", "--presets", "nano", "--rows", "1", "3", "--repeats", "1"])
    int8_products.main()
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| nano")]
    assert [int(r[1]) for r in rows] == [1, 3]
    for r in rows:  # both within 8-bit rounding of the fp32 product
        assert 0 < float(r[5]) < 0.03 and 0 < float(r[6]) < 0.03 and r[4].strip().endswith("x")
