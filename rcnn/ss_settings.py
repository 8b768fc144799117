"""Selective search's settings: ``proposals.ss`` resolved into :class:`SSParams` (a mode's values, then
each key set explicitly), with the modes' table. On the ground floor: the config checks them before any
work, the proposals stage computes with them and the detector file stores them (how it proposes boxes);
the algorithm itself is :mod:`proposals.selective_search`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["SSParams", "MODES", "resolve_params"]

MODES = {
    "rcnn_fast": dict(color_spaces=["hsv", "lab"], ks=[50, 100], strategies=["ctsf", "tsf"]),
    "quality": dict(
        color_spaces=["hsv", "lab", "rgi", "h", "i"],
        ks=[50, 100, 150, 300],
        strategies=["ctsf", "tsf", "f", "s"],
    ),
    "googlenet": dict(color_spaces=["hsv", "lab"], ks=[100, 200], strategies=["ctsf", "tsf"]),
    "opencv_fast": dict(color_spaces=["hsv", "lab"], ks=[150, 300, 450], strategies=["ctsf", "tsf"]),
}
_MODE_DEFAULTS = dict(sigma=0.8, min_segment_size=None, min_box_side=20)
_COLOR_SPACES = ("hsv", "lab", "rgi", "h", "i")
_STRATEGY_LETTERS = "ctsf"  # c(olour) t(exture) s(ize) f(ill): the similarities a strategy sums


@dataclass(frozen=True)
class SSParams:
    """Fully resolved selective search settings (what a cache key is made of)."""

    backend: str  # opencv | selectivesearch
    mode: str
    color_spaces: tuple[str, ...]
    ks: tuple[int, ...]
    sigma: float
    strategies: tuple[str, ...]
    min_segment_size: int | None  # None = k
    min_box_side: int
    resize_width: int | None
    merge_iou: float | None = None  # None = exact duplicates only (R-CNN)
    order: str = "opencv"  # shuffle | opencv (detector files written before the key existed: opencv)
    max_side: int | None = None  # an image's longer side shrunk to this first (None: no limit)

    def as_dict(self) -> dict:
        out = asdict(self)
        if out["max_side"] is None:  # (proposals from before it existed keep their key)
            del out["max_side"]
        return out


def _name(value) -> str:
    """A config enum's value (or a plain string, from a dict config)."""
    return value.value if hasattr(value, "value") else str(value)


def resolve_params(cfg) -> SSParams:
    """``proposals.ss`` config -> :class:`SSParams`: the mode's values, overridden by explicit keys."""
    mode = _name(cfg.mode)
    backend = _name(cfg.backend)
    base = {**_MODE_DEFAULTS, **MODES[mode]}
    if mode == "opencv_fast":
        base["min_box_side"] = 0
        overridden = [
            k for k in ("color_spaces", "ks", "sigma", "strategies", "min_segment_size") if cfg[k] is not None
        ]
        if overridden or backend != "opencv":
            raise ValueError(
                "proposals.ss.mode=opencv_fast runs OpenCV's own switchToSelectiveSearchFast(); "
                f"it takes no {', '.join(overridden) or 'backend other than opencv'} (use mode=rcnn_fast to set them)"
            )
    values = {k: (cfg[k] if cfg[k] is not None else v) for k, v in base.items()}
    spaces = tuple(str(s).lower() for s in values["color_spaces"])
    bad = [s for s in spaces if s not in _COLOR_SPACES]
    if bad:
        raise ValueError(
            f"unknown colour space(s) {bad} in proposals.ss.color_spaces; valid: {', '.join(_COLOR_SPACES)}"
        )
    strategies = tuple(str(s).lower() for s in values["strategies"])
    bad = [s for s in strategies if not s or set(s) - set(_STRATEGY_LETTERS)]
    if bad:
        raise ValueError(
            f"bad strategy {bad} in proposals.ss.strategies: letters of c(olour) t(exture) s(ize) f(ill)"
        )
    ks = tuple(int(k) for k in values["ks"])
    if not ks or min(ks) <= 0:
        raise ValueError(f"proposals.ss.ks must be positive numbers, got {list(ks)}")
    merge_iou = None if cfg.merge_iou is None else float(cfg.merge_iou)
    if merge_iou is not None and not 0 < merge_iou <= 1:
        raise ValueError(f"proposals.ss.merge_iou must be in (0, 1] or null, got {merge_iou}")
    if cfg.resize_width and cfg.max_side:
        raise ValueError("proposals.ss: set resize_width (every image to that width) or max_side (the larger ones "
                         f"shrunk), not both; got {cfg.resize_width} and {cfg.max_side}")
    return SSParams(
        order=_name(cfg.order),
        max_side=int(cfg.max_side) if cfg.max_side else None,
        merge_iou=merge_iou,
        backend=backend,
        mode=mode,
        color_spaces=spaces,
        ks=ks,
        sigma=float(values["sigma"]),
        strategies=strategies,
        min_segment_size=None if values["min_segment_size"] is None else int(values["min_segment_size"]),
        min_box_side=int(values["min_box_side"]),
        resize_width=int(cfg.resize_width) if cfg.resize_width else None,
    )
