"""Generation: the engine and the static-batch KV-cache loop against full recomputation, the sampling
filters against naive implementations written here, seeds and stop ids (stop strings: test_engine.py)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from cogni_mamba.config import GenerationConfig, ModelConfig
from cogni_mamba.errors import CogniError
from cogni_mamba.generate import (
    ContextOverflowError,
    apply_repetition_penalty,
    decode_n,
    draw,
    make_generator,
    min_p_filter,
    process_logits,
    sample,
    sampling_candidates,
    top_k_filter,
    top_p_filter,
)
from cogni_mamba.inference import Engine
from cogni_mamba.model import CogniMamba
from tests.references import naive_greedy

GREEDY = GenerationConfig(temperature=0.0, top_k=None, top_p=None, max_new_tokens=200)





def tiny_model(max_seq_len: int = 512, vocab: int = 256) -> CogniMamba:
    # init_std 0.3 (not 0.02) so a random model does not collapse onto one repeated token.
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=128,
                      max_seq_len=max_seq_len, init_std=0.3)
    return CogniMamba(cfg).eval()


def generate(model, prompt: list[int], settings: GenerationConfig, *, stop_ids=(), bos_id=None, on_overflow="warn"):
    """One request through the inference engine (read inline): an iterator of ids with a finish_reason."""
    return Engine(model, max_batch=2, bos_id=bos_id).submit(prompt, settings, stop_ids=stop_ids,
                                                             on_overflow=on_overflow)


# --- the decode loop ------------------------------------------------------------------------------

def test_greedy_equals_full_recomputation_for_200_tokens():
    model = tiny_model()
    prompt = [5, 17, 99, 3]
    stream = generate(model, prompt, GREEDY)
    got = list(stream)
    expected = naive_greedy(model, prompt, 200)
    assert len(set(expected)) > 20  # the reference is not a degenerate repetition
    assert got == expected
    assert stream.finish_reason == "length"


def test_left_padded_batch_matches_each_prompt_alone():
    model = tiny_model()
    prompts = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [200, 100, 50]]
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=40)
    rows = list(zip(*decode_n(model, prompts, cfg, pad_id=0), strict=True))
    for prompt, row in zip(prompts, rows, strict=True):
        assert list(row) == naive_greedy(model, prompt, 40)


def test_repetition_penalty_in_the_loop_matches_naive_decoding():
    model = tiny_model()
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=60, repetition_penalty=1.8)
    prompt = [3, 3, 40, 41]
    assert list(generate(model, prompt, cfg)) == naive_greedy(model, prompt, 60, penalty=1.8)


def test_stop_id_ends_the_row_and_is_not_yielded():
    model = tiny_model()
    prompt = [9, 8, 7]
    free = naive_greedy(model, prompt, 50)
    stop = free[12]
    stream = generate(model, prompt, GenerationConfig(temperature=0.0, max_new_tokens=50), stop_ids=[stop])
    assert list(stream) == free[:free.index(stop)]
    assert stream.finish_reason == "stop"


def test_batch_rows_stop_independently():
    model = tiny_model()
    prompts = [[9, 8, 7], [1, 2]]
    free = [naive_greedy(model, p, 30) for p in prompts]
    stop = free[0][5]
    steps = list(decode_n(model, prompts, GenerationConfig(temperature=0.0, max_new_tokens=30), stop_ids=[stop]))
    for r, prompt in enumerate(prompts):
        row = [s[r] for s in steps]
        made = row[:row.index(None)] if None in row else row
        assert made == naive_greedy(model, prompt, 30, stop_ids={stop})
        assert all(t is None for t in row[len(made):])  # once stopped, a row stays stopped


def test_generation_stops_when_the_context_is_full():
    model = tiny_model(max_seq_len=32)
    stream = generate(model, list(range(1, 21)), GenerationConfig(temperature=0.0, max_new_tokens=100))
    got = list(stream)
    # 20 prompt slots + 12 fed-back tokens fill 32 slots; the logits of the last slot give one more token.
    assert len(got) == 13 and stream.finish_reason == "length"
    assert got == naive_greedy(model, list(range(1, 21)), 13)


def test_long_prompt_keeps_its_most_recent_tokens_with_a_warning():
    model = tiny_model(max_seq_len=32)
    prompt = [random.Random(1).randrange(256) for _ in range(50)]
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=8)
    with pytest.warns(UserWarning, match="keeping its most recent 24 tokens"):
        got = list(generate(model, prompt, cfg))
    assert got == naive_greedy(model, prompt[-24:], 8)
    with pytest.raises(ContextOverflowError, match="shorten the prompt"):
        list(generate(model, prompt, cfg, on_overflow="error"))


def test_empty_prompt_starts_from_bos():
    model = tiny_model()
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=10)
    assert list(generate(model, [], cfg, bos_id=1)) == naive_greedy(model, [1], 10)
    with pytest.raises(CogniError, match="empty"):
        list(generate(model, [], cfg))


def test_same_seed_gives_the_same_sample():
    model = tiny_model()
    cfg = GenerationConfig(temperature=1.0, top_k=None, top_p=None, max_new_tokens=40, seed=1234)
    a, b = list(generate(model, [1, 2], cfg)), list(generate(model, [1, 2], cfg))
    c = list(generate(model, [1, 2], GenerationConfig(temperature=1.0, top_k=None, top_p=None,
                                                      max_new_tokens=40, seed=99)))
    assert a == b
    assert a != c  # 40 draws from ~256 tokens: equal by chance is practically impossible
    batch = lambda: list(decode_n(model, [[1, 2], [3]], cfg))  # noqa: E731
    assert batch() == batch()


# --- sampling filters against naive implementations --------------------------------------------

def naive_softmax(row: list[float]) -> list[float]:
    finite = [x for x in row if x != -math.inf]
    top = max(finite)
    exps = [math.exp(x - top) if x != -math.inf else 0.0 for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def naive_top_k(row: list[float], k: int) -> list[float]:
    kth = sorted(row, reverse=True)[min(k, len(row)) - 1]
    return [x if x >= kth else -math.inf for x in row]


def naive_top_p(row: list[float], p: float) -> list[float]:
    probs = naive_softmax(row)
    keep, mass = set(), 0.0
    for i in sorted(range(len(row)), key=lambda i: -probs[i]):
        keep.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return [x if i in keep else -math.inf for i, x in enumerate(row)]


def naive_min_p(row: list[float], m: float) -> list[float]:
    probs = naive_softmax(row)
    return [x if probs[i] >= m * max(probs) else -math.inf for i, x in enumerate(row)]


def naive_penalty(row: list[float], seen: set[int], penalty: float) -> list[float]:
    return [(x / penalty if x > 0 else x * penalty) if i in seen else x for i, x in enumerate(row)]


def random_logits(seed: int, rows: int = 6, vocab: int = 50) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3


def masks_of(t: torch.Tensor) -> list[list[bool]]:
    return (t == -math.inf).tolist()


def naive_masks(rows: list[list[float]]) -> list[list[bool]]:
    return [[x == -math.inf for x in row] for row in rows]


@pytest.mark.parametrize("k", [1, 2, 7, 49, 50, 80])
def test_top_k_mask_matches_naive(k):
    logits = random_logits(k)
    assert masks_of(top_k_filter(logits, k)) == naive_masks([naive_top_k(r, k) for r in logits.tolist()])


@pytest.mark.parametrize("p", [0.01, 0.3, 0.75, 0.9, 0.999, 1.0])
def test_top_p_mask_matches_naive(p):
    logits = random_logits(int(p * 1000))
    assert masks_of(top_p_filter(logits, p)) == naive_masks([naive_top_p(r, p) for r in logits.tolist()])


@pytest.mark.parametrize("m", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_min_p_mask_matches_naive(m):
    logits = random_logits(int(m * 100) + 7)
    assert masks_of(min_p_filter(logits, m)) == naive_masks([naive_min_p(r, m) for r in logits.tolist()])


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.0])
def test_repetition_penalty_matches_naive(penalty):
    logits = random_logits(3)
    g = torch.Generator().manual_seed(5)
    seen = torch.rand(logits.shape, generator=g) < 0.3
    got = apply_repetition_penalty(logits, seen, penalty).tolist()
    for row, s, out in zip(logits.tolist(), seen.tolist(), got, strict=True):
        expected = naive_penalty(row, {i for i, b in enumerate(s) if b}, penalty)
        assert out == pytest.approx(expected, rel=1e-12)


def test_filters_compose_in_order_penalty_temperature_top_k_top_p_min_p():
    logits = random_logits(11).float()
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[:, ::3] = True
    cfg = GenerationConfig(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.5)
    got = process_logits(logits, cfg, seen)
    for row, s, out in zip(logits.double().tolist(), seen.tolist(), got.tolist(), strict=True):
        r = naive_penalty(row, {i for i, b in enumerate(s) if b}, 1.5)
        r = naive_min_p(naive_top_p(naive_top_k([x / 0.7 for x in r], 20), 0.8), 0.05)
        assert [x == -math.inf for x in out] == [x == -math.inf for x in r]
        assert [x for x in out if x != -math.inf] == pytest.approx([x for x in r if x != -math.inf], rel=1e-5)


@pytest.mark.parametrize(("top_k", "top_p"), [(20, 0.8), (None, 0.8), (20, None), (None, None)])
def test_sampling_candidates_are_what_process_logits_leaves(top_k, top_p):
    logits = random_logits(11).float()
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[:, ::3] = True
    cfg = GenerationConfig(temperature=0.7, top_k=top_k, top_p=top_p, min_p=0.05, repetition_penalty=1.5)
    full = process_logits(logits, cfg, seen)  # checked against the naive filters above
    values, ids = sampling_candidates(logits, cfg, seen)
    for f_row, v_row, i_row in zip(full.tolist(), values.tolist(), ids.tolist(), strict=True):
        kept = {i: x for i, x in enumerate(f_row) if x != -math.inf}
        got = {i: x for i, x in zip(i_row, v_row, strict=True) if x != -math.inf}
        assert got.keys() == kept.keys()
        assert [got[i] for i in sorted(got)] == pytest.approx([kept[i] for i in sorted(kept)], rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_candidates_without_a_penalty_come_from_the_raw_logits_alike(dtype):
    """No repetition penalty: top-k runs before the fp32 conversion and the temperature; the same survivors, the same
    tempered values (bf16 logits widened exactly) as process_logits on the fp32 logits."""
    logits = random_logits(11).to(dtype)
    cfg = GenerationConfig(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05)
    full = process_logits(logits.float(), cfg)
    values, ids = sampling_candidates(logits, cfg)
    assert values.dtype == torch.float32 and ids.shape == (logits.shape[0], 20)
    for f_row, v_row, i_row in zip(full.tolist(), values.tolist(), ids.tolist(), strict=True):
        kept = {i: x for i, x in enumerate(f_row) if x != -math.inf}
        got = {i: x for i, x in zip(i_row, v_row, strict=True) if x != -math.inf}
        assert got.keys() == kept.keys()
        assert [got[i] for i in sorted(got)] == pytest.approx([kept[i] for i in sorted(kept)], rel=1e-6)


def test_a_seed_of_any_size_makes_a_generator():
    """Any integer seeds it, modulo 2**64: the seeds torch takes give what torch gives them (negative ones as torch
    maps them), larger ones do not overflow (an API client's seed once killed the engine process)."""
    def draws(generator) -> list[float]:
        return torch.rand(4, generator=generator).tolist()

    assert draws(make_generator(5)) == draws(torch.Generator().manual_seed(5))
    assert draws(make_generator(-3)) == draws(torch.Generator().manual_seed(-3))  # torch's 2**64 - 3
    assert draws(make_generator(10**23)) == draws(torch.Generator().manual_seed(10**23 % 2**64))
    assert draws(make_generator(2**64 + 5)) == draws(make_generator(5))
    assert make_generator(None) is None


def test_draw_is_the_inverse_cdf():
    values = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.0, 0.5]]).log()  # the second row's middle one is dropped
    ids = torch.tensor([[7, 3, 9], [4, 5, 6]])
    # row 0's cumulative probabilities are 0.5, 0.8, 1.0: u picks the first that passes it
    for u, want in ((0.0, 7), (0.49, 7), (0.5, 3), (0.79, 3), (0.81, 9), (0.999, 9)):
        assert draw(values[:1], ids[:1], torch.tensor([u])).tolist() == [want]
    assert draw(values[1:], ids[1:], torch.tensor([0.5])).tolist() == [6]  # never the dropped token


def test_sampling_frequencies_follow_the_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    cfg = GenerationConfig(temperature=0.5, top_k=None, top_p=None)
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = torch.stack([sample(logits, cfg, g) for _ in range(n)]).flatten()
    freq = torch.bincount(draws, minlength=5).double() / n
    expected = naive_softmax([x / 0.5 for x in logits[0].tolist()])
    assert freq.tolist() == pytest.approx(expected, abs=0.015)


def test_greedy_sample_is_argmax_and_top_k_1_is_argmax():
    logits = random_logits(21).float()
    assert sample(logits, GenerationConfig(temperature=0.0)).tolist() == logits.argmax(-1).tolist()
    cfg = GenerationConfig(temperature=1.5, top_k=1, top_p=None)
    assert sample(logits, cfg, torch.Generator().manual_seed(1)).tolist() == logits.argmax(-1).tolist()
