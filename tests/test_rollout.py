"""The rollout engine on small random models: work done only where needed, oracle equality, cached rollout."""

import pytest
import torch

from adaptive_tokenizer import AdaptiveTokenizer, ModelConfig, VQGANConfig
from adaptive_tokenizer.model import ALITModel
from adaptive_tokenizer.latent_model import block_causal_mask
from adaptive_tokenizer.rollout import RolloutRun, rollout

from .oracle import plain_rollout
from .tolerances import decode_atol, network_atol


def small_model(**changes) -> ALITModel:
    """64 px images, 16x16 grid, 8 tokens per iteration, 4 iterations; VQGAN with attention at 16 px."""
    base = VQGANConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, attn_resolutions=(16,), z_channels=32,
                       codebook_size=64, codebook_dim=32, resolution=64)
    config = ModelConfig(base=base, image_size=64, patch_size=4, encoder_width=64, encoder_layers=1,
                         encoder_heads=4, decoder_width=64, decoder_layers=1, decoder_heads=4, codebook_size=32,
                         tokens_per_iteration=8, max_iterations=4, decoder_max_latent_tokens=32, **changes)
    with torch.random.fork_rng():  # Linear/Conv/norm layers get torch's default init, seeded here
        torch.manual_seed(0)
        model = ALITModel(config)
    # ... and the bare parameters (embeddings, tokens, codebooks) are filled from their own generator.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm, torch.nn.GroupNorm)):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        # Make the decoder's output depend visibly on the tokens (errors differ by ~1e-3 between iterations).
        if config.factorize_latent:
            model.decoder.latent_embed.weight.mul_(5)
        for block in model.decoder.transformer.blocks:
            block.attn.qkv.weight.mul_(3)
    return model.eval()


class Counter:
    def __init__(self, module):
        self.batch_sizes = []
        self.handle = module.register_forward_hook(lambda _m, args, _o: self.batch_sizes.append(args[0].shape[0]))


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def run(model, pixels, iterations, **kwargs):
    encoder, decoder, pixel_decoder = (Counter(m) for m in (model.encoder.transformer, model.decoder,
                                                            model.base.decoder))
    with torch.inference_mode():
        out = rollout(model, pixels, iterations, **kwargs)
    for counter in (encoder, decoder, pixel_decoder):
        counter.handle.remove()
    return out, encoder.batch_sizes, decoder.batch_sizes, pixel_decoder.batch_sizes


@pytest.fixture(scope="module", params=["recurrent", "cached"])
def model(request):
    return small_model(rollout=request.param)


def test_fixed_budget_runs_neither_decoder(model, pixels):
    out, enc, dec, pix = run(model, pixels, 3)
    assert enc == [3, 3, 3] and dec == [] and pix == []
    assert [t.shape for t in out.tokens] == [(24,)] * 3 and out.errors is None
    assert out.num_iterations.tolist() == [3, 3, 3]


def test_halting_decodes_logits_between_iterations_only(model, pixels):
    out, enc, dec, pix = run(model, pixels, 4, halting_confidence=0.05)
    assert enc == [3] * 4 and dec == [3] * 3 and pix == []


def test_halting_changes_later_iterations_only(model, pixels):
    plain, halted = [], []
    with torch.inference_mode():
        rollout(model, pixels, 3, trace=plain.append)
        rollout(model, pixels, 3, halting_confidence=0.0, trace=halted.append)  # every 2D token halts
    assert halted[0].halt_mask.all()
    assert torch.equal(plain[0].token_vectors, halted[0].token_vectors)
    assert not torch.allclose(plain[1].token_vectors, halted[1].token_vectors)


def test_finished_images_leave_the_batch(model, pixels):
    records = []
    with torch.inference_mode():
        rollout(model, pixels, 4, trace=records.append)
    errors = torch.stack([r.error for r in records], dim=1)  # [3 images, 4 iterations]
    threshold = float(errors[:, 0].min())  # the image with the lowest first error stops at once
    met = errors <= threshold
    stop = [int(row.nonzero()[0]) if row.any() else 3 for row in met]  # last iteration each image runs
    expected_iterations = [s + 1 if met[i].any() else int(errors[i].argmin()) + 1 for i, s in enumerate(stop)]
    expected_batches = [n for n in (sum(s >= t for s in stop) for t in range(4)) if n]
    assert expected_batches[:2] == [3, 2]  # image 0 stops at once, the others go on
    out, enc, dec, pix = run(model, pixels, 4, target_error=threshold)
    assert enc == expected_batches and pix == expected_batches
    assert out.num_iterations.tolist() == expected_iterations
    torch.testing.assert_close(out.errors, errors[torch.arange(3), out.num_iterations - 1])


