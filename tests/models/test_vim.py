"""Model structure, initialisation, timm interface, resolution handling and input checks."""
import pytest
import timm
import torch

import visionmamba
from helpers import assert_close, tiny_vim
from visionmamba.models.pos_embed import pos_embed_resample

PARAM_COUNTS = {
    "vim_tiny_patch16_224": 7_148_008,
    "vim_tiny_patch16_stride8_224": 7_250_344,
    "vim_small_patch16_224": 25_796_584,
    "vim_small_patch16_stride8_224": 26_001_256,
    "vim_base_patch16_224": 97_598_440,
}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts_and_official_key_layout(name):
    model = visionmamba.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]
    state = model.state_dict()
    assert len(state) == 415  # 6 + 24 * 17 + 1 tensors, no buffers
    assert list(state)[:10] == [
        "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "head.weight", "head.bias",
        "layers.0.mixer.A_log", "layers.0.mixer.D", "layers.0.mixer.A_b_log", "layers.0.mixer.D_b",
    ]
    dim = model.embed_dim
    inner, rank = 2 * dim, -(-dim // 16)
    assert state["layers.3.mixer.x_proj_b.weight"].shape == (rank + 32, inner)
    assert state["layers.3.mixer.dt_proj.weight"].shape == (inner, rank)
    assert state["layers.3.mixer.conv1d_b.weight"].shape == (inner, 1, 4)
    assert state["layers.3.mixer.in_proj.weight"].shape == (2 * inner, dim)
    grid = 27 if "stride8" in name else 14
    assert state["pos_embed"].shape == (1, grid * grid + 1, dim)


def test_official_initialisation_statistics():
    """Checksums of the official init (torch.manual_seed(0)), derived from the official fixture."""
    torch.manual_seed(0)
    state = visionmamba.create_model("vim_tiny_patch16_224").state_dict()
    total = sum(v.double().sum().item() for v in state.values())
    absolute = sum(v.double().abs().sum().item() for v in state.values())
    assert total == pytest.approx(546297.2350816997, rel=1e-6)
    assert absolute == pytest.approx(851737.0124984712, rel=1e-6)
    for key, expected in {
        "patch_embed.proj.weight": 4358.776689681581,
        "head.weight": 3058.9580315541825,
        "pos_embed": 602.7611117205306,
        "layers.0.mixer.dt_proj.bias": 1741.7196731567383,
        "layers.23.mixer.out_proj.weight": 384.3346081774034,
    }.items():
        assert state[key].double().abs().sum().item() == pytest.approx(expected, rel=1e-5), key
    assert torch.all(state["layers.0.mixer.dt_proj_b.bias"] == 0)  # official quirk, kept
    assert torch.equal(state["layers.5.mixer.A_b_log"][7], torch.log(torch.arange(1.0, 17.0)))


def test_timm_interface_shapes():
    model = tiny_vim().eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, 17, 32)
    feature = model.forward_head(tokens, pre_logits=True)
    assert torch.equal(feature, tokens[:, 8])  # the middle token, M // 2 = 8
    assert model(x).shape == (3, 10)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    groups = model.group_matcher()
    assert "stem" in groups and "blocks" in groups
    model.reset_classifier(5)
    assert model(x).shape == (3, 5)
    model.reset_classifier(0)
    assert model(x).shape == (3, 32)
    with pytest.raises(AssertionError, match="global_pool"):  # timm's convention for an unsupported pool
        model.reset_classifier(3, global_pool="max")


def test_forward_intermediates_formats_and_class_token():
    model = tiny_vim(depth=3).eval()
    x = torch.randn(2, 3, 32, 48)  # non-square: 4 x 6 grid
    final, maps = model.forward_intermediates(x)
    assert torch.allclose(final, model.forward_features(x), atol=1e-6)
    assert [m.shape for m in maps] == [(2, 32, 4, 6)] * 3
    pairs = model.forward_intermediates(x, indices=[0, 2], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
    assert [(t.shape, c.shape) for t, c in pairs] == [((2, 24, 32), (2, 1, 32))] * 2
    # The class token is removed from the maps and returned separately; the last normed one is the feature.
    normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True, return_prefix_tokens=True)
    assert torch.allclose(normed[0][1][:, 0], model.forward_head(final, pre_logits=True), atol=1e-6)
    assert torch.allclose(normed[0][0].flatten(2).transpose(1, 2), torch.cat([final[:, :12], final[:, 13:]], 1), atol=1e-6)
    early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    assert torch.allclose(early[0], maps[0])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_features_only_through_timm():
    model = timm.create_model("vim_tiny_patch16_224", features_only=True, out_indices=(1, 3), depth=4, img_size=64)
    maps = model(torch.randn(1, 3, 64, 64))
    assert [m.shape for m in maps] == [(1, 192, 4, 4)] * 2
    assert len(model.model.layers) == 4


