import pytest

from rcnn.config import DATASET_PRESETS, ConfigError, Stage, load_config


def test_defaults_are_the_demo_pipeline():
    cfg = load_config([])
    assert cfg.stage == Stage.all and cfg.dataset.name == "demo" and cfg.out == "data/runs/demo"


def test_dataset_preset_and_its_keys():
    cfg = load_config(["dataset=coco128", "dataset.root=/data/c", "dataset.limit=5", "stage=data"])
    assert cfg.dataset.train_json == "/data/c/annotations/instances_train2017.json"
    assert cfg.dataset.limit == 5 and cfg.stage == Stage.data and cfg.out == "data/runs/coco128"


@pytest.mark.parametrize(
    "override, message",
    [
        ("stage=train", "unknown stage 'train'. Valid stages: data, pretrain, proposals, multibox, finetune"),
        ("nonsense=1", "unknown key 'nonsense' at the top level. Valid keys: dataset, stage, out, seed"),
        ("dataset.nonsense=1", "unknown key 'dataset.nonsense' at 'dataset'. Valid keys: name, "),
        ("dataset=imagenet", "unknown dataset 'imagenet'. Valid choices: demo, voc, coco, ilsvrc, coco128"),
        ("seed=abc", "bad value for 'seed': Value 'abc' of type 'str' could not be converted to Integer"),
        ("progress=maybe", "bad value for 'progress'"),
        ("dataset.limit=0", "dataset.limit must be >= 1"),
        ("workers=-1", "workers must be >= 0"),
        ("+extra=1", "adding or deleting keys is not supported"),
        ("stage", "is not a key=value override"),
    ],
)
def test_bad_command_lines_list_what_is_valid(override, message):
    with pytest.raises(ConfigError) as e:
        load_config([override])
    assert message in str(e.value)


def test_missing_required_keys_are_named():
    with pytest.raises(ConfigError, match="missing value for dataset.root"):
        load_config(["dataset=voc"])
    with pytest.raises(ConfigError, match="dataset.train_json, dataset.train_images, dataset.test_json"):
        load_config(["dataset=coco"])


def test_every_preset_composes():
    for name in DATASET_PRESETS:
        extra = {"voc": ["dataset.root=x"], "ilsvrc": ["dataset.root=x"],
                 "coco": [f"dataset.{k}=x" for k in ("train_json", "train_images", "test_json", "test_images")]}
        cfg = load_config([f"dataset={name}", *extra.get(name, [])])
        assert cfg.dataset.name == name