def test_trace_records_shapes(model, pixels):
    records = []
    with torch.inference_mode():
        rollout(model, pixels, 2, halting_confidence=0.5, trace=records.append)
    first, second = records
    assert first.token_ids.shape == (3, 8) and second.token_ids.shape == (3, 16)
    assert second.latents.shape == (3, 16, 64) and second.token_vectors.shape == (3, 16, 12)
    assert second.logits.shape == (3, 256, 64) and second.gt_prob.shape == (3, 256)
    assert second.reconstruction.shape == (3, 3, 64, 64) and second.error.shape == (3,)


def test_unfactorized_continuous_model(pixels):
    model = small_model(latent_kind="continuous", factorize_latent=False)
    tok = AdaptiveTokenizer(model)
    result = tok.encode(pixels, budget=16)
    assert result.tokens[0].shape == (16, 64)
    assert tok.decode(result).shape == (3, 3, 64, 64)


def test_iteration_count_is_checked(pixels):
    with pytest.raises(ValueError, match="num_iterations"):
        rollout(small_model(), pixels, 5)


# ---- the engine against the plain oracle (tests/oracle.py) --------------------------------------------------
@pytest.mark.parametrize("halting", [None, 0.02, 0.0])
def test_tokens_equal_the_plain_rollout(model, pixels, halting):
    with torch.inference_mode():
        steps = plain_rollout(model, pixels, 4, halting)
        for iterations in (1, 2, 4):
            out = rollout(model, pixels, iterations, halting_confidence=halting)
            assert torch.equal(torch.stack(out.tokens), steps[iterations - 1]["tokens"])
        # Adaptive length: the oracle's per-iteration errors give the expected choice.
        errors = torch.stack([step["error"] for step in steps], dim=1)
        threshold = float(errors.median())
        out = rollout(model, pixels, 4, halting_confidence=halting, target_error=threshold)
        for image in range(3):
            met = (errors[image] <= threshold).nonzero()
            expected = int(met[0]) if len(met) else int(errors[image].argmin())
            assert out.num_iterations[image] == expected + 1
            assert torch.equal(out.tokens[image], steps[expected]["tokens"][image])


# ---- cached rollout ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cached_model():
    return small_model(rollout="cached")


@pytest.mark.parametrize("halting", [None, 0.02])
def test_incremental_equals_block_causal_single_pass(cached_model, pixels, halting):
    records = []
    with torch.inference_mode():
        rollout(cached_model, pixels, 4, halting_confidence=halting, trace=records.append)
        prefix = cached_model.encoder.embed_image(pixels, cached_model.base.encode(pixels))
        halted = torch.zeros(3, 4, 256, dtype=torch.bool)
        if halting is not None:
            for t in range(3):
                halted[:, t + 1] = halted[:, t] | records[t].halt_mask
            assert halted[:, 1:].any() and not halted[:, 1:].all()  # halting really acts
        single_pass = cached_model.encoder.forward_block_causal(prefix, 4, halted)
    # 4 incremental iterations vs one block-causal pass: the same sums in another order (tests/tolerances.py)
    tol = network_atol([cached_model.encoder], scale=single_pass.abs().max())
    torch.testing.assert_close(records[-1].latents, single_pass, atol=tol, rtol=0)


def test_smaller_budgets_are_prefixes(cached_model, pixels):
    tok = AdaptiveTokenizer(cached_model)
    full = tok.encode(pixels, budget=32)
    longest = tok.encode(pixels, budget=8)
    for budget in (8, 16, 24):
        shorter = tok.encode(pixels, budget=budget)
        assert all(torch.equal(s, f[:budget]) for s, f in zip(shorter.tokens, full.tokens))
    assert torch.equal(longest.tokens[0], full.tokens[0][:8])


def test_cached_iteration_encodes_one_block(cached_model, pixels):
    lengths = []
    handle = cached_model.encoder.transformer.register_forward_hook(lambda _m, args, _o: lengths.append(args[0].shape[1]))
    with torch.inference_mode():
        rollout(cached_model, pixels, 4)
    handle.remove()
    assert lengths == [1 + 256 + 8, 8, 8, 8]


