"""Export / import against independent references: transformers' Llama, a naive Meta-layout forward pass
written here over the GGUF file's tensors, GGUFReader, jinja, and llama.cpp where it is installed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cogni_mamba.config import Config, GenerationConfig, ModelConfig
from cogni_mamba.export import (
    ExportError,
    export_gguf,
    export_hf,
    half_split_to_interleaved,
    import_hf,
    interleaved_to_half_split,
)
from cogni_mamba.generate import decode_n
from cogni_mamba.model import CogniMamba, apply_rotary
from cogni_mamba.tokenizer import SPECIAL_TOKENS, SimpleTokenizer, train_bpe

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

CORPUS = [f"the {w} fox number {i} jumps over the lazy dog, said {w}." for i in range(150)
          for w in ("quick", "brown", "red", "café")]




@pytest.fixture(scope="module")
def tok():
    # 300 real tokens -> a model vocabulary of 320, so 20 padding rows exist, as with GPT-2 (50257 -> 50304).
    return train_bpe(CORPUS, 300, progress=False)


def tiny_config(tok, **changes) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, hidden_dim=96,
                max_seq_len=64, rope_theta=5000.0, norm_eps=1e-6)
    return ModelConfig(**(base | changes))


def tiny_model(cfg: ModelConfig) -> CogniMamba:
    torch.manual_seed(1)
    model = CogniMamba(cfg)
    with torch.no_grad():  # norms start at 1; make them distinct so a swapped norm name would show
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def load_hf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)


# --- Hugging Face -----------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_hf_logits_equal_ours(tok, tmp_path, tie):
    cfg = tiny_config(tok, tie_embeddings=tie)
    model = tiny_model(cfg)
    export_hf(model, tok, Config(model=cfg), tmp_path / "hf")
    hf, _ = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.vocab_size == cfg.vocab_size == 320
    ids = torch.randint(0, cfg.vocab_size, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)


def test_hf_greedy_generation_equals_ours(tok, tmp_path):
    cfg = tiny_config(tok)
    model = tiny_model(cfg)
    export_hf(model, tok, Config(model=cfg), tmp_path / "hf")
    hf, _ = load_hf(tmp_path / "hf")
    greedy = GenerationConfig(temperature=0.0, max_new_tokens=24)
    for prompt in ("the quick", "said red.", "café"):
        ids = tok.encode(prompt)
        ours = [step[0] for step in decode_n(model, [ids], greedy, stop_ids=tok.chat_stop_ids)
                if step[0] is not None]
        # HF stops at generation_config.json's eos ids (<|end|>, <|endoftext|>), ours at chat_stop_ids.
        out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)[0, len(ids):].tolist()
        theirs = [t for t in out if t not in tok.chat_stop_ids and t != tok.pad_id]
        assert theirs == ours


def test_hf_tokenizer_and_chat_template(tok, tmp_path):
    cfg = tiny_config(tok)
    export_hf(tiny_model(cfg), tok, Config(model=cfg), tmp_path / "hf")
    _, ht = load_hf(tmp_path / "hf")
    assert isinstance(ht, transformers.PreTrainedTokenizerFast)
    assert len(ht) == tok.real_vocab_size < cfg.vocab_size
    for text in ("the quick brown fox", "café <|user|> ünïcödé 🦊", "<|endoftext|>said red<|end|>"):
        assert ht(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert ht.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    for t in SPECIAL_TOKENS:
        assert ht.convert_tokens_to_ids(t) == tok.special_tokens[t]
    assert (ht.eos_token_id, ht.bos_token_id, ht.pad_token_id) == (tok.eos_id, tok.bos_id, tok.pad_id)
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi fox"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    for gen in (False, True):
        text = ht.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
        assert text == tok.render_chat_text(chat, add_generation_prompt=gen)
        assert ht(text, add_special_tokens=False)["input_ids"] == tok.render_chat(chat, gen)[0]
    with pytest.raises(Exception, match="Unknown chat role"):
        ht.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)
    gen_cfg = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert sorted(gen_cfg["eos_token_id"]) == sorted(tok.chat_stop_ids)


@pytest.mark.parametrize("tie", [True, False])
def test_ours_to_hf_to_ours_identical_weights(tok, tmp_path, tie):
    cfg = tiny_config(tok, tie_embeddings=tie)
    model = tiny_model(cfg)
    export_hf(model, tok, Config(model=cfg), tmp_path / "hf")
    back, back_tok, back_cfg = import_hf(tmp_path / "hf")
    assert back_cfg.model == cfg
    assert back_tok.fingerprint == tok.fingerprint
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert (back.output.weight is back.tok_embeddings.weight) == tie


def test_import_of_a_transformers_llama(tok, tmp_path):
    """A Llama built and saved by transformers itself (its own config format) imports with equal logits."""
    tok.save(tmp_path / "hf")
    hf_cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=80,
                                      num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
                                      max_position_embeddings=96, rms_norm_eps=1e-5, rope_theta=20000.0,
                                      tie_word_embeddings=False)
    torch.manual_seed(2)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "hf")
    model, _, cfg = import_hf(tmp_path / "hf")
    assert (cfg.model.dim, cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.ffn_dim) == (48, 6, 3, 80)
    ids = torch.randint(0, tok.real_vocab_size, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("change", "needle"), [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mistral"}, "'mistral'"),
    ({"head_dim": 8}, "head_dim"),
])
def test_import_rejects_incompatible_configs(tok, tmp_path, change, needle):
    cfg = tiny_config(tok)
    export_hf(tiny_model(cfg), tok, Config(model=cfg), tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.raises(ExportError, match=needle) as e:
        import_hf(tmp_path / "hf")
    assert str(e.value).count(". ") == 0  # one sentence


def test_import_rejects_bad_folders(tok, tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(ExportError, match="not a folder"):
        import_hf(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        import_hf(tmp_path / "empty")
    cfg = tiny_config(tok)
    export_hf(tiny_model(cfg), tok, Config(model=cfg), tmp_path / "hf")
    weights_path = str(tmp_path / "hf" / "model.safetensors")
    weights = load_file(weights_path)
    save_file(weights | {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, weights_path)
    with pytest.raises(ExportError, match="q_proj.bias"):
        import_hf(tmp_path / "hf")
    del weights["model.norm.weight"]
    save_file(weights, weights_path)
    with pytest.raises(ExportError, match="lacks tensor model.norm.weight"):
        import_hf(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="no model.safetensors"):
        import_hf(tmp_path / "hf")


def test_export_refuses_to_overwrite_and_needs_a_tokenizer(tok, tmp_path):
    cfg = tiny_config(tok)
    model = tiny_model(cfg)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="already exists"):
        export_hf(model, tok, Config(model=cfg), tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").is_file()
    with pytest.raises(ExportError, match="no tokenizer"):
        export_gguf(model, None, Config(model=cfg), tmp_path / "m.gguf")
    with pytest.raises(ExportError, match="q4"):
        export_gguf(model, tok, Config(model=cfg), tmp_path / "m.gguf", dtype="q4")
    with pytest.raises(ExportError, match="no BPE merges"):
        simple_cfg = tiny_config(SimpleTokenizer())
        export_gguf(tiny_model(simple_cfg), SimpleTokenizer(), Config(model=simple_cfg), tmp_path / "m.gguf")
    assert not any(p.name.endswith(".gguf") or p.name.startswith(".") for p in tmp_path.iterdir())


# --- rotary layouts -----------------------------------------------------------------------------------

def rope_interleaved(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's original rotary embedding: adjacent pairs (2i, 2i+1) as complex numbers, x: (T, H, D)."""
    T, _, D = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), freqs)  # (T, D/2)
    rot = torch.polar(torch.ones_like(angles), angles)[:, None, :]  # (T, 1, D/2)
    xc = torch.view_as_complex(x.double().reshape(T, x.shape[1], D // 2, 2).contiguous())
    return torch.view_as_real(xc * rot).reshape(x.shape).float()


def test_rope_permutation_maps_half_split_to_meta_layout():
    """Permuting wq rows then rotating Meta-style equals rotating HF-style then permuting the output."""
    H, D, dim, T, theta = 3, 8, 12, 5, 500.0
    w = torch.randn(H * D, dim)
    x = torch.randn(T, dim)
    half = (x @ w.T).view(T, H, D).transpose(0, 1)  # (H, T, D)
    t = torch.arange(T, dtype=torch.float32)
    freqs = torch.outer(t, 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    emb = torch.cat([freqs, freqs], dim=-1)
    ours = apply_rotary(half[None], emb.cos(), emb.sin())[0].transpose(0, 1)  # (T, H, D) half-split layout
    meta = rope_interleaved((x @ half_split_to_interleaved(w, H).T).view(T, H, D), theta)
    # The same rotated vector, in the other layout: row 2i+s of a head in Meta's is s*D/2+i in ours.
    idx = torch.tensor([s * D // 2 + i for i in range(D // 2) for s in range(2)])
    torch.testing.assert_close(meta, ours[..., idx], atol=1e-5, rtol=0)
    assert torch.equal(interleaved_to_half_split(half_split_to_interleaved(w, H), H), w)


# --- GGUF -------------------------------------------------------------------------------------------

def read_gguf(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = (torch.from_numpy(np.array(values, dtype=np.float32)).reshape(
            tuple(int(n) for n in reversed(t.shape))), t.tensor_type.name)
    return fields, tensors


def expected_gguf_names(cfg: ModelConfig) -> set[str]:
    per_layer = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm",
                 "ffn_norm"]
    names = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}.weight" for i in range(cfg.n_layers)
                                                           for n in per_layer}
    return names if cfg.tie_embeddings else names | {"output.weight"}


@pytest.mark.parametrize(("dtype", "file_type", "matrix_type"), [("f32", 0, "F32"), ("f16", 1, "F16"),
                                                                  ("q8_0", 7, "Q8_0")])
def test_gguf_metadata_and_tensors(tok, tmp_path, dtype, file_type, matrix_type):
    cfg = tiny_config(tok)
    model = tiny_model(cfg)
    export_gguf(model, tok, Config(model=cfg), tmp_path / "m.gguf", dtype=dtype)
    fields, tensors = read_gguf(tmp_path / "m.gguf")
    expected = {
        "general.architecture": "llama", "general.file_type": file_type, "llama.context_length": 64,
        "llama.embedding_length": 64, "llama.block_count": 2, "llama.feed_forward_length": 96,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": tok.bos_id,
        "tokenizer.ggml.eos_token_id": tok.eos_id, "tokenizer.ggml.padding_token_id": tok.pad_id,
        "tokenizer.ggml.eot_token_id": tok.end_id,
    }
    assert {k: fields[k] for k in expected} == expected
    assert fields["llama.rope.freq_base"] == pytest.approx(5000.0)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    # Vocabulary: tokenizer.json's vocab (byte-level strings) by id, then one unused entry per padding row.
    spec = json.loads(tok.to_hf().to_str())
    by_id = {i: t for t, i in spec["model"]["vocab"].items()} | {a["id"]: a["content"] for a in spec["added_tokens"]}
    assert fields["tokenizer.ggml.tokens"] == [by_id.get(i, f"[PAD{i}]") for i in range(320)]
    types = fields["tokenizer.ggml.token_type"]
    assert [types[tok.special_tokens[t]] for t in SPECIAL_TOKENS] == [3] * len(SPECIAL_TOKENS)  # CONTROL
    assert types[300:] == [5] * 20 and set(types[6:300]) == {1}  # UNUSED padding, NORMAL tokens
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert fields["tokenizer.ggml.merges"] == merges and len(merges) == 300 - 262
    # Tensors: llama.cpp names, (out, in) shapes, types; values equal ours once wq/wk are permuted back.
    assert set(tensors) == expected_gguf_names(cfg)
    state = model.state_dict()
    for i in range(cfg.n_layers):
        for ours, theirs, heads in (("attention.wq", "attn_q", 4), ("attention.wk", "attn_k", 2),
                                    ("feed_forward.w2", "ffn_down", None), ("ffn_norm", "ffn_norm", None)):
            got, qtype = tensors[f"blk.{i}.{theirs}.weight"]
            want = state[f"layers.{i}.{ours}.weight"]
            if heads:
                got = interleaved_to_half_split(got, heads)
            assert qtype == ("F32" if want.dim() == 1 else matrix_type)
            # f16: relative 2^-11; q8_0: half a step of the block scale (<= max |w| / 127) plus its f16 rounding.
            tol = {"f32": 0.0, "f16": want.abs().max() * 2**-10, "q8_0": want.abs().max() / 127 * 0.6}[dtype]
            assert (got - want).abs().max() <= tol + 1e-7
    emb, _ = tensors["token_embd.weight"]
    assert emb.shape == (320, 64)


def meta_llama_logits(tensors: dict, cfg: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    """A naive Llama forward in Meta's layout (interleaved complex rope), reading only GGUF tensors."""
    w = {k: v for k, (v, _) in tensors.items()}
    T, H, Hkv, D = len(ids), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def rms(x, weight):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * weight

    x = w["token_embd.weight"][ids]  # (T, dim)
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        h = rms(x, w[p + "attn_norm.weight"])
        q = rope_interleaved((h @ w[p + "attn_q.weight"].T).view(T, H, D), cfg.rope_theta)
        k = rope_interleaved((h @ w[p + "attn_k.weight"].T).view(T, Hkv, D), cfg.rope_theta)
        v = (h @ w[p + "attn_v.weight"].T).view(T, Hkv, D)
        out = torch.empty(T, H, D)
        for head in range(H):
            kv = head // (H // Hkv)
            scores = q[:, head] @ k[:, kv].T / math.sqrt(D)
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            out[:, head] = scores.softmax(-1) @ v[:, kv]
        x = x + out.reshape(T, H * D) @ w[p + "attn_output.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        gate = h @ w[p + "ffn_gate.weight"].T
        x = x + (gate * torch.sigmoid(gate) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])
    return rms(x, w["output_norm.weight"]) @ head.T


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_tensors_compute_our_logits_in_meta_layout(tok, tmp_path, tie):
    """What llama.cpp computes (interleaved rope) from the file's f32 tensors equals our logits."""
    cfg = tiny_config(tok, tie_embeddings=tie)
    model = tiny_model(cfg)
    export_gguf(model, tok, Config(model=cfg), tmp_path / "m.gguf", dtype="f32")
    _, tensors = read_gguf(tmp_path / "m.gguf")
    assert set(tensors) == expected_gguf_names(cfg)
    ids = torch.randint(0, cfg.vocab_size, (30,))
    with torch.no_grad():
        torch.testing.assert_close(meta_llama_logits(tensors, cfg, ids), model(ids[None])[0], atol=1e-4, rtol=0)


def test_llama_cpp_greedy_tokens_equal_ours(tok, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles "
                                    "llama.cpp, ~6 min; .ci/run builds it); the GGUF file is still checked "
                                    "through GGUFReader")
    cfg = tiny_config(tok)
    model = tiny_model(cfg)
    export_gguf(model, tok, Config(model=cfg), tmp_path / "m.gguf", dtype="f32")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, verbose=False, seed=0)
    greedy = GenerationConfig(temperature=0.0, max_new_tokens=16)
    for prompt in ("the quick", "said red.", "café"):
        ids = tok.encode(prompt)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        ours = [s[0] for s in decode_n(model, [ids], greedy) if s[0] is not None]
        llm.reset()
        theirs = []
        for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            theirs.append(t)
            if len(theirs) == len(ours):
                break
        assert theirs == ours


# --- GPT-2's tokenizer and the command line ------------------------------------------------------------

def test_hf_export_with_gpt2_tokenizer(shared_data, tmp_path):
    from cogni_mamba.tokenizer import load_tokenizer

    gpt2 = load_tokenizer(shared_data / "gpt2")
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=gpt2.vocab_size, hidden_dim=64,
                      max_seq_len=32)
    export_hf(tiny_model(cfg), gpt2, Config(model=cfg), tmp_path / "hf")
    hf, ht = load_hf(tmp_path / "hf")
    assert (hf.config.vocab_size, len(ht), gpt2.vocab_size) == (50304, 50262, 50304)
    text = " Hello world's café 🦊<|endoftext|><|user|>hi<|end|>"
    assert ht(text, add_special_tokens=False)["input_ids"] == gpt2.encode(text)
    assert ht.convert_tokens_to_ids("<|endoftext|>") == 50256


def test_cli_export_then_import_gives_the_same_checkpoint(tok, tmp_path, capsys):
    from cogni_mamba.cli import main
    from cogni_mamba.train.checkpoint import load_checkpoint_full, save_checkpoint

    cfg = tiny_config(tok)
    model = tiny_model(cfg)
    ckpt = save_checkpoint(tmp_path, "ckpt", model, Config(model=cfg), tokenizer=tok)
    assert main(["export", "--checkpoint", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, back_tok, back_cfg = load_checkpoint_full(tmp_path / "back")
    assert back_cfg.model == cfg and back_tok.fingerprint == tok.fingerprint
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert main(["export", "--checkpoint", str(ckpt), "--format", "gguf", "--dtype", "q8_0",
                 "--out", str(tmp_path / "m.gguf")]) == 0
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["general.file_type"].contents() == 7
    capsys.readouterr()
    # Mistakes: an existing --out, an unknown dtype, an incompatible HF folder -> one sentence, exit 2.
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"attention_bias": True}))
    for argv, needle in (
        (["export", "--checkpoint", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")], "already exists"),
        (["export", "--checkpoint", str(ckpt), "--format", "hf", "--dtype", "int4", "--out", str(tmp_path / "x")],
         "Unknown dtype 'int4'"),
        (["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "again")], "attention_bias = true"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err, err
    assert not (tmp_path / "again").exists() and not (tmp_path / "x").exists()


def test_import_grows_the_vocabulary_for_our_special_tokens(shared_data, tmp_path):
    """A GPT-2-vocabulary Llama (50,257 rows) gains our 5 extra specials: rows up to 50,304, new ones at the mean."""
    from cogni_mamba.tokenizer.loading import gpt2_hf_from_files

    (tmp_path / "hf").mkdir()
    gpt2_hf_from_files(shared_data / "gpt2" / "vocab.json", shared_data / "gpt2" / "merges.txt").save(
        str(tmp_path / "hf" / "tokenizer.json"))
    hf_cfg = transformers.LlamaConfig(vocab_size=50257, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    model, tok, cfg = import_hf(tmp_path / "hf")
    assert cfg.model.vocab_size == tok.vocab_size == 50304 and tok.special_tokens["<|end|>"] == 50261
    emb, theirs = model.tok_embeddings.weight, hf.model.embed_tokens.weight
    assert torch.equal(emb[:50257], theirs)
    torch.testing.assert_close(emb[50257:], theirs.mean(0).expand(47, -1))
    ids = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[..., :50257], hf(ids).logits, atol=1e-4, rtol=0)
