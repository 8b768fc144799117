"""GoogLeNet (torchvision's ``googlenet``) with its weights: ImageNet, a local file, or random.

``weights``:
  * ``imagenet``: torchvision's ImageNet weights, from torch's hub cache. Downloaded on a machine with
    internet; offline and not cached, a clear error says which file to fetch and where to put it.
  * ``auto``: ImageNet weights when they are in the cache, else random initialisation (logged, and
    recorded as what was actually loaded, so caches keyed on it never mix the two).
  * ``none``: random initialisation (seeded by ``seed``).
  * a path: a state dict, or a checkpoint of this project holding one under ``"backbone"``/``"model"``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import GoogLeNet, GoogLeNet_Weights, googlenet

__all__ = ["BackboneError", "LoadedWeights", "build_googlenet", "googlenet_from_state", "imagenet_weights_path", "resolve_weights"]

log = logging.getLogger("features.backbone")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(RuntimeError):
    """Weights that cannot be found or loaded."""


@dataclass(frozen=True)
class LoadedWeights:
    """What ``weights`` resolved to: ``kind`` in {imagenet, none, file} and its identity for cache keys."""

    kind: str
    path: str | None = None
    stamp: str | None = None  # size and mtime of the file, so a replaced file changes cache keys

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "stamp": self.stamp}


def imagenet_weights_path() -> Path:
    """Where torchvision keeps (or would download) the GoogLeNet ImageNet weights."""
    url = GoogLeNet_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


# How random weights are drawn (part of every cache key made from them). torchvision's own GoogLeNet
# init (truncated normal, std 0.01) shrinks activations ~3x per layer: the pooled features of a random
# network come out near 1e-12, zero in float16. He (Kaiming) init keeps their scale; a fixed seed makes
# "random" the same network in every process, so a resumed stage computes with the same weights.
RANDOM_INIT = "kaiming_normal(fan_in, relu), seed 0"
RANDOM_INIT_SEED = 0


def random_init(model: nn.Module) -> nn.Module:
    """Re-draw ``model``'s weights: He-normal convolutions, small-normal linear layers, unit BatchNorm."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return model


def resolve_weights(weights: str) -> LoadedWeights:
    """Decide what ``weights`` means here, without loading anything."""
    if weights == "none":
        return LoadedWeights("none", None, RANDOM_INIT)
    if weights in ("imagenet", "auto"):
        path = imagenet_weights_path()
        if path.exists():
            return LoadedWeights("imagenet", str(path), _stamp(path))
        if weights == "auto":
            _warn_once(
                "ImageNet weights for GoogLeNet are not in %s: using random initialisation "
                "(backbone.weights=imagenet on a machine with internet downloads them)", path.parent
            )
            return LoadedWeights("none", None, RANDOM_INIT)
        return LoadedWeights("imagenet", str(path), None)  # downloaded (or refused) when loaded
    path = Path(weights)
    if not path.is_file():
        raise BackboneError(f"{path}: backbone weights file not found (backbone.weights=imagenet|auto|none|PATH)")
    return LoadedWeights("file", str(path.resolve()), _stamp(path))


_warned: set[str] = set()


def _warn_once(msg: str, *args) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg, *args)


def _download_imagenet() -> dict:
    w = GoogLeNet_Weights.IMAGENET1K_V1
    try:
        return w.get_state_dict(progress=True, check_hash=False)
    except Exception as e:  # URLError, socket errors, ...: no internet here
        raise BackboneError(
            f"could not download GoogLeNet's ImageNet weights ({type(e).__name__}: {e}). On a machine with "
            f"internet, fetch {w.url} and put it at {imagenet_weights_path()}, or pass "
            "backbone.weights=PATH to a state dict, or backbone.weights=none for random initialisation."
        ) from e


def _state_dict_from_file(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BackboneError(f"{path}: not a readable torch state dict ({e})") from e
    for key in ("backbone", "model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise BackboneError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def build_googlenet(weights: str | LoadedWeights = "none") -> tuple[GoogLeNet, LoadedWeights]:
    """GoogLeNet without auxiliary heads; ``model.fc`` maps the 1024-d pooled feature to 1000 logits.

    Input: ImageNet-normalised RGB (mean ``IMAGENET_MEAN``, std ``IMAGENET_STD``).
    Returns the model (eval mode) and what its weights resolved to.
    """
    loaded = weights if isinstance(weights, LoadedWeights) else resolve_weights(weights)
    model = googlenet(weights=None, aux_logits=False, init_weights=False, transform_input=False)
    if loaded.kind == "none":
        random_init(model)
    elif loaded.kind == "imagenet":
        path = Path(loaded.path)
        state = _state_dict_from_file(str(path)) if path.exists() else _download_imagenet()
        # torchvision's ImageNet GoogLeNet was trained on inputs transformed to its own normalisation.
        model.transform_input = True
        state = {k: v for k, v in state.items() if not k.startswith("aux")}
        _load(model, state, str(path))
    elif loaded.kind == "file":
        _load(model, _state_dict_from_file(loaded.path), loaded.path)
    return model.eval(), loaded


def googlenet_from_state(state: dict, transform_input: bool = False) -> GoogLeNet:
    """GoogLeNet (eval mode) from a state dict held in memory, e.g. a detector file's backbone."""
    model = googlenet(weights=None, aux_logits=False, init_weights=False, transform_input=transform_input)
    _load(model, state, "state dict")
    return model.eval()


def _load(model: nn.Module, state: dict, source: str) -> None:
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    if not any(k.startswith("fc.") for k in state):  # features only: the ImageNet classifier is not needed
        state = {**state, **{k: v for k, v in own.items() if k.startswith("fc.")}}
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"shape mismatch at {wrong[:3]}"
        raise BackboneError(f"{source}: not GoogLeNet weights ({detail})")
    model.load_state_dict({k: state[k] for k in own}, strict=True)


@torch.no_grad()
def fold_batchnorm(model: GoogLeNet) -> GoogLeNet:
    """A copy for inference with every BatchNorm folded into the convolution before it.

    ``w' = w * g / sqrt(v + eps)``, ``b' = beta - mean * g / sqrt(v + eps)``: the same outputs (to
    float rounding) with one pass over memory less per layer. Only for eval mode: the statistics are
    frozen into the weights.
    """
    import copy

    from torchvision.models.googlenet import BasicConv2d

    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if isinstance(module, BasicConv2d) and isinstance(module.bn, nn.BatchNorm2d):
            conv, bn = module.conv, module.bn
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            fused = nn.Conv2d(
                conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, bias=True,
            )  # fmt: skip
            fused.weight.copy_(conv.weight * scale[:, None, None, None])
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            fused.bias.copy_(bn.bias + (bias - bn.running_mean) * scale)
            module.conv, module.bn = fused, nn.Identity()
    return folded


def trunk(model: GoogLeNet) -> nn.Module:
    """The network up to the 1024-d global average pool (``fc`` replaced by identity, dropout off)."""
    model.fc = nn.Identity()
    model.dropout = nn.Identity()
    return model
