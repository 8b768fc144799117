import pytest

from rcnn.config import DATASET_PRESETS, ConfigError, Stage, load_config


def test_defaults_are_the_demo_pipeline():
    cfg = load_config([])
    assert cfg.stage == Stage.all and cfg.dataset.name == "demo" and cfg.out == "data/runs/demo"


def test_dataset_preset_and_its_keys():
    cfg = load_config(["dataset=coco128", "dataset.root=/data/c", "dataset.limit=5", "stage=data"])
    assert cfg.dataset.train_json == "/data/c/annotations/instances_train2017.json"
    assert cfg.dataset.limit == 5 and cfg.stage == Stage.data and cfg.out == "data/runs/coco128"


def test_the_shapes_preset_is_the_demo_without_colour_and_with_longer_fine_tuning():
    demo, shapes = load_config([]), load_config(["dataset=shapes"])
    assert not shapes.dataset.class_colours and demo.dataset.class_colours
    assert shapes.dataset.root != demo.dataset.root and shapes.out == "data/runs/shapes"
    assert (shapes.finetune.iterations, shapes.finetune.step_size, shapes.finetune.bg_candidates) == (600, 480, 4)
    assert shapes.features.input_size == demo.features.input_size and shapes.proposals.top_n == demo.proposals.top_n
    assert not shapes.auto and load_config(["dataset=shapes", "finetune.iterations=50"]).finetune.iterations == 50


@pytest.mark.parametrize(
    "override, message",
    [
        ("stage=train", "unknown stage 'train'. Valid stages: data, pretrain, proposals, multibox, finetune"),
        ("nonsense=1", "unknown key 'nonsense' at the top level. Valid keys: dataset, stage, auto, out, seed"),
        ("dataset.nonsense=1", "unknown key 'dataset.nonsense' at 'dataset'. Valid keys: name, "),
        ("dataset=imagenet", "unknown dataset 'imagenet'. Valid choices: demo, voc, coco, ilsvrc, coco128"),
        ("seed=abc", "bad value for 'seed': Value 'abc' of type 'str' could not be converted to Integer"),
        ("progress=maybe", "bad value for 'progress'"),
        ("dataset.limit=0", "dataset.limit must be >= 1"),
        ("workers=-1", "workers must be >= 0"),
        ("finetune.freeze=conv9", "finetune.freeze must be null or one of GoogLeNet's layers (conv1, maxpool1,"),
        ("finetune.fg_balance=-1", "finetune.fg_balance must be >= 0"),
        ("finetune.bg_candidates=0", "finetune.bg_candidates must be >= 1"),
        ("finetune.image_cache_mb=-1", "finetune.image_cache_mb must be >= 0"),
        ("features.max_side=0", "features.max_side must be >= 32 or null"),
        ("proposals.ss.max_side=10", "proposals.ss.max_side must be >= 32 or null"),
        ("finetune.image_cache=256", "unknown key 'finetune.image_cache' at 'finetune'. Valid keys: enabled,"),  # now image_cache_mb
        ("multibox.patience=0", "multibox.patience must be >= 1 or null"),
        ("multibox.holdout=1.0", "multibox.holdout must be in (0, 1)"),
        ("+extra=1", "keys can be set but not added or deleted"),
        ("stage", "is not a key=value override"),
        ("--stage=data", "without dashes, and keys can be set but not added or deleted; did you mean stage=data?"),
        ("dataset.classes=[cat,dog", "cannot parse 'dataset.classes=[cat,dog'"),
        ("seed=1=2", "bad value for 'seed'"),
    ],
)
def test_bad_command_lines_list_what_is_valid(override, message):
    with pytest.raises(ConfigError) as e:
        load_config([override])
    assert message in str(e.value)


def test_the_wrong_one_of_two_datasets_is_named():
    with pytest.raises(ConfigError, match="unknown dataset 'vco'"):
        load_config(["dataset=voc", "dataset=vco"])


@pytest.mark.parametrize("path", ["/photos/my photos (2024)/", "/data/it's here", "a(b", "C:\\dir\\", "x=y", "[draft"])
def test_paths_with_shell_characters_arrive_as_typed(path):
    """The shell strips a user's quotes; whatever Hydra's grammar would reject is taken as the string it is
    (except a leading bracket or quote: Hydra's own list and string syntax, reported when unclosed)."""
    if path.startswith("["):
        with pytest.raises(ConfigError, match="Close brackets and quotes"):
            load_config([f"out={path}"])
        return
    assert load_config([f"out={path}"]).out == path


def test_missing_required_keys_are_named():
    with pytest.raises(ConfigError, match="missing value for dataset.root"):
        load_config(["dataset=voc"])
    with pytest.raises(ConfigError, match="missing value for dataset.train_json, dataset.test_json: set dataset.root="):
        load_config(["dataset=coco"])
    with pytest.raises(ConfigError, match=r"missing value for dataset.test_json: .* or dataset.test_json=FILE$"):
        load_config(["dataset=coco", "dataset.train_json=x.json"])
    assert load_config(["dataset=coco", "dataset.root=x"]).dataset.train_json is None  # found in x when loaded


def test_every_preset_composes():
    for name in DATASET_PRESETS:
        extra = {"voc": ["dataset.root=x"], "ilsvrc": ["dataset.root=x"],
                 "coco": [f"dataset.{k}=x" for k in ("train_json", "train_images", "test_json", "test_images")]}
        cfg = load_config([f"dataset={name}", *extra.get(name, [])])
        assert cfg.dataset.name == name


def test_help_writes_lists_as_the_command_line_does_and_keeps_every_comment_line():
    from rcnn.config import usage

    text = usage(["dataset=roadsigns"])
    lines = {line.split(":")[0].strip(): line for line in text.splitlines() if ": " in line}
    assert lines["crop_scale"].startswith("  crop_scale: [0.35,1.0]  # crop area")  # one shell word
    assert "C_grid: [0.0001,0.001,0.01,0.1]  #" in lines["C_grid"]
    # a comment that runs on over the next line (the next field has its own) is read whole
    assert lines["shard"].endswith('see README "Running at scale". Under torchrun, null takes the rank and world size.')
    assert lines["max_per_class_split"].endswith("its ILSVRC runs 30,000 over 20k = 1.5); null = all")
    # comment lines above a field without one of its own stay that field's
    assert lines["max_negatives"].split("# ", 1)[1].startswith("Hard negatives a class keeps after a retrain")
    for override in ("pretrain.crop_scale=[0.35,1.0]", "svm.C_grid=[0.0001,0.001,0.01,0.1]"):
        load_config([override])  # what help shows is what a command line takes
