"""LoRA: fresh adapters change nothing, merging changes nothing, only adapters train and are saved,
the base is checked wherever adapters are loaded, resume is exact, and the PEFT export loads onto
the exported base in `peft` with the same logits."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import kimbho
from kimbho.config import KimbhoConfig, LoraConfig
from kimbho.errors import KimbhoError
from kimbho.loading import resolve_checkpoint
from kimbho.model import lora
from kimbho.storage.files import sha256_of_file
from tests.conftest import run_cli, tiny_run_config
from tests.test_finetune import _chat_data, _conversation, _write_jsonl

PROMPT = torch.tensor([[5, 17, 300, 42, 9, 77, 120, 3]])


def _randomise_adapters(model: kimbho.KimbhoV1Model, seed: int = 1) -> None:
    """Non-zero B matrices, as after training (fresh ones are zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, lora.LoraLinear):
                module.lora_B.copy_(0.05 * torch.randn(module.lora_B.shape, generator=generator))


def test_fresh_adapters_give_the_base_logits_and_merged_equals_unmerged(
    tiny_model: kimbho.KimbhoV1Model,
) -> None:
    base = tiny_model(PROMPT)
    lora.add_adapters(tiny_model, rank=4, alpha=8)
    assert torch.equal(tiny_model(PROMPT), base)
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and all(lora.is_adapter(n) for n in trainable)
    # Key and value adapters are narrower than the query's under grouped-query attention.
    config = tiny_model.config
    qkv = tiny_model.blocks[0].attn.qkv
    assert isinstance(qkv, lora.LoraLinear) and config.num_kv_heads < config.num_heads
    assert qkv.parts == (config.num_heads * config.head_dim, *[config.num_kv_heads * config.head_dim] * 2)
    _randomise_adapters(tiny_model)
    unmerged = tiny_model(PROMPT)
    assert (unmerged - base).abs().max() > 1e-3  # the adapters do something
    lora.merge_adapters(tiny_model)
    assert not any(isinstance(m, lora.LoraLinear) for m in tiny_model.modules())
    torch.testing.assert_close(tiny_model(PROMPT), unmerged, rtol=0, atol=1e-5)


def test_adapters_are_a_small_share_of_the_base_preset() -> None:
    with torch.device("meta"):
        model = kimbho.KimbhoV1Model(KimbhoConfig.from_preset("base"))
        lora.add_adapters(model, rank=16, alpha=32)
    adapters = sum(p.numel() for n, p in model.named_parameters() if lora.is_adapter(n))
    total = sum(p.numel() for p in model.parameters())
    assert adapters / total < 0.05


def _lora_run(trained_run: Path, tmp_path: Path, name: str = "lora", *extra: object) -> Path:
    data = _write_jsonl(tmp_path / "chat.jsonl", [_conversation(i) for i in range(60)])
    out = tmp_path / name
    code = run_cli(
        "finetune", trained_run, "--data", data, "--out", out, "--max-steps", 4,
        "--lora-rank", 4, "--lora-alpha", 8, "train.batch_size=4", *extra,
    )  # fmt: skip
    assert code == 0
    return out


def test_a_lora_run_saves_only_adapters_and_loads_merged_over_its_base(
    trained_run: Path, tmp_path: Path
) -> None:
    out = _lora_run(trained_run, tmp_path)
    ckpt = out / "checkpoints" / "step-00000004"
    assert not (ckpt / "model.safetensors").exists()
    adapters = load_file(ckpt / "adapter.safetensors")
    assert adapters and all(lora.is_adapter(n) for n in adapters)
    info = json.loads((ckpt / "adapter.json").read_text())
    assert info["rank"] == 4 and info["alpha"] == 8
    assert info["base"]["sha256"] == sha256_of_file(resolve_checkpoint(trained_run) / "model.safetensors")
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert set(state["optimizer"]["state"]) == set(adapters)  # the optimizer state of the adapters alone
    # The base, with the saved adapters applied unmerged, computes what `load` gives merged.
    base, _ = kimbho.load(trained_run)
    lora.add_adapters(base, 4, 8)
    base.load_state_dict(adapters, strict=False)
    expected = base(PROMPT)
    merged, _ = kimbho.load(out)
    torch.testing.assert_close(merged(PROMPT), expected, rtol=0, atol=1e-5)
    assert any(not torch.equal(a, torch.zeros_like(a)) for n, a in adapters.items() if "lora_B" in n)


