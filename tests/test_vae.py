"""Our AutoencoderKL against diffusers' own: same keys, same numbers, folders that both read."""

import json
import math

import pytest
import torch

from reals_cli.errors import UserError
from reals_cli.models.vae import AutoencoderKL, VAEConfig, kl_loss, load_diffusers_vae, save_diffusers_vae, vae_config

diffusers = pytest.importorskip("diffusers")
DiffusersVAE = diffusers.AutoencoderKL

CONFIGS = {
    "2-blocks": VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=16),
    # 3 blocks (f4), 2 layers, odd channel counts and a 3-channel latent: every index path is exercised.
    "3-blocks": VAEConfig(in_channels=2, out_channels=1, block_out_channels=(16, 32, 32), layers_per_block=2,
                          latent_channels=3, norm_num_groups=8, sample_size=16),
    "no-attn-no-quant": VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
                                  use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False),
}


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def diffusers_vae(cfg: VAEConfig, seed: int = 0):
    """diffusers' AutoencoderKL built from our to_diffusers() config, random weights, GroupNorms not 1/0."""
    torch.manual_seed(seed)
    model = DiffusersVAE.from_config(cfg.to_diffusers()).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):  # identity-initialised norms would hide mistakes
                m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.3 * torch.randn_like(m.bias))
    return model


def image(cfg: VAEConfig, side: int = 16, seed: int = 1):
    return torch.rand(2, cfg.in_channels, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_same(ours: AutoencoderKL, theirs, cfg: VAEConfig):
    x = image(cfg)
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        post = theirs.encode(x).latent_dist
        close(mean, post.mean)
        close(logvar, post.logvar)
        assert mean.shape[-1] == x.shape[-1] // cfg.downsample_factor
        close(ours.decode(mean), theirs.decode(post.mean).sample)


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_diffusers(name):
    cfg = CONFIGS[name]
    theirs = diffusers_vae(cfg)
    ours = AutoencoderKL(cfg).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())  # same keys, same order
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert_same(ours, theirs, cfg)
    # Sampling draws the same noise as diffusers' posterior for the same generator.
    x = image(cfg)
    with torch.no_grad():
        _, _, _, z = ours(x, generator=torch.Generator().manual_seed(7))
        ref = theirs.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    close(z, ref)


def test_diffusers_folders_load(tmp_path):
    cfg = CONFIGS["3-blocks"]
    theirs = diffusers_vae(cfg)
    theirs.save_pretrained(tmp_path / "st")
    theirs.save_pretrained(tmp_path / "bin", safe_serialization=False)
    theirs.save_pretrained(tmp_path / "pipe" / "vae")  # a pipeline root: the VAE sits in vae/
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    for folder in ("st", "bin", "pipe"):
        ours = load_diffusers_vae(tmp_path / folder).eval()
        assert ours.config == cfg
        assert_same(ours, theirs, cfg)


def test_saved_folder_loads_in_diffusers(tmp_path):
    cfg = CONFIGS["3-blocks"]
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(diffusers_vae(cfg, seed=3).state_dict())
    save_diffusers_vae(ours, tmp_path / "out")
    theirs = DiffusersVAE.from_pretrained(tmp_path / "out").eval()
    assert_same(ours, theirs, cfg)
    assert VAEConfig.from_diffusers(dict(theirs.config)) == cfg
    assert load_diffusers_vae(tmp_path / "out").config == cfg


def test_legacy_attention_keys(tmp_path):
    cfg = CONFIGS["2-blocks"]
    theirs = diffusers_vae(cfg)
    legacy = {}
    for k, v in theirs.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(legacy, strict=True)  # renamed by the module itself
    assert_same(ours, theirs, cfg)
    # And through a folder, as an old diffusers release wrote it (.bin, old names).
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg.to_diffusers()))
    torch.save(legacy, folder / "diffusion_pytorch_model.bin")
    assert_same(load_diffusers_vae(folder).eval(), theirs, cfg)