def test_grad_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = tiny_vim(depth=3)
    x = torch.randn(2, 3, 32, 32)

    def grads(enable):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=0, atol=1e-7), name


def test_checkpointing_really_recomputes(monkeypatch):
    model = tiny_vim(depth=2)
    model.set_grad_checkpointing(True)
    calls = []
    original = type(model.layers[0].mixer).forward
    monkeypatch.setattr(type(model.layers[0].mixer), "forward", lambda self, h: calls.append(1) or original(self, h))
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    assert len(calls) == 4  # 2 blocks, each forward run again during backward


def test_pos_embed_resample_identity_and_class_row():
    table = torch.randn(1, 197, 8)
    assert pos_embed_resample(table, (14, 14), (14, 14)) is table
    bigger = pos_embed_resample(table, (14, 14), (16, 16))
    assert bigger.shape == (1, 257, 8)
    assert torch.equal(bigger[:, 128], table[:, 98])  # class row moves to the new middle unchanged
    patches = torch.cat([table[:, :98], table[:, 99:]], 1).reshape(1, 14, 14, 8)
    grid = torch.cat([bigger[:, :128], bigger[:, 129:]], 1).reshape(1, 16, 16, 8)
    assert torch.allclose(grid[0, 0, 0], patches[0, 0, 0], atol=0.5)  # corners stay near corners
    back = pos_embed_resample(table, (14, 14), (14, 14))
    assert torch.equal(back, table)
    # Resampling a constant patch grid keeps it constant; the class row is never mixed in.
    flat = torch.ones(1, 197, 4)
    flat[:, 98] = 100.0
    out = pos_embed_resample(flat, (14, 14), (20, 10))
    assert torch.allclose(torch.cat([out[:, :100], out[:, 101:]], 1), torch.ones(1, 200, 4), atol=1e-5)
    assert torch.equal(out[:, 100], flat[:, 98])
    with pytest.raises(ValueError, match="rows"):
        pos_embed_resample(table, (10, 10), (14, 14))


def test_img_size_argument_and_dynamic_resolution():
    model = visionmamba.create_model("vim_tiny_patch16_224", img_size=256)
    assert model.pos_embed.shape == (1, 257, 192)
    small = tiny_vim().eval()
    x = torch.randn(1, 3, 48, 40)
    tokens = small.forward_features(x)
    assert tokens.shape == (1, 31, 32)
    expected = pos_embed_resample(small.pos_embed, (4, 4), (6, 5))
    big = tiny_vim(img_size=(48, 40)).eval()
    big.load_state_dict({**small.state_dict(), "pos_embed": expected})
    assert torch.allclose(big.forward_features(x), tokens, atol=1e-6)
    fixed = tiny_vim(dynamic_img_size=False)
    with pytest.raises(ValueError, match="expected input size 32x32, got 48x40"):
        fixed(x)


def test_stride8_grid():
    model = tiny_vim(patch_size=8, stride=4, img_size=32)  # grid (32 - 8) // 4 + 1 = 7
    assert model.pos_embed.shape == (1, 50, 32)
    assert model.forward_features(torch.randn(1, 3, 36, 32)).shape == (1, 8 * 7 + 1, 32)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, 32, 32), "4-D"),
        ((1, 1, 32, 32), "expected 3 input channels"),
        ((1, 3, 30, 32), "divisible by 8"),
        ((1, 3, 29, 32), r"the nearest that fits: 32x32\)"),  # a size that fits, not the rejected one
        ((1, 3, 4, 32), ">= 8"),
    ],
)
def test_bad_input_raises_value_error(shape, message):
    with pytest.raises(ValueError, match=message):
        tiny_vim()(torch.randn(*shape))


def test_constructor_rejects_unknown_arguments():
    with pytest.raises(TypeError):
        visionmamba.VisionMamba(if_devide_out=True)  # the official typo no longer disappears silently
    with pytest.raises(ValueError, match="stride"):
        tiny_vim(stride=16)


def test_drop_path_schedule():
    model = visionmamba.create_model("vim_tiny_patch16_224", drop_path_rate=0.23)
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for block in model.layers]
    assert rates[0] == 0.0 and rates[1] == 0.0  # block 1 drops mixer 0's output, rate dpr[0] = 0
    assert rates[2] == pytest.approx(0.01) and rates[23] == pytest.approx(0.22)
    assert model.drop_path.drop_prob == pytest.approx(0.23)


