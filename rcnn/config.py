"""The configuration: typed defaults (a comment on every key), dataset presets, and override parsing.

Overrides use Hydra's grammar (``key=value``, ``group=option``, lists as ``[a,b]``) and are composed
with Hydra's compose API against the dataclasses below, so unknown keys, unknown choices and wrong
types fail before any work, with a message that lists what is valid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from .machine import cores

__all__ = [
    "Stage", "Config", "ConfigError", "load_config", "preset_recipe", "override_keys", "DATASET_PRESETS",
    "PRETRAIN_PRESETS", "usage", "override_value",
]  # fmt: skip


class Stage(Enum):
    """The stages, in pipeline order; ``all`` runs them one after another."""

    data = "data"  # load and check the dataset; per-split counts
    pretrain = "pretrain"  # train GoogLeNet on an image-classification tree (pretrain.data)
    proposals = "proposals"  # selective search (+ MultiBox) boxes per image
    multibox = "multibox"  # train the MultiBox proposer
    finetune = "finetune"  # fine-tune the backbone on warped proposals
    features = "features"  # 1024-d GoogLeNet features per proposal
    svm = "svm"  # per-class linear SVMs + box regressors -> detector file
    detect = "detect"  # run the detector on the test split (or on image=PATH)
    eval = "eval"  # VOC / ILSVRC / COCO mAP of the detections
    analyze = "analyze"  # stage eval with eval.analyze=true: the error analysis and report.html
    benchmark = "benchmark"  # the whole chain, one report
    all = "all"  # data -> proposals -> ... -> eval


# ----------------------------------------------------------------------------------------------
# Datasets. One schema per kind of dataset; a preset is an instance with its paths filled in.
# Relative paths are relative to the current working directory.


@dataclass
class DatasetConfig:
    name: str = MISSING  # names the run folder, data/runs/<name>
    train_split: str = "train"  # split used for training
    test_split: str = "test"  # split used for testing and evaluation
    classes: Optional[List[str]] = None  # class names in label order; null = every class found
    limit: Optional[int] = None  # keep only the first N images of each split (quick trials)
    # Settings this dataset is meant to run with, as key=value overrides; the command line's own win
    recipe: List[str] = field(default_factory=list)


@dataclass
class VocConfig(DatasetConfig):
    """A PASCAL VOC tree: Annotations/<id>.xml, JPEGImages/<id><image_ext>, ImageSets/Main/<split>.txt."""

    name: str = "voc"
    root: str = MISSING  # a VOC tree (Annotations/, JPEGImages/, ImageSets/), or folders of XML files beside images
    train_split: str = "auto"  # auto: ImageSets/Main/trainval.txt, else train.txt (train beside val; or a train/ folder)
    test_split: str = "auto"  # auto: test.txt, else val.txt (or a test/, valid/, val/ folder); none at all: 30% held out
    image_ext: str = ".jpg"  # image file = JPEGImages/<id><image_ext> (else the XML's <filename>, else .png, ...)


@dataclass
class CocoConfig(DatasetConfig):
    """COCO instances JSON files, one per split, each with its image folder (found in dataset.root if not given)."""

    name: str = "coco"
    # the dataset's folder: the JSON files not given are looked for there (train/_annotations.coco.json,
    # annotations/instances_train*.json, train.json; test, else valid or val, the same ways)
    root: Optional[str] = None
    train_json: Optional[str] = None  # instances JSON of the training split
    # folder of the training images (file_name is relative to it); null: the JSON's own folder, else images/
    # in it or beside it, wherever the first image is
    train_images: Optional[str] = None
    test_json: Optional[str] = None  # instances JSON of the test split
    test_images: Optional[str] = None  # folder of the test images; null: found as train_images is


@dataclass
class IlsvrcConfig(DatasetConfig):
    """ILSVRC DET: VOC-like XML whose object names are WordNet synset ids (n01443537, ...)."""

    name: str = "ilsvrc"
    root: str = MISSING  # the ILSVRC folder (holding Annotations/, Data/, ImageSets/, devkit/)
    train_split: str = "train"
    test_split: str = "val"
    annotations: str = "Annotations/DET"  # <root>/<annotations>/<split>/<id>.xml
    images: str = "Data/DET"  # <root>/<images>/<split>/<id><image_ext>
    image_sets: str = "ImageSets/DET"  # <root>/<image_sets>/<split>.txt, lines "<id> <index>"
    image_ext: str = ".JPEG"
    # Lines "<image index> <synset>": image/class pairs ignored by the ILSVRC evaluator (test split).
    blacklist: Optional[str] = "devkit/data/ILSVRC2015_det_validation_blacklist.txt"
    # Lines "<synset> <index> <name>": class order and readable names; null = synsets found in XML.
    synsets: Optional[str] = "devkit/data/map_det.txt"


@dataclass
class DemoConfig(DatasetConfig):
    """The synthetic demo: coloured shapes on cluttered backgrounds, generated into `root` (VOC layout)."""

    name: str = "demo"
    root: str = "data/demo"  # where it is generated (regenerated if the settings below change)
    # The demo runs end to end in 2-3 minutes on a 2-core CPU: selective search alone (MultiBox's minutes bought
    # nothing on the test images), 200 boxes an image, small warped crops (its objects are 32-120 px) through a
    # GoogLeNet (offline: the shipped imagenette one) fine-tuned for 150 steps of 64 windows, half of them
    # foreground (R-CNN's quarter: 11 points fewer here), every layer at 20x R-CNN's base rate, the default
    # route's on a CPU (10x: 77.5 against 79.2 VOC07 mAP on 320 test images, seeds 0-2; BENCHMARKS.md).
    recipe: List[str] = field(default_factory=lambda: [
        "proposals.method=ss", "proposals.top_n=200", "features.input_size=64", "features.padding=4",
        "finetune.enabled=true", "finetune.iterations=150", "finetune.step_size=120", "finetune.batch_size=64",
        "finetune.lr=0.02", "finetune.checkpoint_every=50", "finetune.classifier_lr_mult=1", "finetune.bias_lr_mult=1",
        "auto=false",
    ])  # fmt: skip
    seed: int = 0  # generator seed: same seed, same images
    train_images: int = 64  # images in the train split
    test_images: int = 32  # images in the test split
    width: int = 320  # image width in pixels
    height: int = 240  # image height in pixels
    max_objects: int = 4  # objects per image: 1..max_objects
    min_size: int = 32  # smallest object side in pixels
    max_size: int = 120  # largest object side in pixels
    # Each class in its own band of hues (learnable even from random features on a CPU in minutes);
    # false: any hue, shape alone tells the classes apart (dataset=shapes: 80.7% VOC07 from the shipped backbone
    # with 600 fine-tuning steps, 58.2 with the demo's 150; BENCHMARKS.md)
    class_colours: bool = True


_COCO128 = "../shared/datasets/coco128"
_ROADSIGNS = "../shared/datasets/roadsigns"


def _coco_2017_layout(name: str, root: str) -> CocoConfig:
    """COCO 2017's own layout under ``root``: annotations/instances_<split>.json and <split>/ images."""
    return CocoConfig(
        name=name,
        root=root,
        train_split="train2017",
        test_split="val2017",
        train_json="${.root}/annotations/instances_train2017.json",
        train_images="${.root}/train2017",
        test_json="${.root}/annotations/instances_val2017.json",
        test_images="${.root}/val2017",
    )


