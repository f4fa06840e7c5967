"""Hugging Face directories both ways: `kimbho export hf` loads in transformers with the same
logits, greedy tokens and token ids; a transformers-made Llama directory loads everywhere Kimbho
takes MODEL; bad input is one clear line and leaves nothing behind."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import kimbho
from kimbho.config import KimbhoConfig
from kimbho.errors import KimbhoError
from kimbho.interop import hf as hf_interop
from kimbho.interop.hf import export_hf
from tests.conftest import TRICKY, run_cli, tiny_run_config

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach the network: transformers must load from the directory alone."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "model"
    assert run_cli("export", "hf", trained_run, out) == 0
    return out


def _gqa_model(tie: bool, vocab_size: int) -> kimbho.KimbhoV1Model:
    """Random weights, 2 query heads per K/V head and a non-default RoPE base."""
    torch.manual_seed(1)
    cfg = KimbhoConfig.from_preset("tiny", vocab_size=vocab_size, rope_base=31337.0, tie_embeddings=tie)
    assert cfg.group_size > 1
    return kimbho.KimbhoV1Model(cfg).eval()


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_exported_directory_has_every_file_and_config_field(exported: Path, trained_run: Path) -> None:
    assert sorted(p.name for p in exported.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    model, tokenizer = kimbho.load(trained_run)
    cfg = model.config
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    expected = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.emb_dim,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.num_blocks,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": tokenizer.eot_id,
        "pad_token_id": tokenizer.pad_id,
    }
    assert {k: config[k] for k in expected} == expected
    loaded = transformers.AutoConfig.from_pretrained(exported)
    assert loaded.rope_parameters["rope_theta"] == cfg.rope_base
    assert loaded.num_key_value_heads == cfg.num_kv_heads < loaded.num_attention_heads


def test_transformers_gives_the_same_logits_and_greedy_tokens(exported: Path, trained_run: Path) -> None:
    model, tokenizer = kimbho.load(trained_run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert hf.dtype == torch.float32
    ids = torch.tensor([tokenizer.encode("The assert statement is a convenient way")])
    batch = torch.randint(0, model.config.vocab_size, (2, model.config.max_seq_len))
    with torch.no_grad():
        for x in (ids, batch):
            diff = (hf(x).logits - model(x)).abs().max().item()
            assert diff <= 1e-4, diff
        hf.generation_config.eos_token_id = None  # compare 32 tokens, even past an end-of-text
        theirs = hf.generate(ids, max_new_tokens=32, do_sample=False)
    ours = kimbho.generate(model, ids, max_new_tokens=32, temperature=0.0)
    assert theirs.shape == (1, ids.shape[1] + 32)
    assert theirs.tolist() == ours.tolist()


def test_auto_tokenizer_encodes_and_decodes_exactly_as_kimbho(exported: Path, trained_run: Path) -> None:
    _, tokenizer = kimbho.load(trained_run)
    auto = transformers.AutoTokenizer.from_pretrained(exported)
    for text in TRICKY:
        ids = tokenizer.encode(text)
        # Kimbho never turns special-token text in a string into a special id; transformers
        # does (a chat template's role markers are such text) unless asked not to.
        assert auto(text, split_special_tokens=True)["input_ids"] == ids, text
        if "<|" not in text:
            assert auto.encode(text) == ids, text
        assert auto.decode(ids) == tokenizer.decode(ids) == text
    assert auto.encode("<|endoftext|>") == [tokenizer.eot_id]
    assert (auto.eos_token_id, auto.bos_token_id, auto.pad_token_id) == (
        tokenizer.eot_id,
        tokenizer.eot_id,
        tokenizer.pad_id,
    )


CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What does  assert do?\n"},
    {"role": "assistant", "content": " It checks a condition."},
    {"role": "user", "content": "And del?"},
]


def test_apply_chat_template_gives_the_ids_kimbho_prompts_with(exported: Path, trained_run: Path) -> None:
    from kimbho.inference.chat import ChatFormat

    _, tokenizer = kimbho.load(trained_run)
    auto = transformers.AutoTokenizer.from_pretrained(exported)
    for messages in (CONVERSATION, CONVERSATION[1:2]):
        ids = auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(ids) == ChatFormat(tokenizer).encode(messages)
    with pytest.raises(Exception, match="role tool is not one of"):
        auto.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


@pytest.mark.parametrize("tie", [False, True])
def test_gqa_model_round_trips_weight_identical(
    tie: bool, tokenizer: kimbho.Tokenizer, tmp_path: Path
) -> None:
    model = _gqa_model(tie, tokenizer.vocab_size)
    export_hf(model, tokenizer, tmp_path / "hf")
    if tie:
        assert "lm_head.weight" not in _tensor_names(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, tokenizer.vocab_size, (2, 40))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4
    back, back_tokenizer = kimbho.load(tmp_path / "hf")
    assert back.config == model.config
    _state_equal(back, model)
    assert back_tokenizer.sha256 == tokenizer.sha256
    if tie:
        assert back.head.weight is back.embed.weight


def test_sharded_export_loads_in_transformers_and_kimbho(tokenizer: kimbho.Tokenizer, tmp_path: Path) -> None:
    model = _gqa_model(False, tokenizer.vocab_size)
    out = tmp_path / "sharded"
    assert (
        run_cli(
            "export", "hf", _save_as_hf_source(model, tokenizer, tmp_path), out, "--max-shard-size", "100KB"
        )
        == 0
    )
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    for shard in shards:  # a shard is only over the limit when one tensor alone is
        names = [n for n, f in index["weight_map"].items() if f == shard]
        assert (out / shard).stat().st_size <= 100_000 + 2_000 or len(names) == 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, tokenizer.vocab_size, (1, 30))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4
    back, _ = kimbho.load(out)
    _state_equal(back, model)


def _save_as_hf_source(model: kimbho.KimbhoV1Model, tokenizer: kimbho.Tokenizer, tmp_path: Path) -> Path:
    """An unsharded HF directory of `model`, to feed `kimbho export hf` a MODEL path."""
    path = tmp_path / "source"
    export_hf(model, tokenizer, path)
    return path


def _tensor_names(path: Path) -> set[str]:
    return set(hf_interop.read_weights(path))


def _transformers_llama_dir(
    tokenizer: kimbho.Tokenizer, path: Path, dtype: torch.dtype = torch.float32, **save: object
) -> transformers.PreTrainedModel:
    """A directory made by transformers itself (not by Kimbho), with Kimbho's tokenizer.json."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=80,
        rope_theta=5000.0,
        pad_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(config).to(dtype).eval()
    hf.save_pretrained(path, **save)
    tokenizer.save(path / "tokenizer.json")
    return hf


