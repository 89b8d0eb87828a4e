"""Attention rollout: the maths against a numpy reference, known attention on steered models, one real forward per
model source (logits, shapes, no mutation), and the model view / PNG overlay."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pytest
import timm
import torch
from matplotlib import colormaps
from PIL import Image
from timm.models.vision_transformer import ResPostBlock
from torch import nn
from torchvision.models import resnet18
from torchvision.models.vision_transformer import VisionTransformer

from app.pipeline.overlay import INFERNO, model_view, overlay_png
from app.pipeline.preprocess import IMAGENET_MEAN, IMAGENET_STD
from app.sources.attention import Attentions, rollout
from app.sources.base import ModelSource
from app.sources.hf_models import HuggingFaceSource, LogitsOf
from app.sources.timm_models import TimmSource
from app.sources.torchvision_models import TorchvisionSource
from tests.support.fakes import steered_vit, tiny_hf_vit

TORCHVISION, HUGGING_FACE, TIMM = TorchvisionSource(), HuggingFaceSource(), TimmSource()


def attentions(source: ModelSource, module: nn.Module, pixels: torch.Tensor) -> Attentions:
    """One forward through the attention reader `source` gives for `module`."""
    reader = source.attention(module)
    assert reader is not None, f"{type(source).__name__} cannot read the attention of a {type(module).__name__}"
    return reader(pixels)


# ---------------------------------------------------------------------------------------------------- rollout maths


def numpy_rollout(layers: list[np.ndarray], prefix: int, grid: tuple[int, int], residual: float) -> np.ndarray:
    """The paper's recipe written out one image at a time, in numpy."""
    maps = []
    for image in range(layers[0].shape[0]):
        tokens = layers[0].shape[-1]
        joint = np.eye(tokens)
        for weights in layers:
            mixed = residual * np.eye(tokens) + (1 - residual) * weights[image].mean(axis=0)
            mixed = mixed / mixed.sum(axis=1, keepdims=True)
            joint = mixed @ joint
        row = joint[0, prefix:]
        maps.append((row / row.sum()).reshape(grid))
    return np.stack(maps)


def test_rollout_of_hand_made_attention() -> None:
    # T = 3 (class token + a 1x2 grid), 2 layers of 2 heads. Head means and residual 0.5:
    # Ã1 = [[.5, .25, .25], [0, 1, 0], [0, 0, 1]], Ã2 = [[.5, .5, 0], [.5, .5, 0], [0, 0, 1]]
    # row 0 of Ã2·Ã1 = [.25, .625, .125] -> patches [5/6, 1/6]  (Ã1·Ã2, the wrong order, would give [.6, .4])
    layer1 = torch.tensor([[[0, 1, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [0, 0, 1]]], dtype=torch.float32)
    layer2 = torch.tensor([[[0, 1, 0], [1, 0, 0], [0, 0, 1]]] * 2, dtype=torch.float32)
    maps = rollout([layer1[None], layer2[None]], 1, (1, 2))
    assert maps.dtype == torch.float32
    torch.testing.assert_close(maps, torch.tensor([[[5 / 6, 1 / 6]]]))
    layers = [layer1[None].numpy(), layer2[None].numpy()]
    np.testing.assert_allclose(numpy_rollout(layers, 1, (1, 2), 0.5), [[[5 / 6, 1 / 6]]])


@pytest.mark.parametrize(("residual", "row_error"), [(0.0, 0.0), (0.3, 0.0), (0.5, 0.0), (0.9, 0.0), (0.5, 0.1)])
def test_rollout_matches_the_numpy_reference(residual: float, row_error: float) -> None:
    rng = np.random.default_rng(0)
    prefix, grid = 2, (2, 3)  # class token + one register
    tokens = prefix + grid[0] * grid[1]
    scores = rng.normal(size=(3, 2, 4, tokens, tokens)) * 3  # 3 layers of (n=2, heads=4, T, T)
    layers = np.exp(scores) / np.exp(scores).sum(axis=-1, keepdims=True)
    # rows off from 1 (as half-precision weights can be) are renormalized after the residual is mixed in
    layers = list(layers * rng.uniform(1 - row_error, 1 + row_error, size=(*layers.shape[:-1], 1)))
    maps = rollout([torch.from_numpy(w).float() for w in layers], prefix, grid, residual=residual)
    assert maps.shape == (2, *grid)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(2))
    np.testing.assert_allclose(maps.numpy(), numpy_rollout(layers, prefix, grid, residual), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("layers", "prefix", "grid", "residual"),
    [
        ([], 1, (1, 2), 0.5),  # no layers
        ([torch.full((1, 2, 3, 3), 1 / 3)], 1, (2, 2), 0.5),  # 3 tokens are not 1 + 2x2
        ([torch.full((1, 2, 3, 3), 1 / 3)], 0, (1, 3), 0.5),  # no class token
        ([torch.full((1, 2, 3, 3), 1 / 3)], 1, (1, 2), 1.0),  # all residual: no attention left
        ([torch.full((1, 2, 3, 3), 1 / 3), torch.full((1, 2, 4, 4), 1 / 4)], 1, (1, 2), 0.5),  # ragged layers
    ],
)
def test_rollout_rejects_what_it_cannot_roll_out(
    layers: list[torch.Tensor], prefix: int, grid: tuple[int, int], residual: float
) -> None:
    with pytest.raises(ValueError):
        rollout(layers, prefix, grid, residual=residual)