_DEMO_RECIPE = DemoConfig().recipe
DATASET_PRESETS: dict[str, DatasetConfig] = {
    "demo": DemoConfig(),
    "voc": VocConfig(),
    "coco": CocoConfig(),
    "ilsvrc": IlsvrcConfig(),
    "coco128": _coco_2017_layout("coco128", _COCO128),
    "voc2007": VocConfig(
        name="voc2007",
        root="data/VOCdevkit/VOC2007",
        train_split="trainval",
        test_split="test",
        classes=[
            "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
            "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
            "train", "tvmonitor",
        ],  # fmt: skip
    ),
    "coco2017": _coco_2017_layout("coco2017", "data/coco"),
    # 877 photos of road signs (speedlimit, crosswalk, trafficlight, stop), 200-400 px, VOC XML: the real
    # detection set this project develops on (../shared/datasets/roadsigns/README.md)
    "roadsigns": VocConfig(name="roadsigns", root=_ROADSIGNS, train_split="train", test_split="test"),
    "ilsvrc2014": IlsvrcConfig(name="ilsvrc2014", root="data/ILSVRC"),
}
DATASET_PRESETS["voc2012"] = VocConfig(
    name="voc2012",
    root="data/VOCdevkit/VOC2012",
    train_split="train",
    test_split="val",
    classes=list(DATASET_PRESETS["voc2007"].classes),
)
# The demo's shapes in any hue, so that shape alone tells the classes apart: learned features, not colour.
# Four times the demo's fine-tuning (600 steps, on the hardest of 4x the background draws), scored by the
# fine-tuned classifier: 80.7% VOC07 mAP from the shipped backbone where 150 steps give 58 (BENCHMARKS.md).
DATASET_PRESETS["shapes"] = DemoConfig(name="shapes", root="data/shapes", class_colours=False, recipe=[
    *(o for o in _DEMO_RECIPE if not o.startswith(("finetune.iterations=", "finetune.step_size="))),
    "finetune.iterations=600", "finetune.step_size=480", "finetune.bg_candidates=4", "detect.scores=softmax",
    "svm.classifiers=false", "proposals.ss.merge_iou=0.7",
])  # fmt: skip

# Where a preset's data comes from, shown when it is missing.
DATASET_HINTS = {
    "voc2007": "extract VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar (PASCAL VOC site) in data/",
    "voc2012": "extract VOCtrainval_11-May-2012.tar (PASCAL VOC site) in data/",
    "coco2017": "unzip train2017.zip, val2017.zip and annotations_trainval2017.zip (cocodataset.org) in data/coco/",
    "ilsvrc2014": "extract the ILSVRC DET images, annotations, image sets and devkit (image-net.org) in data/ILSVRC/",
    "coco128": "it is expected in ../shared/datasets/coco128 beside the repository",
    "roadsigns": "it is expected in ../shared/datasets/roadsigns beside the repository",
}


# Classification trees for stage=pretrain (pretrain.data=<name>), each with the settings it is meant to
# run with (applied before the command line's, as a dataset's recipe).
PRETRAIN_PRESETS: dict[str, dict] = {
    # 10 ImageNet classes, 9,469 train / 3,925 val images at 224 x 224. Its recipe fits an hour of a 2-core
    # CPU in fp32 (the shipped backbone, features/weights/README.md): 112 px, 18 epochs of a one-cycle
    # schedule, label smoothing, milder crops (35%-100%), the last weights (an average over 0.999 lagged
    # them by 1.7 points at 20 epochs), a centre-crop test every 6 epochs and at the end, at 128 px (the
    # shipped network: 84.10% top-1 tested at 112 px, 85.35% at 128).
    "imagenette": {
        "root": "../shared/datasets/imagenette",
        "recipe": [
            "pretrain.input_size=112", "pretrain.epochs=18", "pretrain.schedule=onecycle", "pretrain.lr=0.1",
            "pretrain.warmup_epochs=2", "pretrain.weight_decay=0.0005", "pretrain.label_smoothing=0.1",
            "pretrain.crop_scale=[0.35,1.0]", "pretrain.ema_decay=null", "pretrain.eval_every=6",
            "pretrain.test_schemes=[center]", "pretrain.test_size=128",
        ],
    },  # fmt: skip
    # ILSVRC 2012 CLS-LOC: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (validation images sorted into
    # class folders, e.g. with the devkit's ground truth); the published recipe (the defaults).
    "ilsvrc2012": {"root": "data/ILSVRC2012", "recipe": []},
}


# ----------------------------------------------------------------------------------------------
# Stages' settings.


@dataclass
class BackboneConfig:
    # imagenet: torchvision's ImageNet weights (downloaded once, on a machine with internet);
    # imagenette: the repository's own GoogLeNet, trained on imagenette's 10 classes by stage=pretrain
    # (features/weights/googlenet-imagenette.pt, float16);
    # auto: imagenet, downloaded if not cached; offline, imagenette, said loudly and recorded;
    # none: random initialisation; or a PATH to a state dict / checkpoint.
    weights: str = "auto"