def test_cached_rollout_computes_each_blocks_tokens_once(cached_model, pixels):
    """An earlier block's latents never change in the cached rollout, so ``all_tokens`` quantizes only the new
    block, with the same ids and vectors as quantizing everything so far, also after images leave the batch."""
    quantized = []
    quantize = cached_model.quantizer.quantize
    cached_model.quantizer.quantize = lambda vectors: quantized.append(vectors.shape[1]) or quantize(vectors)
    try:
        with torch.inference_mode():
            run = RolloutRun(cached_model, pixels, 4)
            for iteration in range(4):
                latents = run.encode_step()
                vectors, ids = run.all_tokens(latents)
                full_vectors, full_ids = run.tokens(latents)
                assert torch.equal(vectors, full_vectors) and torch.equal(ids, full_ids)
                if iteration == 1:
                    run.keep(torch.tensor([0, 2]))
    finally:
        cached_model.quantizer.quantize = quantize
    assert quantized[::2] == [8, 8, 8, 8]  # all_tokens: one block each time (tokens(): everything so far)


def test_block_causal_mask_layout():
    mask = block_causal_mask(num_prefix=3, tokens_per_iteration=2, num_iterations=3)[0, 0]
    expected = torch.tensor([
        # prefix (3) + block 0 (2) attend among themselves; block 1 adds itself; block 2 sees everything.
        [1, 1, 1, 1, 1, 0, 0, 0, 0]] * 5 + [[1, 1, 1, 1, 1, 1, 1, 0, 0]] * 2 + [[1] * 9] * 2, dtype=torch.bool)
    assert torch.equal(mask, expected)
    halted = torch.zeros(1, 3, 2, dtype=torch.bool)
    halted[0, 2, 1] = True  # 2D token 1 (position 2) halted before block 2
    mask = block_causal_mask(3, 2, 3, halted)[0, 0]
    assert not mask[7:, 2].any() and mask[5:7, 2].all() and mask[:5, 2].all()


def test_torch_compile_gives_the_eager_tokens(pixels):
    """Modules compiled by inductor give the eager tokens, at a fixed budget and adaptively (cached rollout;
    the recurrent one runs the same modules)."""
    eager = AdaptiveTokenizer(small_model(rollout="cached"))
    compiled = AdaptiveTokenizer(small_model(rollout="cached")).compile()  # same weights: small_model is seeded
    for kwargs in ({"budget": 16}, {"halt_threshold": 0.614}):
        a, b = eager.encode(pixels, **kwargs), compiled.encode(pixels, **kwargs)
        assert a.num_tokens.tolist() == b.num_tokens.tolist()
        assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    torch.testing.assert_close(eager.decode(a), compiled.decode(b), atol=decode_atol(eager), rtol=0)


def test_bfloat16_rollouts_run(pixels):
    for kind in ("cached", "recurrent"):
        tok = AdaptiveTokenizer(small_model(rollout=kind)).to(dtype="bf16")
        result = tok.encode(pixels, halt_threshold=0.5)
        assert tok.decode(result).dtype == torch.float32 and result.tokens[0].dtype == torch.long


def test_a_fixed_budget_does_not_wait_for_the_device_at_every_iteration(pixels):
    """Host syncs (values read back, ``nonzero``, device-to-host copies) of a fixed-budget rollout do not grow with
    its iterations, with halting on or off: on CUDA the iterations are queued without a round trip each. (On a CPU
    the copies dispatch nothing, so this counts the value reads; ``scripts/host_syncs.py`` measures CUDA.)"""
    from adaptive_tokenizer.bench import HostSyncCounter

    for halting in (None, 0.02):
        model = small_model(dynamic_halting=halting is not None, dynamic_halting_confidence=halting or 0.99)
        counts = []
        for iterations in (1, 2, 4):
            with torch.no_grad(), HostSyncCounter() as syncs:  # (inference_mode hides ops from dispatch modes)
                rollout(model, pixels, iterations, halting_confidence=halting)
            counts.append(syncs.count)
        assert counts[0] == counts[1] == counts[2], (halting, counts)
    with torch.no_grad(), HostSyncCounter() as syncs:  # the counter sees a value read
        bool((pixels > 0.5).any())
    assert syncs.count == 1
