"""GoogLeNet (torchvision's ``googlenet``) with its weights: ImageNet, a local file, or random.

``weights``:
  * ``imagenet``: torchvision's ImageNet weights, from torch's hub cache. Downloaded on a machine with
    internet; offline and not cached, a clear error says which file to fetch and where to put it.
  * ``auto``: ImageNet weights when they are cached or can be downloaded; offline, the backbone shipped
    in the repository (``imagenette``), said loudly and recorded as what was actually loaded, so caches
    keyed on it never mix the two.
  * ``imagenette``: the repository's own GoogLeNet, trained on imagenette by stage=pretrain
    (``features/weights/googlenet-imagenette.pt``, float16; :mod:`features.shipped`). It knows 10
    classes, not 1000: weaker features than ImageNet's, far stronger than random ones.
  * ``none``: random initialisation (seeded by ``seed``).
  * a path: a state dict, or a weights file of this project holding one under ``"backbone"``/``"model"``.

Every set of weights comes with the input normalisation it was trained on (``normalization``):
``imagenet`` (RGB in [0, 1], minus ImageNet's mean, over its std: this project's own training and
random weights) or ``inception`` ((x - 0.5) / 0.5, torchvision's ImageNet GoogLeNet, run with its
``transform_input=True``). The files this project writes store it; torchvision's ImageNet file is
recognised by its name; a plain state dict of unknown origin is taken as ``imagenet``.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import GoogLeNet, GoogLeNet_Weights, googlenet

__all__ = [
    "BackboneError",
    "LoadedWeights",
    "build_googlenet",
    "googlenet_from_state",
    "imagenet_weights_path",
    "resolve_weights",
    "resolve_device",
    "googlenet_gflop_per_crop",
    "weights_used",
    "NORMALIZATIONS",
    "NORMALIZATION_IMAGENET",
    "SHIPPED_PATH",
    "WEIGHTS_FORMAT",
]

log = logging.getLogger("features.backbone")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Input normalisations: the crops are always made ImageNet-normalised; a network trained on
# "inception" inputs converts them first (torchvision's ``transform_input``).
NORMALIZATION_IMAGENET = "imagenet"  # (rgb - IMAGENET_MEAN) / IMAGENET_STD
NORMALIZATION_INCEPTION = "inception"  # (rgb - 0.5) / 0.5: torchvision's ImageNet GoogLeNet
NORMALIZATIONS = (NORMALIZATION_IMAGENET, NORMALIZATION_INCEPTION)
WEIGHTS_FORMAT = "rcnn-googlenet-weights"  # a weights file written by this project (see save_weights)


class BackboneError(RuntimeError):
    """Weights that cannot be found or loaded."""


@dataclass(frozen=True)
class LoadedWeights:
    """What ``weights`` resolved to: ``kind`` in {imagenet, none, file}, where they are read from, what
    they are (``stamp``) and the input normalisation they expect."""

    kind: str
    path: str | None = None  # where they are read from: not part of their identity (a copy is the same weights)
    # What they are, the same on every machine: "sha256:<hex>" of a file's bytes, torchvision's published
    # hash for its ImageNet file (known before it is downloaded), or how random weights are drawn
    stamp: str | None = None
    normalization: str = NORMALIZATION_IMAGENET

    def describe(self) -> dict:
        """Their identity, for cache keys."""
        return {"kind": self.kind, "stamp": self.stamp, "normalization": self.normalization}


def imagenet_weights_path() -> Path:
    """Where torchvision keeps (or would download) the GoogLeNet ImageNet weights."""
    url = GoogLeNet_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _stamp(path: Path) -> str:
    """A weights file's identity: the hash of its bytes (remembered per file version: rcnn.filehash)."""
    from rcnn.filehash import content_hash

    return "sha256:" + content_hash(path)[:16]


# The backbone shipped in the repository (backbone.weights=imagenette; how it is made: features/shipped.py)
SHIPPED_PATH = Path(__file__).resolve().parent / "weights" / "googlenet-imagenette.pt"

