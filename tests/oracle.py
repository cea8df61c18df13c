"""Plain rollouts kept as test oracles: re-encode and decode at every iteration, as the authors do.

``recurrent``: the authors' loop. ``cached``: at every iteration, one block-causal pass over the whole sequence
so far (no key/value cache), with the halting decided after the earlier iterations.
"""

import torch


def plain_rollout(model, pixels, num_iterations, halting_confidence=None):
    """Per iteration: dict(tokens=[N, L] ids or [N, L, D] vectors, latents=[N, L, W], halt_mask=[N, G2] | None)."""
    encoder, config = model.encoder, model.config
    features = model.base.encode(pixels)
    gt_ids = model.base.code_ids(features)
    prefix = encoder.embed_image(pixels, features)
    num_prefix = prefix.shape[1]
    halted = torch.zeros(pixels.shape[0], num_iterations, config.num_image_tokens, dtype=torch.bool)
    x = encoder.norm_pre(torch.cat([prefix, encoder.latent_block(0).expand(len(pixels), -1, -1)], dim=1))
    steps = []
    for t in range(num_iterations):
        if config.rollout == "recurrent":
            x = encoder.transformer(x)
            latents = x[:, num_prefix:]
        else:
            latents = encoder.forward_block_causal(prefix, t + 1, halted[:, : t + 1])
        vectors = encoder.to_token_vectors(latents).float()
        tokens = model.quantizer.quantize(vectors) if model.quantizer is not None else vectors
        logits = model.decoder(model.decoder_inputs(tokens)).float()
        mask = None
        if halting_confidence is not None:
            mask = torch.softmax(logits, -1).gather(-1, gt_ids[..., None])[..., 0] >= halting_confidence
            if t + 1 < num_iterations:
                halted[:, t + 1] = halted[:, t] | mask
            if config.rollout == "recurrent":
                image_tokens = torch.where(mask[..., None], encoder.halted_image_tokens(), x[:, 1:num_prefix])
                x = torch.cat([x[:, :1], image_tokens, x[:, num_prefix:]], dim=1)
        steps.append({"tokens": tokens, "latents": latents, "halt_mask": mask,
                      "error": (model.reconstruct(logits) - pixels).abs().mean(dim=(1, 2, 3))})
        if config.rollout == "recurrent" and t + 1 < num_iterations:
            block = encoder.latent_block(t + 1).expand(len(pixels), -1, -1)
            x = encoder.norm_recursive(torch.cat([x, block], dim=1))
    return steps
