"""Video tokenizers: CDT, the conditioned-diffusion tokenizer (encoder, causal diffusion decoder, feature cache).

Import from the submodules: ``flowalign.tokenizers.cdt`` (the model and the [0, 1] media wrappers;
it re-exports ``.config`` and ``.schedule``), ``.layers`` (causal blocks and :class:`FeatureCache`),
``.networks``, ``.metrics`` (PSNR, SSIM, LPIPS) and ``.files`` (encode/decode/reconstruct files for the
CLI). The toy comparison of CDT vs the KL-VAE baseline is ``flowalign.experiments.toy_cdt``.
"""
