"""Toy-world experiments and the demo, built on the library below them.

``toy_base`` (the cached toy base models and held-out evaluation), ``toy_alignment`` (Flow-DPO / RWR /
SFT-on-winners), ``toy_nrg`` (the latent reward and Flow-NRG), ``toy_onestep`` (f-distill and
Diff-Instruct*), ``toy_cdt`` (CDT vs the KL-VAE baseline) and ``demo`` (``flowalign demo``). Nothing in the
library imports this package.
"""
