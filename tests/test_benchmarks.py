"""Benchmarks: the naive attention is the same maths as SDPA, the HF copy computes our loss, timing
alternates, and the ablation / preset / throughput scripts print complete tables of finite numbers."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402

from cogni_mamba.config import ModelConfig  # noqa: E402
from cogni_mamba.model import CogniMamba  # noqa: E402

SMALL = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, hidden_dim=96, max_seq_len=32)


# --- the naive attention equals SDPA -------------------------------------------------------------

@pytest.mark.parametrize("gqa", [False, True])
def test_naive_attention_equals_sdpa_causal(gqa):
    q = torch.randn(2, 4, 9, 16)
    k, v = torch.randn(2, 2 if gqa else 4, 9, 16), torch.randn(2, 2 if gqa else 4, 9, 16)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    got = common.naive_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_naive_attention_equals_sdpa_with_bool_mask_and_cache_shape():
    # Decoding with a cache: 3 new queries against 7 keys, a boolean mask hiding a padded slot.
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 1, 7, 8), torch.randn(2, 1, 7, 8)
    mask = torch.ones(2, 1, 3, 7, dtype=torch.bool).tril(4)
    mask[1, :, :, 0] = False
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = common.naive_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_impl_routes_the_model_through_naive_attention_and_restores_sdpa(monkeypatch):
    calls = []
    original = common.naive_attention
    monkeypatch.setattr(common, "naive_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    model = CogniMamba(SMALL)
    ids = torch.randint(0, SMALL.vocab_size, (2, 12))
    want = model(ids)
    with common.attention_impl("naive"):
        got = model(ids)
    assert len(calls) == SMALL.n_layers
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    model(ids)
    assert len(calls) == SMALL.n_layers  # back on SDPA after the block


# --- the transformers copy and the training step -------------------------------------------------

def test_llama_copy_has_our_loss_and_synthetic_targets_match_hf_shift():
    from cogni_mamba.export import to_transformers

    model = CogniMamba(SMALL)
    hf = to_transformers(model)
    x, y = common.synthetic_batch(SMALL.vocab_size, 3, 16, seed=0, device=torch.device("cpu"))
    assert torch.equal(y[:, :-1], x[:, 1:]) and bool((y[:, -1] == -100).all())
    with torch.no_grad():
        ours = common.ours_loss(model, x, y)
        logits = hf(input_ids=x).logits  # a cross-entropy written here, on transformers' logits
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, SMALL.vocab_size), x[:, 1:].reshape(-1))
        theirs = common.hf_loss(hf, x, y)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs, ref, rtol=1e-5, atol=1e-5)


def test_train_step_with_accumulation_equals_one_big_batch_update():
    a, b = CogniMamba(SMALL), CogniMamba(SMALL)
    b.load_state_dict(a.state_dict())
    cpu = torch.device("cpu")
    x, y = common.synthetic_batch(SMALL.vocab_size, 4, 16, seed=1, device=cpu)
    common.TrainStep(a, "fp32", cpu)([(x, y)])
    common.TrainStep(b, "fp32", cpu)([(x[:2], y[:2]), (x[2:], y[2:])])
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6, msg=name)


def test_alternate_takes_turns_and_flips_the_order():
    order = []
    common.alternate({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 4, torch.device("cpu"))
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]


# --- the scripts print complete tables ----------------------------------------------------------

def run_script(*args: str, timeout: int = 900) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def table_rows(text: str, first_header: str) -> list[list[str]]:
    """Body rows of the markdown table whose first header cell is `first_header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def number(cell: str) -> float:
    m = re.match(r"^-?[\d,]*\.?\d+", cell)
    assert m, f"no number in {cell!r}"
    return float(m.group().replace(",", ""))


def assert_finite(rows: list[list[str]], columns: list[int]) -> None:
    for row in rows:
        for c in columns:
            assert math.isfinite(number(row[c])), row


@pytest.mark.slow
def test_ablations_quick_prints_every_row_with_finite_numbers():
    out = run_script("benchmarks/ablations.py", "--quick", "--threads", "1")
    rows = table_rows(out, "technique (on vs off)")
    labels = [r[0] for r in rows]
    for start in ("mixed precision", "SDPA", "grouped-query", "grad accumulation", "tied vs untied", "all four"):
        assert sum(label.startswith(start) for label in labels) == 1, labels
    assert_finite(rows, [1, 2, 3, 4, 5, 6])
    assert all(number(r[1]) > 0 and number(r[4]) > 0 for r in rows)
    decode = table_rows(out, "attention")
    assert [r[0] for r in decode] == ["GQA", "MHA"]
    assert_finite(decode, [2, 3])
    # n_kv_heads / n_heads = 2 / 8 in the nano preset: GQA keeps a quarter of MHA's cache.
    assert "GQA's KV cache is 0.25 of MHA's" in out


@pytest.mark.slow
def test_presets_quick_prints_every_row_with_finite_numbers():
    out = run_script("benchmarks/presets.py", "--quick", "--threads", "1")
    rows = table_rows(out, "preset")
    assert [r[0] for r in rows] == ["nano", "tiny"]
    assert_finite(rows, [1, 3, 6, 7, 8])
    assert rows[0][1] == "4.1M" and rows[1][1] == "75.8M"  # README's closed-form counts: 4,065,536 and 75,802,368


@pytest.mark.slow
def test_train_throughput_quick_prints_a_ratio_per_precision():
    out = run_script("benchmarks/train_throughput.py", "--quick", "--threads", "1", "--steps", "2")
    rows = table_rows(out, "preset")
    assert [(r[0], r[1]) for r in rows] == [("nano", "fp32"), ("nano", "bf16")]
    assert_finite(rows, [3, 4, 5])


def test_gpu_check_refuses_clearly_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal path is for machines without it")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                                                       "OUT": str(tmp_path)})
    assert proc.returncode != 0
    assert "CUDA" in proc.stderr and "--dry-run" in proc.stderr


# --- scripts/gpu_check.sh: order, results as it goes, summary, exit status ---------------------------

GPU_CHECK_ORDER = ["precision", "attention", "dist", "pytest", "torchrun", "eager", "big-batch", "compile",
                   "transformers", "presets", "ablations", "serve"]


def gpu_check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "OUT": str(tmp_path),
                "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=full_env)


def status_lines(tmp_path: Path) -> list[list[str]]:
    text = (tmp_path / "gpu_check" / "status.tsv").read_text()
    return [line.split("\t") for line in text.splitlines()]


def test_gpu_check_order_and_budget_skips_fail_the_run(tmp_path):
    proc = gpu_check(tmp_path, GPU_CHECK_BUDGET_S="0")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = status_lines(tmp_path)
    assert [r[0] for r in rows] == GPU_CHECK_ORDER  # correctness, then throughput, compile, the rest
    assert all(r[1] == "skipped (budget)" or r[1].startswith("skipped (n/a") for r in rows), rows
    summary = proc.stdout[proc.stdout.index("### Summary"):]
    assert [line.split(":")[0].strip("| ") for line in summary.splitlines() if line.startswith("| ") and
            not line.startswith("| step")] == GPU_CHECK_ORDER


def test_gpu_check_writes_each_step_as_it_ends_and_a_failed_step_fails_the_run(tmp_path):
    proc = gpu_check(tmp_path, GPU_CHECK_ONLY="precision attention", GPU_CHECK_FAIL="attention")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = {r[0]: r for r in status_lines(tmp_path)}
    assert rows["precision"][1] == "ok" and float(rows["precision"][2]) >= 0
    assert rows["attention"][1] == "failed"
    assert all(rows[k][1] == "skipped (n/a: not selected)" for k in GPU_CHECK_ORDER if k not in
               ("precision", "attention"))
    log = (tmp_path / "gpu_check" / "gpu_check.md").read_text()
    assert "bf16 vs fp32: first-step relative difference" in log and "PASS" in log  # the real check ran
    assert "injected failure (GPU_CHECK_FAIL=attention)" in log
    assert "| precision: bf16 / fp16 training losses vs fp32, nano | ok |" in proc.stdout
    assert "| attention: " in proc.stdout and "| failed |" in proc.stdout


def test_gpu_check_steps_that_do_not_apply_do_not_fail_the_run(tmp_path):
    proc = gpu_check(tmp_path, GPU_CHECK_ONLY="nothing")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = status_lines(tmp_path)
    assert [r[0] for r in rows] == GPU_CHECK_ORDER and all(r[1].startswith("skipped (n/a") for r in rows), rows
    assert "### Summary" in proc.stdout