# ------------------------------------------------------------------- known attention: a steered torchvision ViT


@pytest.mark.parametrize("spike", [(1, 3), (2, 0)])
def test_attention_to_one_patch_puts_the_map_on_that_patch(spike: tuple[int, int]) -> None:
    vit = steered_vit(spike)
    found = attentions(TORCHVISION, vit, torch.randn(2, 3, 32, 32))
    assert found.grid == (4, 4) and found.prefix_tokens == 1
    target = 1 + spike[0] * 4 + spike[1]
    for weights in found.layers:
        assert weights.shape == (2, 2, 17, 17)
        assert (weights[..., target] > 0.999).all()  # every head of every token looks at the spike
    maps = rollout(found.layers, found.prefix_tokens, found.grid)
    assert (maps[:, spike[0], spike[1]] > 0.999).all()
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(2))


def test_uniform_attention_gives_a_uniform_map() -> None:
    found = attentions(TORCHVISION, steered_vit(None), torch.randn(2, 3, 32, 32))
    for weights in found.layers:
        torch.testing.assert_close(weights, torch.full((2, 2, 17, 17), 1 / 17))
    torch.testing.assert_close(rollout(found.layers, 1, found.grid), torch.full((2, 4, 4), 1 / 16))


# ------------------------------------------------------------------------------- one real forward per model source


def hf_vit(attn_implementation: str = "sdpa") -> LogitsOf:
    return LogitsOf(tiny_hf_vit(attn_implementation=attn_implementation))


def timm_vit(name: str = "vit_tiny_patch16_224", **kwargs: Any) -> nn.Module:
    small = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    module: nn.Module = timm.create_model(name, pretrained=False, num_classes=10, **{**small, **kwargs})
    return module


@dataclass(frozen=True)
class Source:
    library: ModelSource
    build: Callable[[], nn.Module]
    size: tuple[int, int]  # (h, w) of the input
    layers: int
    heads: int
    prefix: int
    grid: tuple[int, int]


SOURCES = {
    "torchvision": Source(
        TORCHVISION, lambda: VisionTransformer(32, 8, 3, 2, 32, 64, num_classes=10), (32, 32), 3, 2, 1, (4, 4)
    ),
    "hf": Source(HUGGING_FACE, hf_vit, (32, 32), 2, 2, 1, (4, 4)),
    "hf-eager": Source(HUGGING_FACE, lambda: hf_vit("eager"), (32, 32), 2, 2, 1, (4, 4)),
    "timm": Source(TIMM, timm_vit, (32, 32), 2, 2, 1, (4, 4)),
    "timm-registers": Source(
        TIMM, lambda: timm_vit(reg_tokens=3, no_embed_class=True, qk_norm=True, num_heads=4), (32, 32), 2, 4, 4, (4, 4)
    ),
    "timm-distilled": Source(TIMM, lambda: timm_vit("deit_tiny_distilled_patch16_224"), (32, 32), 2, 2, 2, (4, 4)),
    "timm-res-post": Source(TIMM, lambda: timm_vit(block_fn=ResPostBlock), (32, 32), 2, 2, 1, (4, 4)),
    "timm-dynamic-size": Source(TIMM, lambda: timm_vit(dynamic_img_size=True), (40, 24), 2, 2, 1, (5, 3)),
}


M = TypeVar("M", bound=nn.Module)