class Schedule(Enum):
    step = "step"  # the paper's: lr x lr_decay every lr_decay_epochs epochs
    cosine = "cosine"  # linear warm-up, then half a cosine to 0
    onecycle = "onecycle"  # warm-up from lr/25, then half a cosine to 0


class Precision(Enum):
    auto = "auto"  # bf16 where the CPU (AVX512-BF16, AMX) or GPU computes it natively, else fp32
    fp32 = "fp32"
    bf16 = "bf16"  # autocast to bfloat16 (weights and their updates stay fp32)
    fp16 = "fp16"  # autocast to float16 (GPUs)


@dataclass
class PretrainConfig:
    """GoogLeNet's own training on a classification tree (the paper's section 6); defaults as published."""

    data: str = "imagenette"  # a preset (imagenette, ilsvrc2012) or a PATH holding train/<class>/ and val/<class>/
    input_size: int = 224  # training crop size (a CPU can train at 96-128)
    epochs: int = 90  # passes over the train split
    batch_size: int = 64  # images per SGD step
    lr: float = 0.01  # base (peak) learning rate
    schedule: Schedule = Schedule.step  # step (published) | cosine | onecycle
    lr_decay: float = 0.96  # schedule=step: lr x this ...
    lr_decay_epochs: float = 8.0  # ... every this many epochs (the paper: 4% every 8 epochs)
    warmup_epochs: float = 0.0  # cosine/onecycle: linear warm-up
    momentum: float = 0.9  # SGD momentum (the paper's)
    nesterov: bool = False  # Nesterov momentum
    weight_decay: float = 0.0002  # L2 on weights (not on biases or BatchNorm)
    label_smoothing: float = 0.0  # cross-entropy label smoothing (not in the paper)
    aux_weight: float = 0.3  # each auxiliary classifier's loss weight (dropped at inference)
    dropout: float = 0.4  # before the main classifier
    dropout_aux: float = 0.7  # in the auxiliary classifiers
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # crop area, fraction of the image's
    crop_ratio: List[float] = field(default_factory=lambda: [0.75, 1.3333333])  # crop aspect ratio range
    interpolations: List[str] = field(default_factory=lambda: ["bilinear", "area", "nearest", "cubic"])  # drawn per crop
    jitter: float = 0.4  # photometric distortions: brightness, contrast, saturation in [1-j, 1+j]; 0 = off
    flip: bool = True  # random horizontal flips
    ema_decay: Optional[float] = 0.9999  # Polyak averaging: per-step decay of the weights' average; null = off
    bn_batches: int = 100  # batches that recompute the averaged model's BatchNorm statistics
    precision: Precision = Precision.auto  # arithmetic of training and testing
    eval_every: int = 1  # epochs between centre-crop tests on val (0 = only at the end)
    test_schemes: List[str] = field(default_factory=lambda: ["center", "10crop", "144crop"])  # final tests
    test_size: Optional[int] = None  # the test crops' size; null = input_size (larger corrects random-sized crops' bias)
    test_limit: Optional[int] = None  # val images for the 144-crop test (a fixed sample); null = all
    checkpoint_every: int = 200  # steps between checkpoints (and one after every epoch)
    loader_workers: int = 0  # processes decoding and augmenting while the network trains; 0 = in line
    cache_images: Optional[bool] = None  # keep decoded images in memory; null = when they fit in 6 GiB


# stage=pretrain's vocabulary (features/pretrain_data.py implements each name)
INTERPOLATIONS = ("bilinear", "area", "nearest", "cubic")  # pretrain.interpolations: how a training crop is resized
TEST_SCHEMES = ("center", "10crop", "144crop")  # pretrain.test_schemes: the paper's test crops

# GoogLeNet's layers in forward order: features/extract.py splits the network by these names, finetune.freeze
# takes one of them
GOOGLENET_LAYERS = (
    "conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
    "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
    "inception5a", "inception5b",
)  # fmt: skip


class SSBackend(Enum):
    opencv = "opencv"  # OpenCV ximgproc building blocks (fast, C++)
    selectivesearch = "selectivesearch"  # the `selectivesearch` package (Python; HSV + all similarities)


class SSMode(Enum):
    rcnn_fast = "rcnn_fast"  # R-CNN's "fast": HSV+Lab, k 50/100, 2 strategies, min side 20 px
    quality = "quality"  # 5 colour spaces, k 50/100/150/300, 4 strategies
    googlenet = "googlenet"  # the GoogLeNet entry: rcnn_fast with k doubled (100/200)
    opencv_fast = "opencv_fast"  # OpenCV's own switchToSelectiveSearchFast(), as is (a baseline)


class SSOrder(Enum):
    shuffle = "shuffle"  # a random order, seeded per image: a top-N cap keeps a sample of every size
    opencv = "opencv"  # OpenCV's own rank (hierarchy level x rand, level 1 = the smallest regions first)


class ProposalMethod(Enum):
    ss = "ss"  # selective search alone
    multibox = "multibox"  # MultiBox alone
    ss_multibox = "ss_multibox"  # selective search + MultiBox's top boxes (the GoogLeNet entry)


@dataclass
class SelectiveSearchConfig:
    backend: SSBackend = SSBackend.opencv  # which implementation
    mode: SSMode = SSMode.googlenet  # preset of the values below (see proposals/selective_search.py)
    color_spaces: Optional[List[str]] = None  # null = the mode's; of hsv, lab, rgi, h, i
    ks: Optional[List[int]] = None  # Felzenszwalb k values; null = the mode's
    sigma: Optional[float] = None  # Felzenszwalb smoothing; null = 0.8
    strategies: Optional[List[str]] = None  # letters of c(olour) t(exture) s(ize) f(ill), e.g. [ctsf,tsf]
    min_segment_size: Optional[int] = None  # Felzenszwalb's minimum segment; null = k (R-CNN)
    min_box_side: Optional[int] = None  # drop boxes narrower or shorter (px); null = the mode's (20)
    resize_width: Optional[int] = None  # resize to this width first (R-CNN used 500 on ILSVRC); null = no
    # shrink an image whose longer side passes this first (never enlarged; boxes mapped back): the search's time
    # grows faster than the pixels (0.8 s at 500 px on a 2-core CPU, 3.6 at 1000, 29 at 2000); null = no limit
    max_side: Optional[int] = None
    # Beyond R-CNN: drop a box whose IoU with an earlier kept box exceeds this; null = exact duplicates only
    merge_iou: Optional[float] = None
    order: SSOrder = SSOrder.shuffle  # the boxes' order, which a top_n cap and merge_iou follow


