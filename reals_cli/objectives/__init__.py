"""The maths of the generative models, kept apart as SiT keeps its `transport/`: DiT's DDPM
(`diffusion`: schedule, eps + learned-sigma VLB, respacing), SiT's interpolants (`transport`:
paths, losses, drift and score) and the samplers over both (`samplers`: DDPM, DDIM, ODE, SDE,
classifier-free guidance).

May import: errors. Pure tensor functions: no files, no networks, no devices chosen here.
"""
