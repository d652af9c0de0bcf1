"""Video tokenizers: CDT, the conditioned-diffusion tokenizer (encoder, causal diffusion decoder, feature cache).

Import from the submodules: ``flowalign.tokenizers.cdt`` (the model and the [0, 1] media wrappers;
it re-exports ``.config`` and ``.schedule``), ``.layers`` (causal blocks and :class:`FeatureCache`),
``.networks``, ``.metrics`` (PSNR, SSIM, LPIPS), ``.files`` (encode/decode/reconstruct files for the
CLI) and ``.toy_experiment`` (CDT vs the KL-VAE baseline on toy videos).
"""