@dataclass
class ProposalsConfig:
    method: ProposalMethod = ProposalMethod.ss_multibox  # ss | multibox | ss_multibox
    ss: SelectiveSearchConfig = field(default_factory=SelectiveSearchConfig)
    top_n: Optional[int] = None  # keep the first N selective search boxes (proposals.ss.order); null = all
    merge_iou: float = 0.9  # a MultiBox box with IoU above this with an earlier kept box is dropped
    splits: List[str] = field(default_factory=lambda: ["train", "test"])  # which of the dataset's splits


@dataclass
class MultiboxConfig:
    num_priors: int = 200  # K: priors (k-means of the training boxes) = boxes predicted per image
    top_k: int = 200  # best-scored MultiBox boxes added to selective search's
    input_size: int = 160  # the whole image is warped to this square (GoogLeNet's own is 224)
    epochs: int = 40  # training epochs over the train split
    batch_size: int = 16  # images per step
    lr: float = 1e-3  # Adam learning rate (cosine decay to 0)
    weight_decay: float = 1e-4  # Adam weight decay
    alpha: float = 0.3  # weight of the location loss against the confidence loss (Erhan et al.)
    flip: bool = True  # random horizontal flips
    # Beyond Erhan et al.: stop when MultiBox's recall@0.5 (its top_k boxes) on held-out training images has not
    # risen for this many epochs, and keep the best epoch's weights; null = train every epoch
    patience: Optional[int] = None
    holdout: float = 0.1  # with patience: the share of the training images held out to measure that recall


class FeatureMode(Enum):
    warp = "warp"  # R-CNN: every proposal cropped, warped, run through the whole network
    roi = "roi"  # one pass per image, RoIAlign at features.roi_layer, the rest per region


class RoiLayer(Enum):
    inception4e = "inception4e"  # stride 16; inception5a, 5b and the pool run per region
    inception5a = "inception5a"  # stride 32; inception5b and the pool run per region
    inception5b = "inception5b"  # stride 32; only the average pool runs per region (fastest)


class Device(Enum):
    auto = "auto"  # cuda if available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class Executor(Enum):
    local = "local"  # worker processes of this machine (`workers`)
    ray = "ray"  # Ray tasks on a cluster (`ray.address`); pip install -e ".[ray]"


@dataclass
class RayConfig:
    address: str = "local"  # local (started here, `workers` CPUs) | auto (the cluster joined) | [ray://]<host>:<port>
    cpus_per_task: float = 1.0  # CPUs Ray reserves for one image's task (and for each features or detect actor without GPUs)
    max_retries: int = 3  # a task (or actor) whose worker or node died is rerun this many times (bad data is not)


@dataclass
class FeaturesConfig:
    mode: FeatureMode = FeatureMode.warp  # warp | roi
    input_size: int = 224  # warped crop size (GoogLeNet's input)
    padding: int = 16  # context pixels around each box at the input size (R-CNN)
    batch_size: Optional[int] = None  # crops per forward pass (warp mode); null = 256 on a GPU, 64 on a CPU
    roi_layer: RoiLayer = RoiLayer.inception5b  # roi mode: where regions are pooled
    roi_image_size: int = 600  # roi mode: the image's shorter side is resized to this
    roi_max_size: int = 1000  # roi mode: ... unless its longer side would pass this (Fast R-CNN's cap)
    channels_last: bool = True  # NHWC memory layout (faster for convolutions on CPU)
    # Arithmetic of feature extraction and fine-tuning: auto = bf16 where the CPU or GPU computes it
    # natively (about 2-3x faster than fp32 on this project's AVX512-BF16 CPU), fp32 elsewhere on CPU
    precision: Precision = Precision.auto
    # Processes decoding the next images while the network runs (crops are warped where the network
    # runs); 0 = in line; null = auto (up to 4 on CUDA; in line on a CPU, whose cores the network uses)
    loader_workers: Optional[int] = None
    # warp mode: crops are warped from the image shrunk (area-averaged) so that its longer side is at most this, in
    # fine-tuning, features and detection alike (a phone's 12-MP photo is 146 MB as floats; warping a large box
    # to a small crop without averaging aliases); null = the full image
    max_side: Optional[int] = None


@dataclass
class FinetuneConfig:
    enabled: bool = False  # stage=all fine-tunes first (R-CNN did; slow on a CPU); stage=finetune always runs
    iterations: int = 40000  # SGD steps (R-CNN: mAP saturates around 40k)
    step_size: int = 20000  # lr x 0.1 every this many steps
    lr: float = 0.001  # base learning rate
    classifier_lr_mult: float = 10.0  # the new classifier learns at this x lr (R-CNN's fine-tuning prototxt)
    bias_lr_mult: float = 2.0  # biases learn at this x their layer's rate, without weight decay (Caffe's habit)
    momentum: float = 0.9
    weight_decay: float = 0.0005  # on weights only: not on biases nor BatchNorm parameters
    dropout: float = 0.4  # before the classifier, as GoogLeNet's head (paper section 5)
    # layers up to and including this one keep their weights and BatchNorm statistics (conv3: the stem, as Fast
    # R-CNN kept VGG's conv1-2); null: every layer learns, as R-CNN fine-tuned
    freeze: Optional[str] = None
    batch_size: int = 128  # windows per step
    fg_per_batch: int = 32  # foreground windows per step; the rest are background
    # how evenly the classes share those: a foreground window is drawn with weight n_c ** -fg_balance (n_c: its
    # class's foreground windows): 0 = uniform over windows, as R-CNN (a frequent class fills most batches),
    # 1 = every class equally often
    fg_balance: float = 0.0
    # background draws per background window of a step: the step keeps the ones its network now scores least as
    # background (online hard example mining, Shrivastava et al. 2016, on the background): 1 = uniform draws, as
    # R-CNN; k > 1 adds a forward pass (no gradient) over k x the background windows
    bg_candidates: int = 1
    fg_iou: float = 0.5  # a window overlapping a ground-truth box this much takes its class
    flip: bool = True  # random horizontal flips (roi mode: of the whole image and its boxes)
    checkpoint_every: int = 200  # steps between checkpoints (and a last one at the end)
    image_cache_mb: int = 4096  # decoded training images kept in memory, up to this many MiB (the least recently used dropped)
    roi_images_per_batch: int = 2  # roi mode: images whose windows make one batch