def randomized(module: M) -> M:
    """Every parameter random (torchvision starts its head at zero, which would make equal logits vacuous)."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(std=0.3)
    return module.eval()


HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def settings_of(module: nn.Module) -> dict[str, Any]:
    """Every submodule's hooks, plain attributes (flags such as `training`, `fused_attn`) and config."""
    found: dict[str, Any] = {
        "<global>": [len(getattr(torch.nn.modules.module, name, {})) for name in GLOBAL_HOOKS],
    }
    for name, sub in module.named_modules():
        plain = {k: v for k, v in vars(sub).items() if isinstance(v, bool | int | float | str | tuple | None)}
        config: Any = getattr(sub, "config", None)
        found[name] = (
            plain,
            [len(getattr(sub, hook, {})) for hook in HOOKS],
            config.to_dict() if hasattr(config, "to_dict") else None,
        )
    return found


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_the_settings_snapshot_sees_hooks_and_flags() -> None:
    module = timm_vit()
    before = settings_of(module)
    hooked, flagged = copy.deepcopy(module), copy.deepcopy(module)
    assert settings_of(hooked) == before
    hooked.get_submodule("blocks.0.attn").register_forward_hook(lambda *_: None)
    attention: Any = flagged.get_submodule("blocks.1.attn")  # `fused_attn` is a `Final` flag timm never flips
    attention.fused_attn = not attention.fused_attn
    assert settings_of(hooked) != before
    assert settings_of(flagged) != before


@pytest.mark.parametrize("name", SOURCES)
def test_attentions_are_the_models_own_forward(name: str) -> None:
    source = SOURCES[name]
    torch.manual_seed(0)
    module = randomized(source.build())
    reader = source.library.attention(module)
    assert reader is not None
    pixels = torch.randn(3, 3, *source.size)
    settings, state = settings_of(module), state_of(module)

    found = reader(pixels)

    assert settings_of(module) == settings
    assert_same_state(state, state_of(module))
    with torch.inference_mode():
        expected = module(pixels)
    assert found.logits.dtype == torch.float32
    assert found.logits.std() > 0.01  # not all-equal logits
    torch.testing.assert_close(found.logits, expected, rtol=1e-5, atol=1e-6)
    assert (found.prefix_tokens, found.grid, len(found.layers)) == (source.prefix, source.grid, source.layers)
    tokens = source.prefix + source.grid[0] * source.grid[1]
    for weights in found.layers:
        assert weights.shape == (3, source.heads, tokens, tokens)
        assert weights.dtype == torch.float32
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(dim=-1), torch.ones(3, source.heads, tokens))
    maps = rollout(found.layers, found.prefix_tokens, found.grid)
    assert maps.shape == (3, *source.grid)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(3))
    assert not torch.allclose(maps[0], maps[1])  # each image gets its own map


def test_hf_weights_are_the_libraries_own() -> None:
    torch.manual_seed(0)
    module = randomized(hf_vit("eager"))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        reference = module.model(pixel_values=pixels, output_attentions=True).attentions
    found = attentions(HUGGING_FACE, module, pixels)
    assert len(reference) == len(found.layers)
    for ours, theirs in zip(found.layers, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{}, {"qk_norm": True, "reg_tokens": 2}])
def test_timm_weights_are_the_libraries_own(kwargs: dict[str, Any]) -> None:
    torch.manual_seed(0)
    module = randomized(timm_vit(**kwargs))
    pixels = torch.randn(2, 3, 32, 32)
    found = attentions(TIMM, module, pixels)
    unfused: Any = copy.deepcopy(module)  # timm's own softmax is only visible on its unfused path
    reference: list[torch.Tensor] = []
    for block in unfused.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda _module, _inputs, output: reference.append(output))
    with torch.inference_mode():
        unfused(pixels)
    assert len(reference) == len(found.layers)
    for ours, theirs in zip(found.layers, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["torchvision", "hf", "timm"])
def test_half_precision_models_give_float32(name: str) -> None:
    source = SOURCES[name]
    torch.manual_seed(0)
    module = randomized(source.build()).to(torch.bfloat16)
    pixels = torch.randn(2, 3, *source.size)
    found = attentions(source.library, module, pixels)
    with torch.inference_mode():
        expected = module(pixels.to(torch.bfloat16)).float()
    assert found.logits.dtype == torch.float32 and all(w.dtype == torch.float32 for w in found.layers)
    torch.testing.assert_close(found.logits, expected, rtol=1e-2, atol=1e-2)


