import pytest
import torch

from kimbho import DecoderLanguageModel, KimbhoConfig, KimbhoV1Model
from kimbho.errors import KimbhoError
from kimbho.interop.hf import config_from_hf, config_to_hf, from_hf, to_hf


def test_forward_shape(tiny_model: KimbhoV1Model) -> None:
    ids = torch.randint(0, 512, (3, 17))
    assert tiny_model(ids).shape == (3, 17, 512)


def test_attention_is_causal(tiny_model: KimbhoV1Model) -> None:
    ids = torch.randint(5, 512, (1, 20))
    changed = ids.clone()
    changed[0, 12:] = torch.randint(5, 512, (8,))
    with torch.no_grad():
        a, b = tiny_model(ids), tiny_model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_kv_cache_holds_only_the_kv_heads(tiny_model: KimbhoV1Model) -> None:
    cache = tiny_model.new_cache(batch_size=2, max_len=30)
    cfg = tiny_model.config
    assert cfg.num_kv_heads < cfg.num_heads
    assert cache.keys.shape == (cfg.num_blocks, 2, cfg.num_kv_heads, 30, cfg.head_dim)


def test_cached_logits_equal_full_forward(tiny_model: KimbhoV1Model) -> None:
    ids = torch.randint(0, 512, (2, 24))
    cache = tiny_model.new_cache(2, 24)
    pos = torch.arange(24).expand(2, 24)
    with torch.no_grad():
        full = tiny_model(ids)
        pieces = [tiny_model(ids[:, :10], cache, pos[:, :10])]  # prefill
        pieces += [
            tiny_model(ids[:, t : t + 1], cache, pos[:, t : t + 1]) for t in range(10, 16)
        ]  # decode steps
        pieces.append(tiny_model(ids[:, 16:], cache, pos[:, 16:]))  # a second chunk after decoding
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_rows_advance_independently(tiny_model: KimbhoV1Model) -> None:
    """One decode step over rows at different lengths (continuous batching) gives each row the
    logits of its own full forward pass."""
    a, b = torch.randint(5, 512, (1, 7)), torch.randint(5, 512, (1, 12))
    cache = tiny_model.new_cache(2, 16)
    with torch.no_grad():
        tiny_model(a[:, :-1], cache.rows(0, 1), torch.arange(6)[None])  # prefill each row on its own
        tiny_model(b[:, :-1], cache.rows(1, 1), torch.arange(11)[None])
        step = tiny_model(torch.cat([a[:, -1:], b[:, -1:]]), cache, torch.tensor([[6], [11]]))
        torch.testing.assert_close(step[0, -1], tiny_model(a)[0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step[1, -1], tiny_model(b)[0, -1], atol=1e-5, rtol=1e-5)


def test_cache_needs_positions(tiny_model: KimbhoV1Model) -> None:
    with pytest.raises(KimbhoError, match="pass positions"):
        tiny_model(torch.zeros(1, 3, dtype=torch.long), tiny_model.new_cache(1, 8))


def test_too_long_sequence_is_a_clear_error(tiny_model: KimbhoV1Model) -> None:
    with pytest.raises(KimbhoError, match="longer than the model's context of 64"):
        tiny_model(torch.zeros(1, 65, dtype=torch.long))


def test_forward_with_targets_is_the_cross_entropy_of_its_logits(tiny_model: KimbhoV1Model) -> None:
    """`forward(ids, targets=...)` is the training loss (nanoGPT's `forward(idx, targets)`): the
    cross-entropy of the logits it returns without targets, and the same gradients."""
    torch.manual_seed(0)
    ids, targets = torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (2, 12))
    for reduction in ("mean", "sum"):
        fused = tiny_model(ids, targets=targets, reduction=reduction)
        fused.backward()
        fused_grads = [p.grad.clone() for p in tiny_model.parameters()]
        tiny_model.zero_grad()
        logits = tiny_model(ids)
        plain = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), reduction=reduction
        )
        plain.backward()
        assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
        for fused_grad, p in zip(fused_grads, tiny_model.parameters(), strict=True):
            torch.testing.assert_close(fused_grad, p.grad, rtol=1e-4, atol=1e-6)
        tiny_model.zero_grad()