@dataclass
class SvmConfig:
    """R-CNN's linear SVMs with hard-negative mining, and its box regressors (reference.md)."""

    # false: no SVMs, only the box regressors, for a detector scored by the fine-tuned network's classifier
    # (detect.scores=softmax); the features stage then computes, of a train image's proposals, only those the
    # regressors learn from (IoU > regression_iou with a box): ~1% of them, most of the features' time
    classifiers: bool = True

    # LinearSVC's C (L2-regularised hinge loss). R-CNN's 0.001 was tuned for ImageNet fc7 features;
    # null = choose it from C_grid by cross-validation over the train split (VOC07 mAP, mean over the folds)
    C: Optional[float] = None
    C_grid: List[float] = field(default_factory=lambda: [0.0001, 0.001, 0.01, 0.1])  # candidates when C is null
    folds: int = 3  # C=null: folds of the train images (interleaved); each C is trained on all but one, scored on it
    bias_multiplier: float = 10.0  # LinearSVC's intercept_scaling
    pos_weight: float = 2.0  # class weight of the positives (negatives: 1)
    neg_iou: float = 0.3  # a proposal is a negative of a class below this IoU with all its boxes
    hard_threshold: float = -1.0001  # mining adds negatives scoring above this
    evict_threshold: float = -1.2  # after a retrain, cached negatives scoring below this are dropped (ILSVRC: -1.1)
    retrain_limit: int = 2000  # retrain a class once more than this many new negatives were added
    # Hard negatives a class keeps after a retrain (the lowest-scoring dropped first; a warning when hit):
    # bounds memory (200 ILSVRC classes x 10k x 1024 floats = 8 GB) and each fit's time; null = unbounded
    max_negatives: Optional[int] = 10000
    target_norm: float = 20.0  # features are scaled to this mean L2 norm
    norm_images: int = 200  # train images sampled to estimate the mean norm
    max_iter: int = 10000  # liblinear's iteration limit per fit
    regression: bool = True  # train a ridge box regressor per class
    regression_iou: float = 0.6  # its training pairs: proposals above this IoU with their best box
    regression_lambda: float = 1000.0  # its ridge penalty
    # save the mining state this often (a killed run resumes from it), or less often where a save is slow: a
    # save that took s seconds waits 10 s more, so that checkpoints cost at most ~10% of the mining time
    checkpoint_seconds: float = 60.0


class Scores(Enum):
    svm = "svm"  # the per-class SVMs (R-CNN)
    softmax = "softmax"  # the fine-tuned network's own (N+1)-way classifier, P(class) (R-CNN's appendix B)


@dataclass
class DetectConfig:
    # what scores a region: svm | softmax (needs a detector trained after fine-tuning); null = the detector's own
    # default, what its training run scored with (detector files from before it: svm)
    scores: Optional[Scores] = None
    box_regression: bool = True  # apply the detector's box regressors (when it has them)
    # per-class greedy NMS; null = the detector's own overlap of each class, from its training objects: R-CNN's 0.3
    # where they barely overlap each other, else the least of 0.4-0.7 that keeps 99% of them apart (crowds, cells)
    nms_iou: Optional[float] = None
    max_per_class: Optional[int] = 100  # per image and class, its best boxes before NMS (rcnn_test.m); null = all
    max_per_image: Optional[int] = None  # per image, the best over all classes after NMS; null = no such cut
    # (R-CNN never ranks classes against each other by their uncalibrated margins; 100 was this toolkit's old rule)
    max_per_class_split: Optional[float] = 40  # per class over the test split, in detections per test image:
    # the best kept (rcnn_test.m: 100,000 per 2,500 images = 40; its ILSVRC runs 30,000 over 20k = 1.5); null = all
    score_threshold: Optional[float] = None  # drop detections scoring below this; null = keep all (for mAP)
    # image=PATH: boxes drawn in the PNGs score above this; null = 0 with SVM scores (the margin), 0.5 with softmax
    draw_threshold: Optional[float] = None


class CocoBackend(Enum):
    auto = "auto"  # faster where faster-coco-eval is installed (pip install -e ".[fast]"), else pycocotools
    faster = "faster"  # faster-coco-eval's C++ COCOeval: the same twelve figures, 6.4x faster (BENCHMARKS.md)
    pycocotools = "pycocotools"  # the reference implementation


@dataclass
class EvalConfig:
    iou_threshold: float = 0.5  # VOC's overlap for a match (the devkit's >=); COCO and ILSVRC use their own
    coco_backend: CocoBackend = CocoBackend.auto  # COCOeval's implementation: auto | faster | pycocotools
    analyze: bool = False  # also the error analysis (Hoiem's false positives, COCO's PR breakdown, size and
    # aspect sensitivity) and <out>/eval/report.html; stage=analyze is stage=eval with this on
    groups: List[List[str]] = field(default_factory=list)  # similar classes, [[class, ...], ...]; [] = COCO's
    # supercategories, VOC's animals / vehicles / furniture for VOC's class names, else none
    top_multiple: float = 1.0  # the "top-ranked" detections of a class: its best (this x its objects)
    gallery_size: int = 6  # report.html: per class, its highest-scoring false positives and its missed objects shown


@dataclass
class BenchmarkConfig:
    append_to: Optional[str] = None  # stage=benchmark: also append the report to this file (e.g. BENCHMARKS.md)


# ----------------------------------------------------------------------------------------------
# The whole configuration.


