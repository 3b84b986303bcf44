"""The SM4 model: settings, tokenisation against hand-computed encodings, the forward pass per task,
per-modality k and ALP gradient scaling, FLOP counting."""

import math

import pytest
import torch

import sm4
from sm4.model import SETTINGS, ModelConfig, Setting, SM4Model, Tokenizer, fourier_encode, frequencies, get_setting
from sm4.model.tokenize import grid_positions, patchify
from sm4.modules.dense_attention import DenseAttention

MODALITIES = {"image": ("image", (4, 4, 1)), "series": ("sequence", (6, 2)), "table": ("tabular", (3, 1))}
TASKS = {"both": (("image", "series"), 5), "table": (("table",), 1)}


def small_config(**overrides):
    values = dict(latent_tokens=3, width=16, cross_head_dim=8, latent_heads=2, latent_head_dim=8, heads=4,
                  ffn_hidden=16, num_experts=4, top_k=2, num_freq_bands=2, dropout=0.0)
    values.update(overrides)
    return ModelConfig(**values)


def inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(batch, 4, 4, 1, generator=g), "series": torch.randn(batch, 6, 2, generator=g),
            "table": torch.randn(batch, 3, 1, generator=g)}


def test_frequency_schedules_match_the_two_perceiver_codes():
    # perceiver-multi-modality-pytorch: logspace(1, log(max_freq / 2) / log(base), bands, base)
    torch.testing.assert_close(frequencies(4, 16.0, "logspace", 2.0), torch.tensor([2.0, 2.0**(5 / 3), 2.0**(7 / 3), 8.0], dtype=torch.float64))
    torch.testing.assert_close(frequencies(3, 10.0, "linspace"), torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="schedule"):
        frequencies(3, 10.0, "cubic")


def test_fourier_encoding_by_hand():
    p = torch.tensor([[0.5]], dtype=torch.float64)
    encoded = fourier_encode(p, torch.tensor([1.0, 2.0], dtype=torch.float64))
    expected = [math.sin(math.pi * 0.5), math.sin(math.pi), math.cos(math.pi * 0.5), math.cos(math.pi), 0.5]
    torch.testing.assert_close(encoded[0], torch.tensor(expected, dtype=torch.float64))
    two_axes = fourier_encode(torch.tensor([[0.5, -1.0]], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))
    torch.testing.assert_close(two_axes[0], torch.tensor([1.0, 0.0, 0.5, 0.0, -1.0, -1.0], dtype=torch.float64), atol=1e-12, rtol=0)