def test_initialisation_is_sensible() -> None:
    torch.manual_seed(0)
    model = KimbhoV1Model(KimbhoConfig.from_preset("small"))
    assert model.embed.weight[0].abs().sum() == 0  # padding row
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 1e-3
    assert model.blocks[0].mlp.down.weight.std().item() < 0.02 / 3  # residual projections scaled down
    assert torch.all(model.norm.weight == 1)
    logits = model(torch.randint(0, 8192, (1, 8)))
    # Near-uniform predictions at initialisation: loss close to ln(vocab).
    loss = torch.nn.functional.cross_entropy(logits[0], torch.randint(0, 8192, (8,)))
    assert abs(loss.item() - torch.log(torch.tensor(8192.0)).item()) < 0.5


def test_parameter_and_flop_counts() -> None:
    small = KimbhoV1Model(KimbhoConfig.from_preset("small"))
    assert 15.6e6 < small.num_params() < 15.8e6  # the 15.7M
    assert small.num_params(non_embedding=True) == small.num_params() - 8192 * 384
    assert small.flops_per_token(256) == 6 * small.num_params(non_embedding=True) + 12 * 6 * 384 * 256
    tied = KimbhoV1Model(KimbhoConfig.from_preset("small", tie_embeddings=True))
    assert tied.num_params() == small.num_params() - 8192 * 384
    assert tied.head.weight is tied.embed.weight


def test_seed_signature_positional_and_keywords() -> None:
    model = DecoderLanguageModel(1000, 64, 8, 2, 0)
    assert model.config == KimbhoConfig()
    model = DecoderLanguageModel(1000, 64, 8, 2, 0, 2, 500.0)
    assert (model.config.group_size, model.config.rope_base) == (2, 500.0)
    assert KimbhoV1Model(vocab_size=100, emb_dim=32, num_heads=4, group_size=2).config.num_kv_heads == 2
    with pytest.raises(TypeError):
        KimbhoV1Model(KimbhoConfig(), vocab_size=5)


def _tiny_llama(tie: bool) -> tuple[object, KimbhoConfig]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=131,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=96,
        rms_norm_eps=1e-5,
        rope_theta=31337.0,
        tie_word_embeddings=tie,
        pad_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    return hf, config_from_hf(hf_config.to_dict())


@pytest.mark.parametrize("tie", [False, True])
def test_gqa_parity_with_transformers_llama(tie: bool) -> None:
    """A random Llama with 4 query heads per K/V head and a non-default rope_theta, loaded into
    Kimbho, gives the same logits in fp32."""
    hf, cfg = _tiny_llama(tie)
    assert cfg.group_size == 4 and cfg.num_kv_heads == 2 and cfg.rope_base == 31337.0
    model = KimbhoV1Model(cfg).eval()
    model.load_state_dict(from_hf(hf.state_dict(), cfg))
    ids = torch.randint(0, 131, (2, 96))
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    assert (got - expected).abs().max().item() <= 1e-5
    assert expected.abs().max() > 0.1  # the comparison is not between near-zero tensors


def test_gqa_parity_with_transformers_llama_in_bf16() -> None:
    """Under bf16 autocast both models round at the same products: logits agree to bf16 precision."""
    hf, cfg = _tiny_llama(False)
    model = KimbhoV1Model(cfg).eval()
    model.load_state_dict(from_hf(hf.state_dict(), cfg))
    ids = torch.randint(0, 131, (2, 96))
    with torch.no_grad():
        reference = hf(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected, got = hf(ids).logits.float(), model(ids).float()
    scale = reference.abs().max().item()
    assert (got - expected).abs().max().item() <= 0.02 * scale
    assert (got - reference).abs().max().item() <= 0.02 * scale


def test_activation_checkpointing_gives_the_same_gradients(tiny_model: KimbhoV1Model) -> None:
    ids = torch.randint(0, 512, (2, 20))
    tiny_model.train()
    grads = []
    for checkpointing in (False, True):
        tiny_model.checkpoint_activations = checkpointing
        tiny_model.zero_grad()
        tiny_model(ids).square().mean().backward()
        grads.append([p.grad.clone() for p in tiny_model.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, recomputed)


def test_hf_key_map_round_trip() -> None:
    hf, cfg = _tiny_llama(False)
    state = from_hf(hf.state_dict(), cfg)
    back = to_hf(state, cfg)
    assert set(back) == set(hf.state_dict())
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back[name], tensor), name
    hf_cfg = config_to_hf(cfg)
    assert config_from_hf(hf_cfg) == cfg


def test_non_llama_architecture_is_refused_by_name() -> None:
    with pytest.raises(KimbhoError, match="architecture GPT2LMHeadModel is not supported"):
        config_from_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