# torchvision's ImageNet file is named by the first hex digits of its sha256 (googlenet-1378be20.pth): its
# identity, the same before and after the download and on every machine.
IMAGENET_STAMP = "torchvision:" + os.path.basename(GoogLeNet_Weights.IMAGENET1K_V1.url)


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
    """Decide what ``weights`` means here, without building the network.

    ``imagenet`` and ``auto`` download the ImageNet weights here when they are not cached yet, so that every
    stage of a run sees the same file; offline, ``imagenet`` is an error and ``auto`` falls back to the
    shipped imagenette backbone, said loudly (a warning now; ``backbone_weights: imagenette`` in every
    report), or to random initialisation in a checkout without that file.
    """
    if weights == "none":
        return LoadedWeights("none", None, RANDOM_INIT)
    if weights == "imagenette":
        return _imagenette()
    if weights in ("imagenet", "auto"):
        path = imagenet_weights_path()
        if not path.exists() and weights == "imagenet":
            _download_imagenet()  # offline: BackboneError, before any work
        if not path.exists() and weights == "auto":
            try:
                _download_imagenet()
            except BackboneError as e:
                why = str(e.__cause__ or e).splitlines()[0][:200]
                fetch = f"Fetch {GoogLeNet_Weights.IMAGENET1K_V1.url} to {path} for ImageNet's features."
                if SHIPPED_PATH.is_file():
                    _warn_once(
                        "backbone.weights=auto: GoogLeNet's ImageNet weights are not cached and could not be downloaded "
                        "(%s).\nUsing the backbone shipped in the repository instead (backbone.weights=imagenette: trained "
                        "on imagenette's 10 classes by stage=pretrain, %s): weaker features than ImageNet's. %s",
                        why, SHIPPED_PATH.name, fetch,
                    )
                    return _imagenette()
                _warn_once(
                    "\n" + "!" * 100 + "\nbackbone.weights=auto: GoogLeNet's ImageNet weights are not cached and could not "
                    "be downloaded (%s), and this checkout has no %s.\nUSING RANDOM INITIALISATION: features will be far "
                    "weaker than R-CNN's. %s Or train a backbone here (stage=pretrain) and pass backbone.weights=PATH.\n"
                    + "!" * 100,
                    why, SHIPPED_PATH, fetch,
                )
                return LoadedWeights("none", None, RANDOM_INIT)
        return LoadedWeights("imagenet", str(path), IMAGENET_STAMP, NORMALIZATION_INCEPTION)
    path = Path(weights)
    if not path.is_file():
        raise BackboneError(f"{path}: backbone weights file not found (backbone.weights=imagenet|imagenette|auto|none|PATH)")
    stamp = _stamp(path)
    return LoadedWeights("file", str(path.resolve()), stamp, _file_normalization(str(path.resolve()), stamp))


def _imagenette() -> LoadedWeights:
    """The shipped imagenette backbone (an error naming the file when this checkout lacks it)."""
    path = SHIPPED_PATH
    if not path.is_file():
        raise BackboneError(f"{path}: the shipped imagenette backbone is missing from this checkout (git lfs? a partial copy?)")
    stamp = _stamp(path)
    return LoadedWeights("imagenette", str(path), stamp, _file_normalization(str(path), stamp))


@functools.lru_cache(maxsize=32)
def _file_normalization(path: str, stamp: str) -> str:
    """The normalisation a weights file declares (read once per file version: stages resolve often)."""
    return read_weights_file(path)[1]


_warned: set[str] = set()


def _warn_once(msg: str, *args) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg, *args)


_download_failed: list[str] = []  # one failed download per process is enough to know we are offline


def _download_imagenet() -> dict:
    """torchvision's ImageNet GoogLeNet state dict, downloaded into torch's hub cache if needed."""
    w = GoogLeNet_Weights.IMAGENET1K_V1
    if _download_failed:
        raise BackboneError(_download_failed[0])
    try:
        if os.environ.get("RCNN_OFFLINE"):
            raise ConnectionError("RCNN_OFFLINE is set: no download attempted")
        return w.get_state_dict(progress=True, check_hash=False)
    except Exception as e:  # URLError, socket errors, ...: no internet here
        msg = (
            f"could not download GoogLeNet's ImageNet weights ({type(e).__name__}: {e}). On a machine with "
            f"internet, fetch {w.url} and put it at {imagenet_weights_path()}, or pass "
            "backbone.weights=PATH to a state dict, or backbone.weights=none for random initialisation."
        )
        _download_failed.append(msg)
        raise BackboneError(msg) from e