def test_adapters_over_another_base_are_refused_naming_both(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base"
    shutil.copytree(resolve_checkpoint(trained_run), base)
    out = _lora_run(base, tmp_path)
    # The base changes under the adapters (retrained, overwritten): its weights differ now.
    weights = load_file(base / "model.safetensors")
    weights["norm.weight"] = weights["norm.weight"] * 2
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    manifest = json.loads((base / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = sha256_of_file(base / "model.safetensors")
    (base / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KimbhoError, match=r"LoRA adapters of .*base.* a different base"):
        kimbho.load(out)
    # Resuming over another base is refused too, naming the checkpoint's base and this one.
    data = tmp_path / "chat.jsonl"
    assert run_cli("finetune", base, "--data", data, "--out", out, "--resume", "--lora-rank", 4,
                   "--lora-alpha", 8, "train.batch_size=4", "--max-steps", 6) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "adapters are of base" in err and str(base) in err
    shutil.rmtree(base)
    with pytest.raises(KimbhoError, match="no longer exists"):
        kimbho.load(out)


def test_a_resumed_lora_run_is_bit_identical(
    trained_run: Path, tokenizer: kimbho.Tokenizer, tmp_path: Path
) -> None:
    data = _chat_data(tokenizer, tmp_path)
    train = dict(
        batch_size=4, optimizer="adamw", max_steps=6, save_every=3, eval_every=3, log_every=1, lr=1e-3
    )

    def run() -> kimbho.RunConfig:
        return dataclasses.replace(tiny_run_config(**train), lora=LoraConfig(rank=4, alpha=8))

    full, part = tmp_path / "full", tmp_path / "part"
    for out in (full, part):
        kimbho.Trainer(run(), data, out, progress_bar=False, init_from=trained_run).fit()
    shutil.rmtree(part / "checkpoints" / "step-00000006")
    kimbho.Trainer(run(), data, part, resume=True, progress_bar=False, init_from=trained_run).fit()
    a = load_file(full / "checkpoints" / "step-00000006" / "adapter.safetensors")
    b = load_file(part / "checkpoints" / "step-00000006" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_peft_adapter_export_loads_onto_the_exported_base(trained_run: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    out = _lora_run(trained_run, tmp_path)
    assert run_cli("export", "hf", trained_run, tmp_path / "base_hf") == 0
    assert run_cli("export", "hf", out, tmp_path / "adapter", "--adapter") == 0
    assert run_cli("export", "hf", out, tmp_path / "merged_hf") == 0
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf")
    ours, _ = kimbho.load(out)
    with torch.no_grad():
        expected = ours(PROMPT)
        assert (hf_base(PROMPT).logits - expected).abs().max() > 1e-3  # the adapters did learn something
        with_adapter = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
        torch.testing.assert_close(with_adapter(PROMPT).logits, expected, rtol=0, atol=1e-4)
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged_hf")
        torch.testing.assert_close(merged(PROMPT).logits, expected, rtol=0, atol=1e-4)


def test_a_bf16_stored_base_trains_under_autocast_and_runs_outside_it(
    tiny_model: kimbho.KimbhoV1Model,
) -> None:
    """Where training is bf16 the frozen projections are stored in bf16; the adapters stay fp32
    and get gradients, and the model still runs in fp32 outside autocast (samples, evaluation)."""
    lora.add_adapters(tiny_model, rank=4, alpha=8, frozen_dtype=torch.bfloat16)
    qkv = tiny_model.blocks[0].attn.qkv
    assert qkv.weight.dtype == torch.bfloat16 and qkv.lora_A.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tiny_model(PROMPT, targets=PROMPT).backward()
    assert qkv.lora_A.grad is not None and qkv.weight.grad is None
    assert torch.isfinite(tiny_model(PROMPT)).all()