def test_bfloat16_autocast_runs_with_fp32_residual():
    model = tiny_vim().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()


def test_compiled_model_trains_at_two_sizes_with_dynamic_false():
    """The docs' advice (timm.md) for training a compiled model at several resolutions: one graph per size."""
    torch.manual_seed(0)
    model = tiny_vim()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    for shape in [(2, 3, 32, 32), (2, 3, 32, 40)]:
        x = torch.randn(*shape)
        out = compiled(x)
        assert_close(out, model(x), atol=1e-5, name=f"compiled at {shape[-2:]}")
        out.sum().backward()


def test_torch_compile_fullgraph_on_the_default_cpu_kernels():
    """The C++ kernels are custom ops: one graph, the eager outputs and gradients (golden tolerances)."""
    torch.manual_seed(0)
    model = tiny_vim()
    x = torch.randn(2, 3, 32, 40)
    compiled, eager = torch.compile(model, fullgraph=True)(x), model(x)
    assert_close(compiled, eager, atol=1e-4, name="compiled forward")
    for got, want in zip(torch.autograd.grad(compiled.square().sum(), list(model.parameters())),
                         torch.autograd.grad(eager.square().sum(), list(model.parameters()))):
        assert_close(got, want, rtol_max=1e-4, atol=1e-7, name="compiled gradient")


def test_torch_export_keeps_the_kernels_as_ops_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = tiny_vim().eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"visionmamba.conv_silu.default", "visionmamba.bi_scan.default"} <= ops
    assert not any(op.startswith("visionmamba.") and "rms_norm" in op for op in ops)  # plain operators on the CPU
    assert "visionmamba.mixer_core.default" not in ops  # eager inference only
    torch.export.save(program, tmp_path / "vim.pt2")
    loaded = torch.export.load(tmp_path / "vim.pt2").module()
    with torch.no_grad():
        assert_close(loaded(x), model(x), atol=1e-5, name="exported")


def test_torchscript_gives_the_eager_outputs():
    torch.manual_seed(0)
    model = tiny_vim().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(torch.jit.script(model)(x), model(x), atol=1e-6, name="scripted")


def test_factory_device_dtype_and_meta_then_init_weights_equal_a_direct_build():
    torch.manual_seed(0)
    direct = tiny_vim(depth=3, num_classes=5)
    meta = tiny_vim(depth=3, num_classes=5, device="meta", dtype=torch.float64)
    assert {(p.device.type, p.dtype) for p in meta.parameters()} == {("meta", torch.float64)}
    rebuilt = meta.to_empty(device="cpu").float()
    torch.manual_seed(0)
    rebuilt.init_weights()
    for (name, a), b in zip(direct.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.device("meta"):
        assert tiny_vim(depth=2).pos_embed.device.type == "meta"


def test_reset_classifier_follows_the_model_and_global_pool_avg():
    model = tiny_vim().double().eval()
    model.reset_classifier(5)
    assert model.head.weight.dtype == torch.float64 and not model.head.training and model.num_classes == 5
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    tokens = model.forward_features(x)
    model.reset_classifier(5, global_pool="avg")
    pooled = model.forward_head(tokens, pre_logits=True)
    assert torch.allclose(pooled, torch.cat([tokens[:, :8], tokens[:, 9:]], 1).mean(1))
    avg = visionmamba.create_model("vim_tiny_patch16_224", depth=1, global_pool="avg")
    assert avg.global_pool == "avg" and avg.head_hidden_size == 192 and avg.in_chans == 3
    with pytest.raises(AssertionError, match="global_pool"):
        visionmamba.create_model("vim_tiny_patch16_224", depth=1, global_pool="max")


def test_one_channel_model_takes_rgb_weights(tmp_path):
    torch.manual_seed(0)
    rgb = tiny_vim()
    torch.save({"model": rgb.state_dict()}, tmp_path / "rgb.pth")
    grey = tiny_vim(in_chans=1)
    visionmamba.load_checkpoint(grey, tmp_path / "rgb.pth")
    assert torch.allclose(grey.patch_embed.proj.weight, rgb.patch_embed.proj.weight.sum(1, keepdim=True))


def test_set_scan_backend_reaches_every_mixer():
    model = tiny_vim(depth=3)
    model.set_scan_backend("chunked")
    assert {block.mixer.scan_backend for block in model.layers} == {"chunked"}
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        model.set_scan_backend("fast")