def test_errors(tmp_path):
    small, big = CONFIGS["2-blocks"], CONFIGS["3-blocks"]
    save_diffusers_vae(AutoencoderKL(small), tmp_path / "small")
    with pytest.raises(UserError) as e:
        load_diffusers_vae(tmp_path / "small", expected=big, role="--init folder")
    assert str(e.value) == (
        f"--init folder {tmp_path / 'small'} holds a VAE with in_channels 3, out_channels 3, "
        "block_out_channels [16, 32], layers_per_block 1, latent_channels 4, "
        "but in_channels 2, out_channels 1, block_out_channels [16, 32, 32], layers_per_block 2, "
        "latent_channels 3 is expected"
    )
    # config.json of one architecture beside the weights of another.
    (tmp_path / "small" / "config.json").write_text(json.dumps(big.to_diffusers()))
    with pytest.raises(UserError) as e:
        load_diffusers_vae(tmp_path / "small")
    weights = tmp_path / "small" / "diffusion_pytorch_model.safetensors"
    assert str(e.value) == (
        f"{weights} holds a VAE with in_channels 3, out_channels 3, block_out_channels [16, 32], "
        "layers_per_block 1, latent_channels 4, but its config.json says in_channels 2, out_channels 1, "
        "block_out_channels [16, 32, 32], layers_per_block 2, latent_channels 3; the folder is inconsistent, "
        "re-create it"
    )
    weights.unlink()
    with pytest.raises(UserError) as e:
        load_diffusers_vae(tmp_path / "small")
    assert str(e.value) == (
        f"{tmp_path / 'small'} has neither diffusion_pytorch_model.safetensors nor diffusion_pytorch_model.bin "
        "(nor a vae/ subfolder with one); pass a diffusers AutoencoderKL folder"
    )
    with pytest.raises(UserError, match="does not exist"):
        load_diffusers_vae(tmp_path / "nowhere")
    with pytest.raises(UserError, match="act_fn relu"):
        VAEConfig.from_diffusers({**small.to_diffusers(), "act_fn": "relu"})
    with pytest.raises(UserError, match="down_block_types"):
        VAEConfig.from_diffusers({**small.to_diffusers(), "down_block_types": ["DownBlock2D"] * 2})
    with pytest.raises(UserError, match="unknown VAE preset"):
        vae_config("sd-f16")


def test_from_diffusers_defaults_and_unknown_keys():
    # An SD-1.x era config: no scaling_factor, plus keys we do not model.
    cfg = VAEConfig.from_diffusers({
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.2.2", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    })
    assert cfg.arch() == vae_config("sd-f8c4").arch()
    assert cfg.scaling_factor == 0.18215 and cfg.downsample_factor == 8


def test_kl_loss_closed_form():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    expected = 0.0
    for mu, lv in zip(mean.double().flatten().tolist(), logvar.double().flatten().tolist()):
        # KL(N(mu, s^2) || N(0, 1)) = log(1/s) + (s^2 + mu^2) / 2 - 1/2, with s = exp(lv / 2)
        s = math.exp(lv / 2)
        expected += math.log(1 / s) + (s * s + mu * mu) / 2 - 0.5
    torch.testing.assert_close(kl_loss(mean, logvar).double(), torch.tensor(expected / 3, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)


def test_gradient_checkpointing_same_gradients():
    cfg = CONFIGS["2-blocks"]
    x = image(cfg)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = AutoencoderKL(cfg, gradient_checkpointing=ckpt)
        recon, mean, logvar, _ = model(x, sample=False)
        ((recon - x).square().mean() + kl_loss(mean, logvar)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    close(grads[0], grads[1])


def test_presets():
    ours = AutoencoderKL(vae_config("sd-f8c4"))
    theirs = DiffusersVAE.from_config(vae_config("sd-f8c4").to_diffusers())
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) == 83_653_863  # SD's published 83.65M
    assert ours.downsample_factor == 8
    demo = AutoencoderKL(vae_config("demo"))
    with torch.no_grad():
        mean, _ = demo.encode(torch.zeros(1, 3, 64, 64))
    assert mean.shape == (1, 4, 16, 16)
    assert vae_config("tiny").downsample_factor == 2
