"""Benchmarks: the naive attention is the same maths as SDPA, the HF copy computes our loss, timing
alternates, the benchmarks time the Trainer's own step, and the ablation / preset / throughput scripts
print complete tables whose numbers agree with each other and with counts made here."""

from __future__ import annotations

import copy
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

from cogni_mamba.config import ModelConfig, preset  # noqa: E402
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


def test_bench_step_is_one_adamw_update_for_ours_and_for_llama():
    # The benchmark step (the Trainer's own) against one written here: cross-entropy, backward, clip to
    # norm 1, AdamW (lr 1e-4, decay 0.1 on matrices only); transformers' copy goes through the same step.
    # The updates are compared, not the weights: at lr 1e-4 the decay moves a weight by ~1e-7, about 0.2%
    # of its update (by norm); a handful of entries whose gradient is near AdamW's eps may differ by ~1e-7.
    from cogni_mamba.export import to_transformers

    cpu = torch.device("cpu")
    ours = CogniMamba(SMALL)
    ref, hf = copy.deepcopy(ours), to_transformers(copy.deepcopy(ours))
    before, hf_before = params_of(ours), params_of(hf)
    x, y = common.synthetic_batch(SMALL.vocab_size, 4, 16, seed=1, device=cpu)
    got = common.bench_trainer(ours, [(x[:2], y[:2]), (x[2:], y[2:])], "fp32", cpu).train_step()
    got_hf = common.bench_trainer(common.LlamaLoss(hf), [(x, y)], "fp32", cpu, model_config=SMALL).train_step()

    loss = F.cross_entropy(ref(x).reshape(-1, SMALL.vocab_size), y.reshape(-1), ignore_index=-100)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    matrices = [p for p in ref.parameters() if p.dim() >= 2]
    vectors = [p for p in ref.parameters() if p.dim() < 2]
    torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
                      lr=1e-4).step()

    assert got.applied and got_hf.applied
    want_loss = float(loss.detach())
    assert got.loss == pytest.approx(want_loss, rel=1e-5) and got_hf.loss == pytest.approx(want_loss, rel=1e-5)
    for want, got_now, start in ((params_of(ref), params_of(ours), before),
                                 (params_of(to_transformers(ref)), params_of(hf), hf_before)):
        for name, w in want.items():
            update = w - start[name]
            assert float((got_now[name] - start[name] - update).norm() / update.norm()) < 3e-4, name


def params_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_measure_times_the_trainers_own_step(monkeypatch):
    from cogni_mamba.train import Trainer

    calls = []
    original = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self: calls.append(1) or original(self))
    spec = common.RunSpec(preset="nano", batch=1, seq_len=16, steps=2, warmup=2, precision="fp32")
    result = common.measure(spec)
    assert len(calls) == 1 + spec.warmup + spec.steps  # the library warm-up, then the measured model's steps
    assert len(result["step_times"]) == spec.steps and result["tokens_per_s"] > 0
    assert math.isfinite(result["last_loss"]) and result["skipped_steps"] == 0


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


def mebibytes(cell: str) -> float:
    """A table's memory cell ("1,234 KiB" or "12.3 MiB") in MiB."""
    return number(cell) / (1024 if cell.endswith("KiB") else 1)


def closed_form_params(c) -> int:
    """Parameters of the Llama block stack counted by hand: tied embedding, per layer wq wo (d x d), wk wv
    (d x kv_dim), w1 w2 w3 (d x ffn), two norms; the final norm."""
    per_layer = 2 * c.dim * c.dim + 2 * c.dim * c.kv_dim + 3 * c.dim * c.ffn_dim + 2 * c.dim
    return c.vocab_size * c.dim * (1 if c.tie_embeddings else 2) + c.n_layers * per_layer + c.dim


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
    for r in rows:  # speedup = tok/s on / tok/s off, saving = 1 - peak on / peak off (as printed, rounded)
        assert number(r[3]) == pytest.approx(number(r[1]) / number(r[2]), abs=0.01 + 0.01 * number(r[3]))
        assert number(r[6]) == pytest.approx(100 * (1 - mebibytes(r[4]) / mebibytes(r[5])), abs=1.5)
    decode = table_rows(out, "attention")
    assert [r[0] for r in decode] == ["GQA", "MHA"]
    assert_finite(decode, [2, 3])
    nano = preset("nano").model
    assert mebibytes(decode[0][2]) / mebibytes(decode[1][2]) == pytest.approx(nano.n_kv_heads / nano.n_heads,
                                                                             rel=0.02)
    share = float(re.search(r"GQA's KV cache is ([\d.]+) of MHA's", out).group(1))
    assert share == pytest.approx(nano.n_kv_heads / nano.n_heads, abs=0.005)


@pytest.mark.slow
def test_presets_quick_prints_every_row_with_finite_numbers():
    out = run_script("benchmarks/presets.py", "--quick", "--threads", "1")
    rows = table_rows(out, "preset")
    assert [r[0] for r in rows] == ["nano", "tiny"]
    assert_finite(rows, [1, 3, 6, 7, 8])
    for row, name in zip(rows, ["nano", "tiny"], strict=True):
        assert number(row[1]) == pytest.approx(closed_form_params(preset(name).model) / 1e6, abs=0.05), row


@pytest.mark.slow
def test_train_throughput_quick_prints_a_ratio_per_precision():
    out = run_script("benchmarks/train_throughput.py", "--quick", "--threads", "1", "--steps", "2")
    rows = table_rows(out, "preset")
    assert [(r[0], r[1]) for r in rows] == [("nano", "fp32"), ("nano", "bf16")]
    assert_finite(rows, [3, 4, 5])
    for r in rows:  # the ratio column is ours / transformers
        assert number(r[5]) == pytest.approx(number(r[3]) / number(r[4]), abs=0.01 + 0.01 * number(r[5]))


def test_gpu_check_refuses_clearly_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal path is for machines without it")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                                                       "OUT": str(tmp_path)})
    assert proc.returncode != 0
    assert "CUDA" in proc.stderr and "--dry-run" in proc.stderr


# --- scripts/gpu_check.sh: order, results as it goes, summary, exit status ---------------------------

GPU_CHECK_ORDER = ["precision", "attention", "dist", "pytest", "torchrun", "graphs", "eager", "big-batch", "compile",
                   "transformers", "presets", "ablations", "serve", "serve-http"]


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