@pytest.mark.parametrize("sharded", [False, True])
def test_transformers_llama_directory_loads_with_the_same_logits(
    sharded: bool, tokenizer: kimbho.Tokenizer, tmp_path: Path
) -> None:
    hf = _transformers_llama_dir(tokenizer, tmp_path, **({"max_shard_size": "100KB"} if sharded else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    model, loaded_tokenizer = kimbho.load(tmp_path)
    assert (model.config.group_size, model.config.rope_base, model.config.max_seq_len) == (4, 5000.0, 80)
    assert loaded_tokenizer.sha256 == tokenizer.sha256
    ids = torch.randint(0, tokenizer.vocab_size, (2, 80))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def test_bf16_directory_loads_in_the_precision_asked_for(tokenizer: kimbho.Tokenizer, tmp_path: Path) -> None:
    """--dtype fp32 widens the stored bf16 exactly; auto keeps bf16 where this CPU runs it natively."""
    from kimbho.device import fast_bf16

    hf = _transformers_llama_dir(tokenizer, tmp_path, dtype=torch.bfloat16)
    model, _ = kimbho.load(tmp_path, dtype="fp32")
    assert model.embed.weight.dtype == torch.float32
    assert torch.equal(model.embed.weight, hf.model.embed_tokens.weight.float())
    auto, _ = kimbho.load(tmp_path)
    native = fast_bf16(torch.device("cpu"))
    assert auto.embed.weight.dtype == (torch.bfloat16 if native else torch.float32)
    assert torch.equal(auto.embed.weight.float(), model.embed.weight)


def test_every_model_command_takes_a_transformers_directory(
    tokenizer: kimbho.Tokenizer, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _transformers_llama_dir(tokenizer, tmp_path / "llama")
    assert (
        run_cli("generate", tmp_path / "llama", "--prompt", "The", "--max-new-tokens", 5, "--temperature", 0)
        == 0
    )
    assert capsys.readouterr().out.startswith("The")
    assert run_cli("eval", tmp_path / "llama", "--data", data_dir, "--max-tokens", 512) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] > 0 and math.isfinite(result["loss"])
    assert run_cli("export", "gguf", tmp_path / "llama", tmp_path / "llama.gguf") == 0
    assert (tmp_path / "llama.gguf").stat().st_size > 0


def test_continue_training_an_imported_model(exported: Path, data_dir: Path, tmp_path: Path) -> None:
    """`kimbho train --init MODEL`: the run starts from MODEL's weights and config, so its first
    loss is the trained model's, far below a fresh model's ln(vocab)."""
    imported, _ = kimbho.load(exported)
    run = tiny_run_config(max_steps=3, log_every=1, eval_every=0, save_every=0, warmup_steps=1)
    run.model = KimbhoConfig.from_preset("seed")  # replaced by the imported model's config
    trainer = kimbho.Trainer(run, data_dir, tmp_path / "run", init_from=exported, progress_bar=False)
    assert trainer.run.model == imported.config
    _state_equal(trainer.model, imported)
    loss, _ = trainer.train_step(0)
    assert loss < math.log(imported.config.vocab_size) - 1.0

    # From the command line, then continued with --resume (which needs the same --init).
    args = ["train", "--init", exported, "--data", data_dir, "--out", tmp_path / "cli", "train.batch_size=4"]
    args += ["train.seq_len=32", "train.warmup_steps=1", "train.eval_tokens=512", "train.sample_tokens=0"]
    assert run_cli(*args, "--max-steps", 2) == 0
    assert run_cli(*args, "--max-steps", 3, "--resume") == 0
    continued, _ = kimbho.load(tmp_path / "cli")
    assert continued.config == imported.config
    checkpoints = sorted(p.name for p in (tmp_path / "cli" / "checkpoints").iterdir())
    assert checkpoints == ["best", "step-00000002", "step-00000003"]
    assert run_cli(*args, "--preset", "tiny") == 1


def test_init_refuses_data_made_with_another_tokenizer(exported: Path, tmp_path: Path) -> None:
    text = tmp_path / "other.txt"
    text.write_text("A different corpus gives a different tokenizer. " * 200)
    kimbho.prepare([str(text)], tmp_path / "other", vocab_size=300, val_fraction=0)
    with pytest.raises(KimbhoError, match="prepared with a different tokenizer"):
        kimbho.Trainer(tiny_run_config(), tmp_path / "other", tmp_path / "run", init_from=exported)
    with pytest.raises(KimbhoError, match="drop model.emb_dim"):
        kimbho.Trainer(
            tiny_run_config(),
            tmp_path / "other",
            tmp_path / "run",
            init_from=exported,
            explicit_keys={"model.emb_dim"},
        )


# --- bad input: one clear line, nothing half-written -----------------------------------------------


def _error_line(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    assert run_cli(*args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kimbho: error: "), err
    return err


def test_not_a_model_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert "is not a model" in _error_line(capsys, "generate", tmp_path / "empty", "--prompt", "x")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"hello": 1}')
    assert "neither a Kimbho checkpoint nor a Hugging Face model" in _error_line(
        capsys, "export", "hf", tmp_path / "odd", tmp_path / "out"
    )
    assert not (tmp_path / "out").exists()


def test_non_llama_architecture_is_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    err = _error_line(capsys, "eval", tmp_path, "--data", tmp_path)
    assert "architecture GPT2LMHeadModel is not supported" in err


def test_missing_files_are_named(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer: kimbho.Tokenizer
) -> None:
    import shutil

    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(exported, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    assert "has no tokenizer.json" in _error_line(capsys, "generate", no_tokenizer, "--prompt", "x")

    no_weights = tmp_path / "no_weights"
    shutil.copytree(exported, no_weights)
    (no_weights / "model.safetensors").rename(no_weights / "pytorch_model.bin")
    assert "pytorch_model.bin" in _error_line(capsys, "generate", no_weights, "--prompt", "x")

    _transformers_llama_dir(tokenizer, tmp_path / "sharded", max_shard_size="100KB")
    next((tmp_path / "sharded").glob("model-00002-*.safetensors")).unlink()
    capsys.readouterr()  # transformers' progress bar
    assert "is missing" in _error_line(capsys, "generate", tmp_path / "sharded", "--prompt", "x")


def test_shapes_that_do_not_match_the_config(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    shutil.copytree(exported, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["intermediate_size"] += 16
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    err = _error_line(capsys, "generate", tmp_path / "m", "--prompt", "x")
    assert "mlp.down_proj.weight has shape (64, 128), but config.json implies (64, 144)" in err


def test_existing_output_directory_needs_force(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "exists and is not empty" in _error_line(capsys, "export", "hf", trained_run, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert run_cli("export", "hf", trained_run, out, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind


def test_a_failed_export_leaves_nothing(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_interop, "save_weights", disk_full)
    model, tokenizer = kimbho.load(trained_run)
    with pytest.raises(OSError):
        export_hf(model, tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_commands_answer_help(capsys: pytest.CaptureFixture[str]) -> None:
    for fmt in ("hf", "gguf"):
        with pytest.raises(SystemExit) as exit_info:
            run_cli("export", fmt, "--help")
        assert exit_info.value.code == 0
        assert "usage: kimbho export" in capsys.readouterr().out


# A hostile or broken model directory: one clear line, before anything large is allocated.
def _edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(num_hidden_layers=1_000_000), "declares 1,000,000 layers, but the weights hold 2"),
        (dict(intermediate_size=10**9), r"has shape \(64, 160\), but config.json implies \(64, 1000000000\)"),
        (dict(max_position_embeddings=10**12), "longer than the 262,144 tokens Kimbho supports"),
    ],
    ids=["a million layers", "a huge MLP", "a context of 10**12"],
)
def test_a_config_that_does_not_fit_its_weights_is_refused_at_once(
    changes: dict, message: str, tokenizer: kimbho.Tokenizer, tmp_path: Path, capsys
) -> None:
    import resource
    import time

    _transformers_llama_dir(tokenizer, tmp_path)
    _edit_config(tmp_path, **changes)
    capsys.readouterr()  # transformers' progress bar
    start, rss = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(KimbhoError, match=message):
        kimbho.load(tmp_path)
    print(f"\n{changes}: refused in {time.perf_counter() - start:.3f} s")
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200_000  # KiB: nothing large was built
    assert run_cli("generate", tmp_path, "--prompt", "x") == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_deeply_nested_config_is_one_line(tokenizer: kimbho.Tokenizer, tmp_path: Path, capsys) -> None:
    _transformers_llama_dir(tokenizer, tmp_path)
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    capsys.readouterr()
    assert run_cli("generate", tmp_path, "--prompt", "x") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nested too deeply" in err[0], err


def test_weight_shards_outside_the_directory_are_refused(tokenizer: kimbho.Tokenizer, tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "llama"
    _transformers_llama_dir(tokenizer, model_dir, max_shard_size="100KB")
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = next(iter(index["weight_map"]))
    shard = index["weight_map"][first]
    (model_dir / shard).rename(elsewhere / shard)
    index["weight_map"] = {
        k: (f"../../elsewhere/{v}" if v == shard else v) for k, v in index["weight_map"].items()
    }
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KimbhoError, match="outside .*shards must be files of the model directory itself"):
        kimbho.load(model_dir)