def read_weights_file(path: str) -> tuple[dict, str]:
    """``(state dict, normalization)`` of a weights file: a plain state dict, torchvision's ImageNet
    file (recognised by its name), or a file of this project (the state under ``backbone``/``model``,
    with its ``normalization``)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BackboneError(f"{path}: not a readable torch state dict ({e})") from e
    normalization = NORMALIZATION_IMAGENET
    if isinstance(obj, dict) and isinstance(obj.get("normalization"), str):
        normalization = obj["normalization"]
    elif os.path.basename(path) == os.path.basename(GoogLeNet_Weights.IMAGENET1K_V1.url):
        normalization = NORMALIZATION_INCEPTION
    if normalization not in NORMALIZATIONS:
        raise BackboneError(f"{path}: unknown input normalization {normalization!r} (one of {', '.join(NORMALIZATIONS)})")
    for key in ("backbone", "model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise BackboneError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj, normalization


def weights_used(record: dict, path: str | None) -> LoadedWeights:
    """The weights a stage recorded in its manifest (``record``: :meth:`LoadedWeights.describe`), read from
    ``path`` where it found them, after checking the file there is still those weights."""
    loaded = LoadedWeights(record["kind"], path, record["stamp"], record["normalization"])
    if loaded.kind == "none":
        return loaded
    if not path or not Path(path).is_file():
        raise BackboneError(f"{path}: the backbone weights the features were computed with are no longer there; rerun stage=features")
    if loaded.kind != "imagenet" and _stamp(Path(path)) != loaded.stamp:
        raise BackboneError(f"{path}: these backbone weights changed since the features were computed with them "
                            f"({loaded.stamp}); rerun stage=features")  # fmt: skip
    return loaded


def build_googlenet(weights: str | LoadedWeights = "none") -> tuple[GoogLeNet, LoadedWeights]:
    """GoogLeNet without auxiliary heads; ``model.fc`` maps the 1024-d pooled feature to its logits.

    Input: ImageNet-normalised RGB (mean ``IMAGENET_MEAN``, std ``IMAGENET_STD``); weights trained on
    ``inception`` inputs convert them inside (``transform_input``). Returns the model (eval mode) and
    what its weights resolved to.
    """
    loaded = weights if isinstance(weights, LoadedWeights) else resolve_weights(weights)
    model = googlenet(weights=None, aux_logits=False, init_weights=False, transform_input=False)
    if loaded.kind == "none":
        random_init(model)
    elif loaded.kind == "imagenet":
        path = Path(loaded.path)
        state = read_weights_file(str(path))[0] if path.exists() else _download_imagenet()
        _load(model, state, str(path))
    elif loaded.kind in ("file", "imagenette"):
        _load(model, read_weights_file(loaded.path)[0], loaded.path)
    set_normalization(model, loaded.normalization)
    return model.eval(), loaded


def set_normalization(model: GoogLeNet, normalization: str) -> GoogLeNet:
    """Make ``model`` take ImageNet-normalised input whatever its weights were trained on."""
    if normalization not in NORMALIZATIONS:
        raise BackboneError(f"unknown input normalization {normalization!r} (one of {', '.join(NORMALIZATIONS)})")
    model.transform_input = normalization == NORMALIZATION_INCEPTION
    return model


def normalization_of(model: GoogLeNet) -> str:
    return NORMALIZATION_INCEPTION if model.transform_input else NORMALIZATION_IMAGENET


def googlenet_from_state(state: dict, normalization: str) -> GoogLeNet:
    """GoogLeNet (eval mode) from a state dict held in memory, e.g. a detector file's backbone."""
    model = googlenet(weights=None, aux_logits=False, init_weights=False, transform_input=False)
    _load(model, state, "state dict")
    return set_normalization(model, normalization).eval()


def _load(model: nn.Module, state: dict, source: str) -> None:
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    if any(k.startswith("fc.") and (k not in state or state[k].shape != own[k].shape) for k in own):
        # features only: a classifier for other classes (or none) is not needed; keep the model's own
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
        if isinstance(module, BasicConv2d) and isinstance(module.bn, nn.modules.batchnorm._BatchNorm):
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


def googlenet_gflop_per_crop(model: torch.nn.Module, size: int = 224) -> float:
    """GFLOPs of one ``size x size`` forward pass of ``model`` (torch's counter: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def resolve_device(name: str) -> torch.device:
    """``device=`` (auto | cpu | cuda) as a torch device; cuda without one is an error that says so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA device; use device=cpu or device=auto")
    return torch.device(name)


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (None: fp32). ``auto`` takes bf16 where the hardware computes
    it natively (a CPU with AVX512-BF16 or AMX, a GPU from Ampere on), else fp32 on a CPU, fp16 on a GPU."""
    precision = getattr(precision, "value", precision)
    if precision == "fp32":
        return None
    if precision in ("fp16", "bf16"):
        return torch.float16 if precision == "fp16" else torch.bfloat16
    from rcnn.machine import native_bf16  # emulated bf16 (oneDNN on AVX512 alone, a T4) is slower than fp32

    if device.type == "cuda":
        return torch.bfloat16 if native_bf16("cuda") else torch.float16
    return torch.bfloat16 if native_bf16("cpu") else None


def autocast(dtype: torch.dtype | None, device: torch.device | str):
    """``torch.autocast`` to ``dtype`` on ``device``'s type; a no-op for None (fp32)."""
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def trunk(model: GoogLeNet) -> nn.Module:
    """The network up to the 1024-d global average pool (``fc`` replaced by identity, dropout off)."""
    model.fc = nn.Identity()
    model.dropout = nn.Identity()
    return model
