"""GGUF export: the file read back with gguf.GGUFReader holds the llama metadata, the tokenizer and
every tensor (q/k permuted for llama.cpp's RoPE, recoverable exactly); and, where llama-cpp-python
is installed (`make llama-cpp`), llama.cpp tokenizes and continues text exactly as Kimbho does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import kimbho
from kimbho.config import KimbhoConfig
from kimbho.errors import KimbhoError
from kimbho.inference.chat import ChatFormat
from kimbho.interop.gguf import _FUSED, _RENAMES, export_gguf, interleave_rope
from kimbho.interop.keymap import expand_layers
from kimbho.model.transformer import apply_rope, rope_tables
from tests.conftest import TRICKY, run_cli

gguf = pytest.importorskip("gguf")


def _read(path: Path) -> tuple[dict[str, object], dict[str, tuple[torch.Tensor, str]]]:
    """(metadata, {name: (tensor as fp32 in PyTorch's shape, GGML type name)})."""
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = (torch.from_numpy(np.array(data, dtype=np.float32)), t.tensor_type.name)
    return fields, tensors


def deinterleave_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `interleave_rope`: rows back from interleaved pairs to rotate-half."""
    out_dim, in_dim = weight.shape
    half = out_dim // heads // 2
    return weight.reshape(heads, half, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def from_gguf(tensors: dict[str, torch.Tensor], config: KimbhoConfig) -> dict[str, torch.Tensor]:
    """GGUF tensors (as the export names them) -> Kimbho state dict, undoing the q/k permutation:
    the export's key map read backwards, to show that it loses nothing."""
    tensors = dict(tensors)
    for i in range(config.num_blocks):
        tensors[f"blk.{i}.attn_q.weight"] = deinterleave_rope(
            tensors[f"blk.{i}.attn_q.weight"], config.num_heads
        )
        tensors[f"blk.{i}.attn_k.weight"] = deinterleave_rope(
            tensors[f"blk.{i}.attn_k.weight"], config.num_kv_heads
        )
    state = {name: tensors[g] for name, g in expand_layers(_RENAMES, config) if g in tensors}
    for name, gguf_names in expand_layers(_FUSED, config):
        state[name] = torch.cat([tensors[g] for g in gguf_names], dim=0)
    if config.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    return state


def _gqa_model(tie: bool, vocab_size: int) -> kimbho.KimbhoV1Model:
    torch.manual_seed(2)
    cfg = KimbhoConfig.from_preset("tiny", vocab_size=vocab_size, rope_base=31337.0, tie_embeddings=tie)
    return kimbho.KimbhoV1Model(cfg).eval()


def test_interleaved_rope_of_permuted_rows_is_rotate_half_rope() -> None:
    """What llama.cpp computes on the exported q/k rows (pairs 2j, 2j+1) equals Kimbho's
    rotate-half rotation (pairs j, j + head_dim/2) of the original rows, permuted alike."""
    heads, head_dim, positions, base = 3, 16, 12, 31337.0
    torch.manual_seed(0)
    weight, x = torch.randn(heads * head_dim, 24), torch.randn(positions, 24)
    cos, sin = rope_tables(head_dim, positions, base)
    ours = apply_rope((x @ weight.T).view(positions, heads, head_dim).transpose(0, 1), cos, sin)
    permuted = (x @ interleave_rope(weight, heads).T).view(positions, heads, head_dim // 2, 2)
    theta = torch.arange(positions)[:, None] * base ** (-torch.arange(0, head_dim, 2) / head_dim)
    c, s = theta.cos()[:, None], theta.sin()[:, None]  # (T, 1, hd/2)
    a, b = permuted[..., 0], permuted[..., 1]
    theirs = torch.stack([a * c - b * s, a * s + b * c], dim=-1).reshape(positions, heads, head_dim)
    expected = interleave_rope(ours.transpose(0, 1).reshape(positions, -1).T, heads).T
    torch.testing.assert_close(theirs.reshape(positions, -1), expected)
    assert torch.equal(deinterleave_rope(interleave_rope(weight, heads), heads), weight)


@pytest.mark.parametrize("tie", [False, True])
def test_f32_file_holds_metadata_tokenizer_and_exact_weights(
    tie: bool, tokenizer: kimbho.Tokenizer, tmp_path: Path
) -> None:
    model = _gqa_model(tie, tokenizer.vocab_size)
    cfg = model.config
    export_gguf(model, tokenizer, tmp_path / "m.gguf")
    fields, tensors = _read(tmp_path / "m.gguf")
    expected = {
        "general.architecture": "llama",
        "general.file_type": gguf.LlamaFileType.ALL_F32,
        "llama.vocab_size": cfg.vocab_size,
        "llama.context_length": cfg.max_seq_len,
        "llama.embedding_length": cfg.emb_dim,
        "llama.block_count": cfg.num_blocks,
        "llama.feed_forward_length": cfg.mlp_hidden,
        "llama.attention.head_count": cfg.num_heads,
        "llama.attention.head_count_kv": cfg.num_kv_heads,
        "llama.rope.dimension_count": cfg.head_dim,
        "llama.rope.freq_base": cfg.rope_base,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tokenizer.eot_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eot_id,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_id,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
    }
    assert {k: fields[k] for k in expected} == expected
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)

    spec = json.loads(tokenizer.to_json())
    assert fields["tokenizer.ggml.tokens"] == [tokenizer.inner.id_to_token(i) for i in range(cfg.vocab_size)]
    special = {tokenizer.token_to_id(t) for t in tokenizer.special_tokens}
    types = fields["tokenizer.ggml.token_type"]
    assert {i for i, kind in enumerate(types) if kind == gguf.TokenType.CONTROL} == special
    assert all(types[i] == gguf.TokenType.NORMAL for i in range(cfg.vocab_size) if i not in special)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert fields["tokenizer.ggml.merges"] == merges

    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tie else set())
    for i in range(cfg.num_blocks):
        names |= {
            f"blk.{i}.{n}.weight"
            for n in (
                "attn_norm",
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            )
        }
    assert set(tensors) == names
    assert all(kind == "F32" for _, kind in tensors.values())
    kv = cfg.num_kv_heads * cfg.head_dim
    assert tensors["blk.0.attn_k.weight"][0].shape == (kv, cfg.emb_dim)
    assert tensors["blk.0.ffn_gate.weight"][0].shape == (cfg.mlp_hidden, cfg.emb_dim)
    q = model.blocks[0].attn.qkv.weight[: cfg.emb_dim]
    assert not torch.equal(tensors["blk.0.attn_q.weight"][0], q)  # permuted in the file...
    state = from_gguf({n: t for n, (t, _) in tensors.items()}, cfg)
    for name, tensor in model.state_dict().items():  # ...and recovered exactly
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize(
    ("dtype", "matrix_type", "tolerance"), [("f16", "F16", 1e-3), ("q8_0", "Q8_0", 1e-2)]
)
def test_smaller_dtypes(
    dtype: str, matrix_type: str, tolerance: float, tokenizer: kimbho.Tokenizer, tmp_path: Path
) -> None:
    model = _gqa_model(False, tokenizer.vocab_size)
    assert (
        run_cli("export", "gguf", _source(model, tokenizer, tmp_path), tmp_path / "m.gguf", "--dtype", dtype)
        == 0
    )
    fields, tensors = _read(tmp_path / "m.gguf")
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    assert fields["general.file_type"] == file_types[dtype]
    for name, (tensor, kind) in tensors.items():
        assert kind == ("F32" if tensor.dim() == 1 else matrix_type), name  # norm gains stay f32
    state = from_gguf({n: t for n, (t, _) in tensors.items()}, model.config)
    for name, tensor in model.state_dict().items():
        scale = tensor.abs().max().item()
        assert (state[name] - tensor).abs().max().item() <= tolerance * scale, name


def _source(model: kimbho.KimbhoV1Model, tokenizer: kimbho.Tokenizer, tmp_path: Path) -> Path:
    from kimbho.interop.hf import export_hf

    return export_hf(model, tokenizer, tmp_path / "source")


def test_tokenizer_that_is_not_byte_level_bpe_is_refused(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    inner = HFTokenizer(models.BPE(unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    inner.train_from_iterator(
        ["some words to learn from"] * 10, trainers.BpeTrainer(special_tokens=["[UNK]"])
    )
    tokenizer = kimbho.Tokenizer(inner)
    model = _gqa_model(False, max(tokenizer.vocab_size, 64))
    with pytest.raises(KimbhoError, match="needs a byte-level BPE tokenizer.*pre_tokenizer Whitespace"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_needs_force(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    assert run_cli("export", "gguf", trained_run, out) == 1
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"mine"
    assert run_cli("export", "gguf", trained_run, out, "--force") == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# --- llama.cpp itself ------------------------------------------------------------------------------


@pytest.mark.slow
def test_llama_cpp_tokenizes_and_continues_like_kimbho(trained_run: Path, tmp_path: Path) -> None:
    """llama.cpp loads the f32 file, splits text to the same ids and continues greedily with the
    same 32 tokens. Runs where `llama_cpp` is importable (`make llama-cpp` installs it)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tokenizer = kimbho.load(trained_run)
    assert run_cli("export", "gguf", trained_run, tmp_path / "m.gguf") == 0
    llm = llama_cpp.Llama(
        str(tmp_path / "m.gguf"),
        n_ctx=model.config.max_seq_len,
        n_threads=2,
        logits_all=True,
        verbose=False,
        # An fp32 key/value cache (llama.cpp's default is f16), so fp32 logits can be compared tightly.
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )
    from pydoc_data.topics import topics

    corpus = "\n".join(topics.values())[:50_000]  # real prose and code
    for text in [*TRICKY, " \n\n  \u2028 end\u00a0", corpus]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text[:80]
        ids = tokenizer.encode(text)
        assert llm.detokenize(ids).decode() == text
    report = llama_cpp_parity(llm, model, tokenizer, "The assert statement is", 32)
    assert report["greedy_match"] == 32, report
    assert report["max_logit_diff"] < 1e-4, report
    # llama.cpp's chat completion formats with the file's template, as Kimbho prompts.
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    assert llm.chat_format == "chat_template.default"
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], "<|endoftext|>", "<|endoftext|>")
    messages = [{"role": "user", "content": "What does assert do?"}, {"role": "assistant", "content": " It checks."},
                {"role": "user", "content": "And del?"}]  # fmt: skip
    prompt = formatter(messages=messages).prompt
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ChatFormat(tokenizer).encode(
        messages
    )


def test_the_file_carries_the_models_chat_template(trained_run: Path, tmp_path: Path) -> None:
    _, tokenizer = kimbho.load(trained_run)
    assert run_cli("export", "gguf", trained_run, tmp_path / "m.gguf") == 0
    fields, _ = _read(tmp_path / "m.gguf")
    assert fields["tokenizer.chat_template"] == ChatFormat(tokenizer).jinja


def llama_cpp_parity(
    llm: object, model: kimbho.KimbhoV1Model, tokenizer: kimbho.Tokenizer, prompt: str, new_tokens: int
) -> dict[str, float | int]:
    """Greedy continuation by llama.cpp and by Kimbho: how many leading tokens agree, and the
    largest logit difference over the prompt and llama.cpp's continuation."""
    ids = tokenizer.encode(prompt)
    ours = kimbho.generate(model, torch.tensor([ids]), max_new_tokens=new_tokens, temperature=0.0)[
        0, len(ids) :
    ]
    llm.reset()  # type: ignore[attr-defined]
    llm.eval(ids)  # type: ignore[attr-defined]
    theirs: list[int] = []
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))  # type: ignore[attr-defined]
        theirs.append(token)
        llm.eval([token])  # type: ignore[attr-defined]
    match = next(
        (i for i, (a, b) in enumerate(zip(ours.tolist(), theirs, strict=True)) if a != b), new_tokens
    )
    with torch.no_grad():
        expected = model(torch.tensor([ids + theirs[:-1]]))[0].numpy()
    got = np.asarray(llm.scores[: len(ids) + new_tokens - 1])  # type: ignore[attr-defined]
    return {"greedy_match": match, "max_logit_diff": float(np.abs(got - expected).max())}