@dataclass
class Config:
    defaults: List[Any] = field(default_factory=lambda: [{"dataset": "demo"}, "_self_"])
    stage: Stage = Stage.all  # which stage to run (see Stage); `all` runs the chain in order
    # the default route: settings chosen from the device and the training data (rcnn/recipe.py), for every key
    # that the command line and the dataset's recipe leave alone; said at the start and kept in metrics.json;
    # false = the defaults below as they stand (R-CNN's published settings)
    auto: bool = True
    dataset: Any = MISSING  # a dataset preset: dataset=<name>, then dataset.<key>=... to adjust it
    out: str = "data/runs/${dataset.name}"  # the run folder; each stage writes <out>/<stage>/
    seed: int = 0  # seeds Python's, numpy's and torch's generators
    workers: int = 0  # worker processes for per-image work; 0 = one per CPU core
    shard: Optional[str] = None  # "I/N": the per-image stages do every N-th image from the I-th (0-based); see
    # README "Running at scale". Under torchrun, null takes the rank and world size.
    executor: Executor = Executor.local  # local | ray: selective search and data checks as Ray tasks, features and detect on Ray actors
    ray: RayConfig = field(default_factory=RayConfig)  # executor=ray
    progress: bool = True  # show progress bars
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # GoogLeNet weights
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # stage=pretrain
    proposals: ProposalsConfig = field(default_factory=ProposalsConfig)  # stage=proposals
    multibox: MultiboxConfig = field(default_factory=MultiboxConfig)  # stage=multibox (the proposer)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)  # stage=features
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # stage=finetune
    device: Device = Device.auto  # where networks run: auto | cpu | cuda
    svm: SvmConfig = field(default_factory=SvmConfig)  # stage=svm
    detect: DetectConfig = field(default_factory=DetectConfig)  # stage=detect
    eval: EvalConfig = field(default_factory=EvalConfig)  # stage=eval
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)  # stage=benchmark
    detector: Optional[str] = None  # stage=detect: a detector file; null = this run's <out>/svm/detector.pt
    ensemble: Optional[List[str]] = None  # stage=detect: detector files whose SVM scores are averaged
    image: Optional[str] = None  # stage=detect: an image or a folder of images instead of the test split
    detections: Optional[str] = None  # stage=eval: a COCO-results JSON; null = <out>/detect/detections.json


class ConfigError(ValueError):
    """A bad command line: unknown key, unknown choice or wrong type."""


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="config", node=Config)
    for name, node in DATASET_PRESETS.items():
        cs.store(group="dataset", name=name, node=node)
    _registered = True


def _missing(node: DictConfig, prefix: str = "") -> list[str]:
    """Dotted names of the keys still set to ``???``."""
    out = []
    for k in node.keys():
        if OmegaConf.is_missing(node, k):
            out.append(f"{prefix}{k}")
        elif isinstance(node[k], DictConfig):
            out += _missing(node[k], f"{prefix}{k}.")
    return out


def _explain(override: str, base: DictConfig, cause: BaseException | None) -> str:
    """A readable reason for a rejected override, listing the valid keys or choices."""
    key, _, value = override.partition("=")
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(base, parent) if parent else base
    if not isinstance(node, DictConfig) or leaf not in node:
        where = f"'{parent}'" if parent else "the top level"
        valid = ", ".join(node.keys()) if isinstance(node, DictConfig) else ""
        extra = "; choose a dataset with dataset=<name>" if key.startswith("dataset.") else ""
        return f"unknown key '{key}' at {where}. Valid keys: {valid}{extra}"
    if key == "stage":
        return f"unknown stage '{value}'. Valid stages: {', '.join(s.value for s in Stage)}"
    reason = str(cause).splitlines()[0] if cause else "wrong type"
    return f"bad value for '{key}': {reason}"


def _field_comments(cls) -> dict[str, str]:
    """The comment of each field of dataclass ``cls`` (and its bases), read from this file: the text after
    ``#`` on the field's line with the comment lines that continue it, or else the comment lines just above it.
    Comment lines between two fields continue the first where the second has its own comment on its line."""
    import dataclasses
    import inspect

    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        above: list[str] = []
        commented = None  # the field just read, where its line had a comment
        for line in inspect.getsource(klass).splitlines()[1:]:
            text = line.strip()
            if text.startswith("#"):
                above.append(text.lstrip("#").strip())
                continue
            field_line = re.match(r"    (\w+)\s*:", line)
            name = field_line.group(1) if field_line else None
            trailing = line.split("  # ", 1)[1].strip() if field_line and "  # " in line else ""
            if trailing and above and commented:
                out[commented] += " " + " ".join(above)
            if name:
                out[name] = trailing or " ".join(above)
            commented = name if trailing else None
            above = []
    return out


def override_value(value) -> str:
    """``value`` (None, a bool, a number, a string or a list of them) in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    return str(value)


def _help_lines(node: DictConfig, indent: str = "") -> list[str]:
    """``key: value  # meaning`` for every key of ``node``, nested sections indented."""
    typ = OmegaConf.get_type(node)
    comments = _field_comments(typ) if typ is not None and hasattr(typ, "__dataclass_fields__") else {}
    values = OmegaConf.to_container(node, resolve=False, enum_to_str=True)
    lines = []
    for key in node.keys():
        if key == "defaults":
            continue
        note = f"  # {comments[key]}" if comments.get(key) else ""
        if isinstance(values[key], dict):  # a section
            lines += [f"{indent}{key}:{note}", *_help_lines(node[key], indent + "  ")]
        else:
            value = values[key]
            if isinstance(value, list):  # as the command line takes it (crop_scale: [0.35,1.0]), one shell word
                text = f"{key}: {override_value(value)}"
            else:
                text = OmegaConf.to_yaml({key: value}).strip().replace("\n", " ")
            lines.append(f"{indent}{text}{note}")
    return lines


