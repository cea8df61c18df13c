"""Training recipe for ALIT models (not part of the inference library; ``import adaptive_tokenizer`` never imports it).

Stages, one command each (see ``training/README.md``):

1. ``python -m training.vq``      -- the base VQ autoencoder (``adaptive_tokenizer.base_tokenizer.VQGAN``);
2. ``python -m training.distill`` -- latent distillation of the ALIT encoder/quantizer/decoder, base frozen.

Both run the loop of ``training/loop.py`` (resume, checkpoints, clock, stop conditions, exit codes).
"""
