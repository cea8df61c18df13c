"""The rollout engine on small random models: work done only where needed, shapes, halting, compaction."""

import pytest
import torch

from adaptive_tokenizer import AdaptiveTokenizer, ModelConfig, VQGANConfig
from adaptive_tokenizer.model import ALITModel
from adaptive_tokenizer.rollout import rollout


def small_model(**changes) -> ALITModel:
    """64 px images, 16x16 grid, 8 tokens per iteration, 4 iterations; VQGAN with attention at 16 px."""
    base = VQGANConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, attn_resolutions=(16,), z_channels=32,
                       codebook_size=64, codebook_dim=32, resolution=64)
    config = ModelConfig(base=base, image_size=64, patch_size=4, encoder_width=64, encoder_layers=1,
                         encoder_heads=4, decoder_width=64, decoder_layers=1, decoder_heads=4, codebook_size=32,
                         tokens_per_iteration=8, max_iterations=4, decoder_max_latent_tokens=32, **changes)
    model = ALITModel(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * (0.3 if "norm" not in name else 0.1)
                        + (1.0 if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight") else 0))
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


def test_fixed_budget_runs_neither_decoder(pixels):
    out, enc, dec, pix = run(small_model(), pixels, 3)
    assert enc == [3, 3, 3] and dec == [] and pix == []
    assert [t.shape for t in out.tokens] == [(24,)] * 3 and out.errors is None
    assert out.num_iterations.tolist() == [3, 3, 3]


def test_halting_decodes_logits_between_iterations_only(pixels):
    out, enc, dec, pix = run(small_model(), pixels, 4, halting_threshold=0.05)
    assert enc == [3] * 4 and dec == [3] * 3 and pix == []


def test_halting_changes_later_iterations_only(pixels):
    model = small_model()
    plain, halted = [], []
    with torch.inference_mode():
        rollout(model, pixels, 3, trace=plain.append)
        rollout(model, pixels, 3, halting_threshold=0.0, trace=halted.append)  # every 2D token halts
    assert halted[0].halt_mask.all()
    assert torch.equal(plain[0].token_vectors, halted[0].token_vectors)
    assert not torch.allclose(plain[1].token_vectors, halted[1].token_vectors)


def test_finished_images_leave_the_batch(pixels):
    model = small_model()
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
    out, enc, dec, pix = run(model, pixels, 4, length_threshold=threshold)
    assert enc == expected_batches and pix == expected_batches
    assert out.num_iterations.tolist() == expected_iterations
    torch.testing.assert_close(out.errors, errors[torch.arange(3), out.num_iterations - 1])


def test_trace_records_shapes(pixels):
    records = []
    with torch.inference_mode():
        rollout(small_model(), pixels, 2, halting_threshold=0.5, trace=records.append)
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