def usage(argv: list[str] | None = None) -> str:
    """``--help``: the keys with their defaults and meanings (a chosen ``dataset=`` preset included) and,
    apart, the settings that preset's recipe applies."""
    _register()
    overrides = [a for a in argv or [] if "=" in a and not a.startswith("-")]
    chosen = [a.split("=", 1)[1] for a in overrides if a.startswith("dataset=")]
    name = chosen[-1] if chosen and chosen[-1] in DATASET_PRESETS else "demo"
    try:
        plain, problem = load_config([*overrides, "dataset.recipe=[]"]), ""
    except ConfigError as e:  # a preset whose paths must be given (dataset=voc: dataset.root=...)
        plain, problem = None, str(e)
    recipe = list(getattr(DATASET_PRESETS[name], "recipe", None) or [])
    head = (
        "usage: python -m rcnn.run [key=value ...]\n\n"
        f"  stage=<{'|'.join(s.value for s in Stage)}>   (default: all)\n"
        f"  dataset=<{'|'.join(DATASET_PRESETS)}>   (default: demo)\n"
        "  dataset.<key>=value   adjusts the chosen dataset, e.g. dataset.limit=10\n"
        "  python -m rcnn.run --help dataset=<preset>   shows that preset's keys\n\n"
        f"Defaults with dataset={name} (and the other keys given), before the dataset's recipe, each with its "
        "meaning (rcnn/config.py); pretrain.* shows the pretrain.data preset's recipe:\n\n"
    )
    body = "\n".join(_help_lines(plain)) if plain is not None else f"({problem}; add it after --help to see the rest)"
    tail = (f"\n\nThe {name} preset's recipe, applied before your overrides (dataset.recipe=[] drops it):\n  "
            + " ".join(recipe)) if recipe else ""  # fmt: skip
    return head + body + tail + "\n"


def load_config(overrides: list[str] | None = None, defaults: list[str] | None = None) -> DictConfig:
    """Compose the configuration from the defaults and ``key=value`` overrides: ``defaults`` (the default
    route's choices, rcnn/recipe.py) first, then the dataset's and pretraining preset's recipes, then
    ``overrides`` (the command line), each winning over the ones before.

    Raises :class:`ConfigError` with a message that lists the valid keys or choices.
    """
    _register()
    from hydra import initialize

    overrides = [_parseable(ov) for ov in overrides or []]
    defaults = list(defaults or [])
    with initialize(version_base="1.3", config_path=None, job_name="rcnn"):
        cfg = _compose(overrides)
        recipe = preset_recipe(cfg)
        if recipe or defaults:  # the presets' own settings first, so that the command line's win
            cfg = _compose(defaults + recipe + overrides)
    return _validate(cfg)


def preset_recipe(cfg: DictConfig) -> list[str]:
    """The overrides the chosen dataset and pretraining presets bring (``dataset.recipe``, PRETRAIN_PRESETS)."""
    return list(cfg.dataset.get("recipe") or []) + PRETRAIN_PRESETS.get(cfg.pretrain.data, {}).get("recipe", [])


def override_keys(overrides: list[str]) -> set[str]:
    """The keys ``key=value`` overrides set (a section's key names every key under it)."""
    return {o.partition("=")[0].lstrip("+~") for o in overrides}


def _quote(value: str) -> str:
    """``value`` as one of Hydra's single-quoted strings (a quote, and a backslash before one or at the end,
    escaped)."""
    out = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + out.replace("'", "\\'") + "'"