def test_grid_positions_and_patches():
    torch.testing.assert_close(grid_positions((3,))[:, 0], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    assert grid_positions((2, 3)).shape == (6, 2)
    image = torch.arange(16.0).view(1, 4, 4, 1)
    patches, grid = patchify(image, 2)
    assert grid == (2, 2) and patches.shape == (1, 4, 4)
    torch.testing.assert_close(patches[0, 0], torch.tensor([0.0, 1.0, 4.0, 5.0]))
    with pytest.raises(ValueError, match="does not split"):
        patchify(torch.zeros(1, 5, 4, 1), 2)
    video = torch.arange(2 * 4 * 4 * 3.0).view(1, 2, 4, 4, 3)  # (B, T, H, W, F)
    patches, grid = patchify(video, 2)
    assert grid == (1, 2, 2) and patches.shape == (1, 4, 2 * 2 * 2 * 3)
    # the first patch: frames 0-1, rows 0-1, columns 0-1, all features, in that order
    torch.testing.assert_close(patches[0, 0], video[0, :2, :2, :2].reshape(-1))


def test_video_tokens_have_three_position_axes():
    tokenizer = Tokenizer({"clip": ("video", (2, 4, 4, 3)), "series": ("sequence", (6, 2))}, num_bands=2, max_freq=8.0,
                          patch_size=2)
    assert tokenizer.width == 24 + 3 * 5 + 2
    tokens = tokenizer("clip", torch.rand(2, 2, 4, 4, 3))
    assert tokens.shape == (2, 4, tokenizer.width)
    assert (tokenizer("series", torch.randn(2, 6, 2))[..., 2:24] == 0).all()  # feature padding


def test_tokens_carry_features_padding_positions_and_the_modality_code():
    tokenizer = Tokenizer(MODALITIES, num_bands=2, max_freq=8.0)
    # widths: features max 2; positions max 2 axes x (2 * 2 + 1) = 10; one-hot 3
    assert tokenizer.width == 2 + 10 + 3
    x = inputs()
    tokens = tokenizer("series", x["series"])
    assert tokens.shape == (3, 6, 15)
    torch.testing.assert_close(tokens[..., :2], x["series"])
    assert (tokens[..., 2 + 5:2 + 10] == 0).all()  # the second axis is padding for 1-D positions
    assert (tokens[..., -3:] == torch.tensor([0.0, 1.0, 0.0])).all()
    image_tokens = tokenizer("image", x["image"])
    assert image_tokens.shape == (3, 16, 15) and (image_tokens[..., 1] == 0).all()  # feature padding


def test_published_settings_and_files(tmp_path):
    assert SETTINGS["medium"].model.num_experts == 32 and SETTINGS["small"].model.latent_tokens == 20
    assert SETTINGS["large"].train.weight_decay == 1e-3
    setting = get_setting("medium")
    setting.model.num_experts = 4  # a copy: the published setting is untouched
    assert SETTINGS["medium"].model.num_experts == 32
    path = tmp_path / "setting.json"
    setting.save(str(path))
    assert Setting.load(str(path)) == setting
    path.write_text('{"model": {"num_expert": 3}}')
    with pytest.raises(ValueError, match="unknown model fields \\['num_expert'\\]"):
        Setting.load(str(path))
    with pytest.raises(ValueError, match="top_k"):
        ModelConfig(num_experts=2, top_k=3).validate()


def test_forward_per_task_and_with_one_modality_kept():
    torch.manual_seed(0)
    model = SM4Model(small_config(), MODALITIES, TASKS).eval()
    x = inputs()
    assert model("both", x).shape == (3, 5)
    assert model("table", x).shape == (3, 1)
    assert model("both", x, keep=["series"]).shape == (3, 5)
    assert model.last_token_modality.tolist() == [1] * 3 * 3  # only the series tokens ran
    with pytest.raises(ValueError, match="missing \\['series'\\]"):
        model("both", {"image": x["image"]})
    with pytest.raises(KeyError, match="unknown task"):
        model("nope", x)


def test_per_modality_k_reaches_every_router():
    torch.manual_seed(0)
    model = SM4Model(small_config(), MODALITIES, TASKS).eval()
    model.set_modality_k({"image": 1, "series": 2})
    model("both", inputs())
    layer = model.layers[0]
    for stats in (*layer.self_attn.routing_stats.values(), *layer.ffn.routing_stats.values()):
        # 3 samples x (3 image latents x 1 + 3 series latents x 2)
        assert int(stats["expert_counts"].sum()) == 3 * (3 * 1 + 3 * 2)
    with pytest.raises(ValueError, match="must be in \\[1, top_k=2\\]"):
        model.set_modality_k({"image": 3})


def test_alp_weights_scale_only_the_gradients():
    torch.manual_seed(0)
    model = SM4Model(small_config(), MODALITIES, TASKS).train()
    x = inputs()

    def grads(weights):
        torch.manual_seed(1)
        model.zero_grad()
        model.set_modality_weights(weights)
        out = model("both", x)
        out.square().sum().backward()
        return out.detach(), model.encoder.latents.grad.clone()

    out_plain, grad_plain = grads(None)
    out_ones, grad_ones = grads({"image": 1.0, "series": 1.0, "table": 1.0})
    out_half, grad_half = grads({"image": 0.5, "series": 0.5, "table": 0.5})
    torch.testing.assert_close(out_half, out_plain)  # identity forward
    torch.testing.assert_close(grad_ones, grad_plain)
    assert not torch.allclose(grad_half, grad_plain)


def test_dense_ablation_and_flops():
    torch.manual_seed(0)
    sparse = SM4Model(small_config(), MODALITIES, TASKS).eval()
    dense = SM4Model(small_config(dense=True), MODALITIES, TASKS).eval()
    assert dense.layers[0].ffn is None and isinstance(dense.layers[0].self_attn, DenseAttention)
    from sm4.flops import count_flops

    x = {name: t[:1] for name, t in inputs().items()}
    sparse_flops, dense_flops = count_flops(sparse, "both", x), count_flops(dense, "both", x)
    # equal expert FLOPs by construction; the sparse model adds the routers and top_k-wide Q/K/V
    assert 0.8 < sparse_flops / dense_flops < 1.6
    aux = sm4.collect_aux_loss(sparse)  # the counted forward kept the balancing loss
    assert aux.dim() == 0 and torch.isfinite(aux) and aux > 0


def test_packed_layout_is_the_papers_width_with_the_position_code_after_the_padding():
    mods = {"wide": ("sequence", (4, 10)), "image": ("image", (2, 2, 1))}
    tokenizer = Tokenizer(mods, num_bands=2, max_freq=1.0, layout="packed", bands={"wide": 1})
    # widest features + own position code: wide 10 + 1 * 3, image 1 + 2 * 5 -> 13; one-hot 2
    assert tokenizer.width == 13 + 2 and tokenizer.bands == {"wide": 1, "image": 2}
    tokens = tokenizer("image", torch.rand(3, 2, 2, 1))
    assert (tokens[..., 1:3] == 0).all()  # padding between the pixel and its 10-wide position code
    positions = fourier_encode(grid_positions((2, 2)), frequencies(2, 1.0)).float()
    torch.testing.assert_close(tokens[0, :, 3:13], positions)
    assert (tokens[..., 13] == 0).all() and (tokens[..., 14] == 1).all()
    with pytest.raises(ValueError, match="layout"):
        Tokenizer(mods, num_bands=2, max_freq=1.0, layout="interleaved")


def test_the_papers_encoder_feed_forward_heads_and_dense_baselines():
    from sm4.model.sm4_model import GEGLUFeedForward, dense_shape

    ff = GEGLUFeedForward(64)
    assert [tuple(m.weight.shape) for m in ff if isinstance(m, torch.nn.Linear)] == [(512, 64), (64, 256)]
    model = SM4Model(small_config(encoder_ff="geglu", head_pool="mean"), MODALITIES, TASKS).eval()
    assert model.heads["both"][1].in_features == 2 * 16  # M * C, the papers' head inputs
    assert model("both", inputs()).shape == (3, 5)
    config = small_config(dense=True)
    assert dense_shape(config, sparse_ffn=False) == (32, 1)  # equal FFN FLOPs: top_k * H
    config.dense_kind = "double_depth"
    assert dense_shape(config, sparse_ffn=False) == (16, 2)  # Dense Model 1
    assert len(SM4Model(config, MODALITIES, TASKS).layers) == 2
    config.dense_kind = "wide"
    assert dense_shape(config, sparse_ffn=False) == (64, 1)  # Dense Model 2
    with pytest.raises(ValueError, match="dense_kind"):
        small_config(dense_kind="tall").validate()


def test_the_published_settings_use_the_papers_choices():
    for name in ("small", "medium", "large"):
        model = get_setting(name).model
        assert (model.encoder_ff, model.head_pool, model.token_layout, model.max_freq) == ("geglu", "mean", "packed", 1.0)
    assert get_setting("large").model.freq_bands["affect.text"] == 3
    assert get_setting("large").train.task_batch_size == {"urfunny": 32, "mosei": 32, "mimic": 20, "avmnist": 40}


def test_highmmt_model_runs_and_keeps_one_latent_per_modality_pair():
    from sm4.model.highmmt import HighMMTConfig, HighMMTModel

    config = HighMMTConfig(latent_tokens=3, width=16, latent_heads=2, cross_heads=2, head_dim=8, num_freq_bands=2)
    model = HighMMTModel(config, MODALITIES, TASKS).eval()
    assert model.heads["both"][1].in_features == 2 * 16  # pairs (image, series), (series, image)
    assert model("both", inputs()).shape == (3, 5) and model("table", inputs()).shape == (3, 1)
    untied = HighMMTModel(HighMMTConfig(**{**config.__dict__, "tied_cross": False}), MODALITIES, TASKS)
    assert len(untied.cross_blocks) == 2 and len(model.cross_blocks) == 1
