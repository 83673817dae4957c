"""The networks: DiT/SiT (`dit`), the KL-VAE (`vae`), the alignment network (`alignment`) and the
two together (`reals_vae`), the frozen teachers (`teachers`), the LPIPS network (`perceptual`),
the patch discriminator (`discriminator`) and the attention kernels (`attention`).

May import: errors, artifacts, assets (weights and their files), and each other. Nothing here
knows about training loops, latent stores or the command line.
"""