def _parseable(override: str) -> str:
    """One command-line argument as an override Hydra can parse. A value that its grammar rejects (a path
    with spaces, brackets or quotes, as the shell hands it over) is quoted as the string it is; anything
    else it cannot parse is a :class:`ConfigError` naming the argument and how to write it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if override.startswith(("-", "+", "~")):
        hint = f"; did you mean {override.lstrip('-')}?" if override.startswith("-") and "=" in override else ""
        raise ConfigError(f"'{override}': options are key=value, without dashes, and keys can be set but not added "
                          f"or deleted{hint}")  # fmt: skip
    key, eq, value = override.partition("=")
    if not eq or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
        raise ConfigError(f"'{override}' is not a key=value override (see --help)")
    parser = OverridesParser.create()
    try:
        parser.parse_override(override)
        return override
    except HydraException as e:
        if value and value[0] in "[{'\"":  # a list, a dict or a quoted string: the user meant Hydra's grammar
            reason = str(e).splitlines()[0]
            raise ConfigError(f"cannot parse '{override}': {reason}. Close brackets and quotes, or quote the whole "
                              f"value: {key}='...'") from None  # fmt: skip
    quoted = f"{key}={_quote(value)}"
    try:
        parser.parse_override(quoted)
    except HydraException:
        raise ConfigError(f"cannot parse '{override}'; quote the value: {key}='...'") from None
    return quoted


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose(config_name="config", overrides=overrides)
    except MissingConfigException as e:
        names = [o.split("=", 1)[1].strip("'") for o in overrides if o.startswith("dataset=")]
        bad = next((n for n in names if n not in DATASET_PRESETS), "?")
        raise ConfigError(f"unknown dataset '{bad}'. Valid choices: {', '.join(DATASET_PRESETS)}") from e
    except (ConfigCompositionException, OmegaConfBaseException) as e:
        msg = str(e)
        bad = next((o for o in overrides if f"override {o}" in msg or f"'{o.split('=')[0]}'" in msg), None)
        base = compose(config_name="config", overrides=[o for o in overrides if o.startswith("dataset=")])
        raise ConfigError(_explain(bad, base, e.__cause__) if bad else msg) from e


def _validate(cfg: DictConfig) -> DictConfig:
    from omegaconf.errors import OmegaConfBaseException

    missing = _missing(cfg)
    if missing:
        how = " ".join(f"{k}=..." for k in missing)
        raise ConfigError(f"missing value for {', '.join(missing)}: set {'it' if len(missing) == 1 else 'them'} with {how}")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"could not resolve the configuration: {e}") from e
    from .shard import parse_shard

    try:
        parse_shard(cfg.shard)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.workers < 0:
        raise ConfigError(f"workers must be >= 0 (0 = one per core), got {cfg.workers}")
    bad_roles = [r for r in cfg.proposals.splits if r not in ("train", "test")]
    if bad_roles or not cfg.proposals.splits:
        raise ConfigError(f"proposals.splits takes train and/or test (the dataset's roles), got {list(cfg.proposals.splits)}")
    from .ss_settings import resolve_params

    try:
        resolve_params(cfg.proposals.ss)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    checks = [
        ("svm.C", cfg.svm.C is None or cfg.svm.C > 0, "> 0 or null (chosen by cross-validation over the train images)"),
        ("svm.C_grid", cfg.svm.C is not None or (bool(cfg.svm.C_grid) and min(cfg.svm.C_grid) > 0), "a list of values > 0"),
        ("svm.folds", cfg.svm.folds >= 2, ">= 2"),
        ("svm.neg_iou", 0 < cfg.svm.neg_iou <= 1, "in (0, 1]"),
        ("svm.regression_iou", 0 < cfg.svm.regression_iou <= 1, "in (0, 1]"),
        ("svm.target_norm", cfg.svm.target_norm > 0, "> 0"),
        ("svm.retrain_limit", cfg.svm.retrain_limit >= 0, ">= 0"),
        ("svm.max_negatives", cfg.svm.max_negatives is None or cfg.svm.max_negatives >= 1, ">= 1 or null"),
        ("finetune.freeze", cfg.finetune.freeze is None or cfg.finetune.freeze in GOOGLENET_LAYERS,
         f"null or one of GoogLeNet's layers ({', '.join(GOOGLENET_LAYERS)})"),
        ("finetune.fg_balance", cfg.finetune.fg_balance >= 0, ">= 0 (0 uniform over windows, 1 every class alike)"),
        ("multibox.patience", cfg.multibox.patience is None or cfg.multibox.patience >= 1, ">= 1 or null"),
        ("multibox.holdout", 0 < cfg.multibox.holdout < 1, "in (0, 1)"),
        ("finetune.bg_candidates", cfg.finetune.bg_candidates >= 1, ">= 1 (1 = uniform background draws)"),
        ("finetune.image_cache_mb", cfg.finetune.image_cache_mb >= 0, ">= 0 (0: only the image at hand)"),
        ("features.max_side", cfg.features.max_side is None or cfg.features.max_side >= 32, ">= 32 or null (the full image)"),
        ("proposals.ss.max_side", cfg.proposals.ss.max_side is None or cfg.proposals.ss.max_side >= 32,
         ">= 32 or null (the full image)"),
        ("detect.nms_iou", cfg.detect.nms_iou is None or 0 < cfg.detect.nms_iou <= 1, "in (0, 1] or null"),
        ("eval.top_multiple", cfg.eval.top_multiple > 0, "> 0"),
        ("eval.gallery_size", cfg.eval.gallery_size >= 0, ">= 0"),
        ("detect.max_per_class", cfg.detect.max_per_class is None or cfg.detect.max_per_class >= 1, ">= 1 or null"),
        ("detect.max_per_image", cfg.detect.max_per_image is None or cfg.detect.max_per_image >= 1, ">= 1 or null"),
        ("detect.max_per_class_split", cfg.detect.max_per_class_split is None or cfg.detect.max_per_class_split > 0,
         "> 0 or null"),
    ]
    pc = cfg.pretrain
    pchecks = [
        ("pretrain.crop_scale", len(pc.crop_scale) == 2 and 0 < pc.crop_scale[0] <= pc.crop_scale[1] <= 1, "[min, max] in (0, 1]"),
        ("pretrain.crop_ratio", len(pc.crop_ratio) == 2 and 0 < pc.crop_ratio[0] <= pc.crop_ratio[1], "[min, max], 0 < min <= max"),
        ("pretrain.interpolations", bool(pc.interpolations) and set(pc.interpolations) <= set(INTERPOLATIONS), f"some of {list(INTERPOLATIONS)}"),
        ("pretrain.test_schemes", set(pc.test_schemes) <= set(TEST_SCHEMES), f"some of {list(TEST_SCHEMES)}"),
        ("pretrain.input_size", pc.input_size >= 32, ">= 32"),
        ("pretrain.test_size", pc.test_size is None or pc.test_size >= 32, "null or >= 32"),
        ("pretrain.epochs", pc.epochs >= 1, ">= 1"),
        ("pretrain.batch_size", pc.batch_size >= 1, ">= 1"),
        ("pretrain.ema_decay", pc.ema_decay is None or 0 < pc.ema_decay < 1, "in (0, 1) or null"),
    ]  # fmt: skip
    for key, ok, rule in checks + pchecks:
        if not ok:
            raise ConfigError(f"{key} must be {rule}, got {OmegaConf.select(cfg, key)}")
    if not cfg.svm.classifiers and (not cfg.finetune.enabled or cfg.detect.scores == Scores.svm):
        raise ConfigError("svm.classifiers=false trains no SVMs: the detector scores with the fine-tuned network's "
                          "classifier, so it needs finetune.enabled=true and detect.scores=softmax or null "
                          f"(got finetune.enabled={cfg.finetune.enabled}, detect.scores="
                          f"{asked_scores(cfg)})")  # fmt: skip
    if OmegaConf.get_type(cfg.dataset) is CocoConfig and cfg.dataset.root is None:
        unset = [f"dataset.{k}" for k in ("train_json", "test_json") if cfg.dataset[k] is None]
        if unset:
            raise ConfigError(f"missing value for {', '.join(unset)}: set dataset.root=FOLDER (the JSON files are found "
                              f"there) or {' '.join(f'{k}=FILE' for k in unset)}")  # fmt: skip
    if cfg.dataset.limit is not None and cfg.dataset.limit < 1:
        raise ConfigError(f"dataset.limit must be >= 1 or null, got {cfg.dataset.limit}")
    if cfg.stage == Stage.analyze:  # an alias: the evaluation with its error analysis, in <out>/eval/
        cfg.stage, cfg.eval.analyze = Stage.eval, True
    return cfg


def num_workers(cfg: DictConfig) -> int:
    """``cfg.workers``, with 0 meaning one per CPU core available to this process."""
    return int(cfg.workers) or cores()


def asked_scores(cfg: DictConfig) -> str | None:
    """``detect.scores`` as its name (``svm`` / ``softmax``), or None where the command leaves it to the detector."""
    return cfg.detect.scores.value if cfg.detect.scores is not None else None


def to_dict(node: DictConfig) -> dict:
    """A resolved plain ``dict`` of a config node (enums as their names), for hashing and JSON."""
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
