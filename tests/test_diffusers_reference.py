"""The DiT network and the DDPM/DDIM samplers against diffusers, a second implementation.

diffusers' DiTTransformer2DModel is the official DiT architecture in other names, except
for two small deviations that the test sets to the official values (its time features'
frequency divisor and one LayerNorm eps). Agreeing with it on the same weights says that a
released `DiT-XL-2-256x256.pt` computes the same function in our network (the order of
the adaLN outputs, the q/k/v split, the embeddings, unpatchify), which a key-and-shape
check cannot."""

from __future__ import annotations

import pytest
import torch

from reals_cli.models.dit import DiT
from reals_cli.objectives.diffusion import Diffusion, ddim_sample_loop, ddpm_sample_loop

diffusers = pytest.importorskip("diffusers")


def official_to_diffusers(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """An official-layout DiT state dict in diffusers' DiTTransformer2DModel layout."""
    out = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"],
        "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    for i in range(depth):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        # diffusers repeats the time/label embedders in every block; the official model has one.
        for ours, theirs in [("t_embedder.mlp.0", "timestep_embedder.linear_1"),
                             ("t_embedder.mlp.2", "timestep_embedder.linear_2")]:
            for kind in ("weight", "bias"):
                out[f"{d}norm1.emb.{theirs}.{kind}"] = sd[f"{ours}.{kind}"]
        out[f"{d}norm1.emb.class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{b}attn.qkv.{kind}"].chunk(3)
            out |= {f"{d}attn1.to_q.{kind}": q, f"{d}attn1.to_k.{kind}": k, f"{d}attn1.to_v.{kind}": v,
                    f"{d}attn1.to_out.0.{kind}": sd[f"{b}attn.proj.{kind}"],
                    f"{d}norm1.linear.{kind}": sd[f"{b}adaLN_modulation.1.{kind}"],
                    f"{d}ff.net.0.proj.{kind}": sd[f"{b}mlp.fc1.{kind}"],
                    f"{d}ff.net.2.{kind}": sd[f"{b}mlp.fc2.{kind}"]}
    return out


@pytest.mark.parametrize("patch, learn_sigma, attn", [(2, True, "math"), (2, True, "sdpa"), (4, False, "sdpa")])
def test_dit_computes_what_diffusers_dit_computes(patch, learn_sigma, attn):
    size, depth, width, heads, classes = 16, 2, 48, 3, 10
    ours = DiT(input_size=size, patch_size=patch, in_channels=4, hidden_size=width, depth=depth, num_heads=heads,
               num_classes=classes, learn_sigma=learn_sigma, attn=attn).double().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every weight random: adaLN-Zero's zeros would hide the gates and the final layer
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * p.shape[-1] ** -0.5)
    theirs = diffusers.DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=width // heads, in_channels=4, out_channels=ours.out_channels,
        num_layers=depth, sample_size=size, patch_size=patch, num_embeds_ada_norm=classes,
        norm_eps=1e-6).double().eval()  # official DiT: eps 1e-6 in every LayerNorm (diffusers defaults to 1e-5)
    theirs.load_state_dict(official_to_diffusers(ours.state_dict(), depth), strict=True)
    # diffusers computes its fixed position embedding itself; the official checkpoints carry theirs.
    torch.testing.assert_close(theirs.pos_embed.pos_embed, ours.pos_embed, rtol=0, atol=1e-6)
    # diffusers' time features divide the frequencies by half - 1 (downscale_freq_shift=1);
    # the official DiT divides by half. Set theirs to the official rule to compare the rest.
    for block in theirs.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0

    x = torch.randn(5, 4, size, size, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 700, 999])
    y = torch.tensor([0, 3, 9, classes, 5])  # `classes` is the null class
    with torch.no_grad():
        expected = theirs(x, timestep=t, class_labels=y).sample
        got = ours(x, t, y)
    assert got.shape == expected.shape == (5, ours.out_channels, size, size)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def float64_tables(scheduler):
    """diffusers keeps its schedule in float32; DiT (and we) in float64. Give it DiT's tables,
    so that the comparison sees the update rules and not the rounding of alpha_bar."""
    scheduler.betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    return scheduler


def toy_model(learned_variance: bool):
    """A smooth stand-in network of (x, original timestep) whose output depends on both, so
    a wrong timestep, sign or channel split changes every step."""
    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = t.to(x.dtype).view(-1, 1, 1, 1) / 1000
        eps = torch.tanh(0.7 * x + s) * (1 - 0.5 * s)
        if not learned_variance:
            return eps
        return torch.cat([eps, torch.sin(3 * x + 5 * s)], dim=1)  # in [-1, 1], as learned_range reads it
    return fn


def test_ddpm_250_steps_is_diffusers_ddpm_with_learned_range():
    """DiT's sampler (respaced to 250 steps, learned-range variance, no clipping) against
    diffusers' DDPMScheduler: same start, same noise draws, same trajectory."""
    model = toy_model(learned_variance=True)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                        beta_end=0.02, variance_type="learned_range", clip_sample=False,
                                        timestep_spacing="linspace")
    float64_tables(scheduler).set_timesteps(250)
    respaced = Diffusion.linear().respace(250)
    assert respaced.timestep_map.flip(0).tolist() == scheduler.timesteps.tolist()

    x0 = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    x = x0
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(3)), t, x, generator=gen).prev_sample
    got = ddpm_sample_loop(model, x0.shape, 250, noise=x0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim50_is_diffusers_ddim(eta):
    """DDIM on DDIM's own 50-step stride ("ddim50": 0, 20, ..., 980), the last step to
    alpha_bar = 1, against diffusers' DDIMScheduler with the same steps."""
    model = toy_model(learned_variance=False)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                        beta_end=0.02, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                        timestep_spacing="leading")
    float64_tables(scheduler).set_timesteps(50)
    assert Diffusion.linear().respace("ddim50").timestep_map.flip(0).tolist() == scheduler.timesteps.tolist()

    x0 = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    x = x0
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(3)), t, x, eta=eta, generator=gen).prev_sample
    got = ddim_sample_loop(model, x0.shape, "ddim50", eta=eta, noise=x0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, x, rtol=1e-9, atol=1e-9)