class ReplacedForward(VisionTransformer):  # type: ignore[misc]  # torchvision ships no type information
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        doubled: torch.Tensor = super().forward(x) * 2
        return doubled


@pytest.mark.parametrize(
    "build",
    [
        lambda: nn.Linear(4, 2),
        lambda: resnet18(num_classes=10),
        lambda: LogitsOf(nn.Linear(4, 2)),
        lambda: ReplacedForward(32, 8, 2, 2, 16, 32, num_classes=10),  # a forward rollout cannot replay
        lambda: timm_vit(global_pool="avg"),  # classified from the patch average, not the class token
        lambda: timm_vit(class_token=False, global_pool="avg"),
    ],
    ids=["linear", "resnet", "hf-non-vit", "torchvision-subclass", "timm-avg-pool", "timm-no-class-token"],
)
def test_unsupported_modules_are_refused(build: Callable[[], nn.Module]) -> None:
    module = build().eval()
    assert all(source.attention(module) is None for source in (TORCHVISION, HUGGING_FACE, TIMM))


def test_pixels_must_be_a_batch() -> None:
    with pytest.raises(ValueError, match="n, 3, h, w"):
        attentions(TIMM, timm_vit(), torch.randn(3, 32, 32))


# --------------------------------------------------------------------------------------- model view and PNG overlay


def test_model_view_inverts_the_normalization() -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (image.float() / 255 - mean) / std
    view = model_view(pixels, IMAGENET_MEAN, IMAGENET_STD)
    assert view.dtype == torch.uint8 and view.shape == (3, 20, 30)
    assert (view.int() - image.int()).abs().max() <= 1
    assert model_view(torch.full((3, 2, 2), 50.0), IMAGENET_MEAN, IMAGENET_STD).eq(255).all()  # clamped
    assert model_view(torch.full((3, 2, 2), -50.0), IMAGENET_MEAN, IMAGENET_STD).eq(0).all()


def decode(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image).astype(int)  # (h, w, 3)


def test_overlay_colours_hot_patches_hot() -> None:
    view = torch.full((3, 40, 60), 128, dtype=torch.uint8)
    heat = torch.zeros(4, 6)  # patches of 10x10 pixels
    heat[1:3, 4:6] = 0.2  # only relative heat matters: it is divided by its max
    pixels = decode(overlay_png(view, heat, alpha=0.5))
    assert pixels.shape == (40, 60, 3)
    hot, cold = pixels[20, 50], pixels[0, 0]
    np.testing.assert_allclose(hot, 0.5 * 128 + 0.5 * np.array(INFERNO[-1]), atol=1)  # pale yellow over grey
    np.testing.assert_allclose(cold, 0.5 * 128 + 0.5 * np.array(INFERNO[0]), atol=1)  # near black over grey
    assert hot.sum() > cold.sum() + 150
    assert hot[0] > hot[2] and cold[2] >= cold[0]  # warm where hot, not where cold


def test_overlay_is_the_colormap_at_full_alpha_and_the_view_at_none() -> None:
    view = torch.tensor([[[10, 20, 30]], [[40, 50, 60]], [[70, 80, 90]]], dtype=torch.uint8)  # (3, 1, 3)
    heat = torch.tensor([[0.0, 0.5, 1.0]])  # same size as the view: no resampling
    coloured = decode(overlay_png(view, heat, alpha=1.0))[0]
    between = (np.array(INFERNO[4]) + np.array(INFERNO[5])) / 2  # 0.5 lies halfway between anchors 4 and 5 of 10
    np.testing.assert_allclose(coloured, [INFERNO[0], between, INFERNO[-1]], atol=1)
    np.testing.assert_array_equal(decode(overlay_png(view, heat, alpha=0.0))[0], view[:, 0].T.numpy())
    flat = decode(overlay_png(view, torch.zeros(1, 3), alpha=1.0))[0]  # no heat anywhere: all the coldest colour
    np.testing.assert_array_equal(flat, [INFERNO[0]] * 3)


def test_overlay_colormap_follows_matplotlibs_inferno() -> None:
    levels = np.linspace(0, 1, 101)
    ours = decode(overlay_png(torch.zeros(3, 1, 101, dtype=torch.uint8), torch.from_numpy(levels)[None], alpha=1))
    theirs = colormaps["inferno"](levels)[:, :3] * 255
    assert np.abs(ours[0] - theirs).max() < 12
