import json
import logging
from pathlib import Path

import numpy as np
import pytest

from rcnn.config import load_config
from rcnn.datasets import DatasetError, build_dataset, read_image
from rcnn.datasets.demo import CLASSES

from .fakes import coco_json, voc_xml, write_coco, write_ilsvrc, write_image, write_voc


def voc(root, *extra):
    return build_dataset(load_config(["dataset=voc", f"dataset.root={root}", *extra]).dataset)


def coco(paths, *extra):
    return build_dataset(load_config(["dataset=coco", *[f"dataset.{k}={v}" for k, v in paths.items()], *extra]).dataset)


# -- VOC ---------------------------------------------------------------------------------------


def test_voc_loads_splits_boxes_and_classes(tmp_path):
    ds = voc(write_voc(tmp_path))
    assert ds.classes == ("cat", "dog")  # sorted names found in the annotations
    assert ds.splits == {"trainval": ["img1", "img2"], "test": ["img3", "img1"]}
    a = ds.annotation("img1")
    # VOC 1-based inclusive (1, 1, 10, 20) is continuous (0, 0, 10, 20): 10 pixels wide.
    np.testing.assert_array_equal(a.boxes, [[0, 0, 10, 20], [4, 5, 30, 40]])
    assert a.labels.tolist() == [0, 1] and a.difficult.tolist() == [False, True]
    assert (a.width, a.height) == (64, 48)
    assert ds.annotation("img3").boxes.shape == (0, 4)
    img = ds.load_image("img2")
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8
    stats = ds.split_stats("trainval")
    assert stats["images"] == 2 and stats["boxes"] == 3 and stats["difficult"] == 1 and stats["classes"] == 2


def test_voc_given_classes_fix_the_label_order(tmp_path):
    ds = voc(write_voc(tmp_path), "dataset.classes=[dog,cat,bird]")
    assert ds.classes == ("dog", "cat", "bird")
    assert ds.annotation("img1").labels.tolist() == [1, 0]


def test_voc_limit_keeps_the_first_images_of_each_split(tmp_path):
    ds = voc(write_voc(tmp_path), "dataset.limit=1")
    assert ds.splits == {"trainval": ["img1"], "test": ["img3"]}


def test_voc_custom_split_names(tmp_path):
    write_voc(tmp_path, splits={"train": ["img1"], "val": ["img2", "img3"]})
    ds = voc(tmp_path, "dataset.train_split=train", "dataset.test_split=val")
    assert ds.image_ids(ds.test_split) == ["img2", "img3"]


def test_voc_size_missing_is_read_from_the_image(tmp_path):
    write_voc(tmp_path)
    (tmp_path / "Annotations" / "img3.xml").write_text(voc_xml("img3.jpg", None, None, []))
    a = voc(tmp_path).annotation("img3")
    assert (a.width, a.height) == (64, 48)


def test_voc_uses_filename_tag_when_id_ext_is_absent(tmp_path):
    write_voc(tmp_path)
    (tmp_path / "JPEGImages" / "img3.jpg").rename(tmp_path / "JPEGImages" / "photo3.jpeg")
    (tmp_path / "Annotations" / "img3.xml").write_text(voc_xml("photo3.jpeg", 64, 48, []))
    assert voc(tmp_path).image_path("img3").name == "photo3.jpeg"


@pytest.mark.parametrize(
    "content, message",
    [("", "empty annotation file"), ("<annotation><object>", "malformed XML"), ("<foo/>", "expected <annotation>")],
)
def test_voc_bad_annotation_file_names_it(tmp_path, content, message):
    write_voc(tmp_path)
    (tmp_path / "Annotations" / "img2.xml").write_text(content)
    with pytest.raises(DatasetError, match=message) as e:
        voc(tmp_path)
    assert "img2.xml" in str(e.value)


def test_voc_non_numeric_coordinate_names_file_and_object(tmp_path):
    write_voc(tmp_path)
    (tmp_path / "Annotations" / "img2.xml").write_text(voc_xml("img2.jpg", 64, 48, [("dog", "a", 1, 5, 5)]))
    with pytest.raises(DatasetError, match=r"img2.xml: object 0 \(dog\) <bndbox>: <xmin> is 'a'"):
        voc(tmp_path)


def test_voc_missing_image_names_the_file(tmp_path):
    write_voc(tmp_path)
    (tmp_path / "JPEGImages" / "img2.jpg").unlink()
    with pytest.raises(DatasetError, match=r"img2.jpg: image file not found \(annotated in .*img2.xml\)"):
        voc(tmp_path)


def test_voc_missing_annotation_and_split_list(tmp_path):
    write_voc(tmp_path)
    (tmp_path / "Annotations" / "img2.xml").unlink()
    with pytest.raises(DatasetError, match="img2.xml: annotation file not found"):
        voc(tmp_path)
    with pytest.raises(DatasetError, match=r"nosuch.txt: split list of 'nosuch' not found \(lists there: test, trainval\)"):
        voc(tmp_path, "dataset.test_split=nosuch")


@pytest.mark.parametrize(
    "lists, chosen",
    [
        (["train", "test"], ("train", "test")),  # roadsigns
        (["train", "val", "trainval", "test", "cat_train"], ("trainval", "test")),  # VOC 2007
        (["train", "val", "trainval"], ("train", "val")),  # VOC 2012: trainval holds val
    ],
)
def test_voc_auto_splits_take_the_lists_the_tree_has(tmp_path, lists, chosen):
    write_voc(tmp_path, splits={name: ["img1", "img2"] if "train" in name else ["img3"] for name in lists})
    ds = voc(tmp_path)
    assert (ds.train_split, ds.test_split) == chosen
    assert ds.image_ids(ds.test_split) == ["img3"]
    explicit = voc(tmp_path, f"dataset.train_split={chosen[0]}", f"dataset.test_split={chosen[1]}")
    assert explicit.fingerprint() == ds.fingerprint()


def test_voc_auto_splits_missing_name_what_is_there(tmp_path, caplog):
    write_voc(tmp_path, splits={"trainval": ["img1", "img2"], "val": ["img3"]})
    with pytest.raises(DatasetError, match=r"Main: no train.txt to take as the train split \(lists there: trainval, "
                                           r"val\); set dataset.train_split=NAME \(VOC's trainval.txt holds val's"):  # fmt: skip
        voc(tmp_path)  # trainval would hold the test images
    (tmp_path / "ImageSets" / "Main" / "val.txt").unlink()
    with pytest.raises(DatasetError, match=r"Main: no test.txt or val.txt to take as the test split \(lists there: "
                                           r"trainval\); set dataset.test_split=NAME"):  # fmt: skip
        voc(tmp_path, "dataset.train_split=trainval")
    assert voc(tmp_path, "dataset.test_split=trainval").image_ids("trainval") == ["img1", "img2"]
    # a training list alone, both splits auto: 30% of its images held out by id, as a tree without lists
    ids = [f"photo{k:02d}" for k in range(20)]
    write_voc(tmp_path / "one", images={i: [("cat", 1, 1, 10, 20)] for i in ids + ["unlisted"]}, splits={"trainval": ids})
    with caplog.at_level(logging.INFO, logger="rcnn.datasets"):
        ds = voc(tmp_path / "one")
    train, test = ds.image_ids("train"), ds.image_ids("test")
    assert sorted(train + test) == ids and not set(train) & set(test) and 2 <= len(test) <= 10
    assert "trainval.txt: no test or val list: testing on" in caplog.text
    write_voc(tmp_path / "all", images={i: [("cat", 1, 1, 10, 20)] for i in ids}, splits={})
    assert voc(tmp_path / "all").splits == ds.splits  # the same images held out as without any list


def test_voc_without_split_lists_holds_out_30_percent_by_id(tmp_path, caplog):
    images = {f"photo{k:02d}": [("cat", 1, 1, 10, 20)] for k in range(20)}
    write_voc(tmp_path, images=images, splits={})
    with caplog.at_level(logging.INFO, logger="rcnn.datasets"):
        ds = voc(tmp_path)
    assert (ds.train_split, ds.test_split) == ("train", "test")
    train, test = ds.image_ids("train"), ds.image_ids("test")
    assert 2 <= len(test) <= 10 and sorted(train + test) == sorted(images) and not set(train) & set(test)
    assert f"testing on {len(test)} of the 20 annotated images" in caplog.text
    # the held-out images depend on their ids alone: with more images the first ones stay where they were
    write_voc(tmp_path, images={f"photo{k:02d}": [] for k in range(20, 200)}, splits={})
    more = voc(tmp_path)
    assert set(more.image_ids("test")) & set(images) == set(test)
    assert 0.2 < len(more.image_ids("test")) / 200 < 0.4
    for xml in (tmp_path / "Annotations").glob("*.xml"):
        if xml.stem != "photo00":
            xml.unlink()
    with pytest.raises(DatasetError, match="1 annotation file"):
        voc(tmp_path)


def test_voc_kaggle_layout_annotations_beside_images(tmp_path, caplog):
    # Kaggle's VOC sets (andrewmvd's road signs, face masks, car plates) and Label Studio's export: annotations/
    # (or Annotations/) beside images/, no split lists
    images = {f"road{k}": [("sign", 1, 1, 10, 20)] for k in range(10)}
    write_voc(tmp_path, images=images, splits={})
    (tmp_path / "Annotations").rename(tmp_path / "annotations")
    (tmp_path / "JPEGImages").rename(tmp_path / "images")
    with caplog.at_level(logging.INFO, logger="rcnn.datasets"):
        ds = voc(tmp_path)
    assert sorted(ds.image_ids("train") + ds.image_ids("test")) == sorted(images) and ds.image_ids("test")
    assert ds.image_path("road3") == tmp_path / "images" / "road3.jpg" and ds.annotation("road3").labels.tolist() == [0]
    assert "annotations in annotations/, images in images/" in caplog.text
    write_voc(tmp_path / "tree", images=images, splits={})
    assert voc(tmp_path / "tree").splits == ds.splits  # the same images held out as in a VOC tree


def write_xml_beside_images(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for k, (image_id, objects) in enumerate(images.items()):
        write_image(folder / f"{image_id}.jpg", seed=k)
        (folder / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.jpg", 64, 48, objects))


def test_voc_xml_beside_images_a_folder_a_split(tmp_path):
    # Roboflow's VOC export: train/, valid/, test/, each holding XML files and their images
    write_xml_beside_images(tmp_path / "train", {"a": [("cat", 1, 1, 10, 20)], "b": [("dog", 2, 2, 30, 30)]})
    write_xml_beside_images(tmp_path / "valid", {"a": [("dog", 5, 5, 20, 20)]})  # the same stem in two folders
    ds = voc(tmp_path)
    assert ds.splits == {"train": ["train/a", "train/b"], "valid": ["valid/a"]}
    assert ds.image_path("valid/a") == tmp_path / "valid" / "a.jpg"
    assert ds.annotation("valid/a").labels.tolist() == [1]
    write_xml_beside_images(tmp_path / "test", {"c": []})
    assert voc(tmp_path).test_split == "test"  # test before valid
    assert voc(tmp_path, "dataset.test_split=valid").image_ids("valid") == ["valid/a"]
    with pytest.raises(DatasetError, match=r"no XML files in holdout/ for the test split; set dataset.test_split=FOLDER"):
        voc(tmp_path, "dataset.test_split=holdout")
    # a train/ folder alone (an export without a split): 30% of it held out by id
    alone = {f"p{k}": [("cat", 1, 1, 10, 20)] for k in range(10)}
    write_xml_beside_images(tmp_path / "one" / "train", alone)
    ds = voc(tmp_path / "one")
    assert sorted(ds.image_ids("train") + ds.image_ids("test")) == [f"train/{i}" for i in sorted(alone)]
    assert ds.image_ids("test") and ds.image_path(ds.image_ids("test")[0]).parent == tmp_path / "one" / "train"


def test_voc_xml_beside_images_in_one_folder(tmp_path):
    # LabelImg's folder: every XML beside its image, no split: 30% held out by id, as a tree without lists
    images = {f"p{k}": [("cat", 1, 1, 10, 20)] for k in range(10)}
    write_xml_beside_images(tmp_path, images)
    ds = voc(tmp_path)
    assert sorted(ds.image_ids("train") + ds.image_ids("test")) == sorted(images)
    write_voc(tmp_path / "tree", images=images, splits={})  # the same ids in a VOC tree: the same split
    assert voc(tmp_path / "tree").splits == ds.splits
    with pytest.raises(DatasetError, match="not a VOC dataset folder .no Annotations/ inside, no train/ with XML"):
        voc(tmp_path / "tree" / "JPEGImages")
    (tmp_path / "devkit").mkdir()
    (tmp_path / "tree").rename(tmp_path / "devkit" / "VOC2007")  # VOCdevkit/ given instead of VOCdevkit/VOC2007/
    with pytest.raises(DatasetError, match=r"XML files\); it holds VOC2007/, or set dataset.root=PATH"):
        voc(tmp_path / "devkit")


def test_voc_image_found_by_common_extension(tmp_path):
    write_voc(tmp_path)
    (tmp_path / "JPEGImages" / "img3.jpg").rename(tmp_path / "JPEGImages" / "img3.png")
    (tmp_path / "Annotations" / "img3.xml").write_text(voc_xml("img3.jpg", 64, 48, []))  # the XML names the old file
    assert voc(tmp_path).image_path("img3").name == "img3.png"


def test_voc_not_a_dataset_folder(tmp_path):
    with pytest.raises(DatasetError, match="not a VOC dataset folder"):
        voc(tmp_path / "nothing")


def test_voc_unreadable_image_names_the_file(tmp_path):
    write_voc(tmp_path)
    (tmp_path / "JPEGImages" / "img2.jpg").write_bytes(b"not a jpeg at all")
    ds = voc(tmp_path)
    with pytest.raises(DatasetError, match=r"img2.jpg: unreadable image"):
        ds.load_image("img2")


def test_voc_image_size_disagreeing_with_annotation(tmp_path):
    write_voc(tmp_path)
    write_image(tmp_path / "JPEGImages" / "img2.jpg", width=48, height=64)
    with pytest.raises(DatasetError, match=r"img2.jpg: image is 48x64 but .*img2.xml says 64x48 \(its width and height swapped, and no EXIF"):
        voc(tmp_path).load_image("img2")


def test_a_phone_photo_annotated_as_its_exif_orientation_shows_it_is_taken_turned(tmp_path):
    """A phone stores a portrait photo's pixels sideways with an EXIF orientation; most annotation tools show it
    turned, so the XML says the turned size. load_image then turns it (and only then); image=PATH always does."""
    from PIL import Image

    from rcnn.datasets.base import read_image

    write_voc(tmp_path)  # 64x48 images, annotated so
    stored = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)  # 48 wide, 64 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the viewer shows it 64 wide, 48 high
    Image.fromarray(stored).save(tmp_path / "JPEGImages" / "img2.jpg", exif=exif, quality=100)
    path = tmp_path / "JPEGImages" / "img2.jpg"
    raw, shown = read_image(path), read_image(path, orient=True)
    assert raw.shape == (64, 48, 3) and shown.shape == (48, 64, 3)
    np.testing.assert_array_equal(shown, np.rot90(raw, k=-1))  # turned clockwise
    ds = voc(tmp_path)
    for _ in range(2):  # (each time from one decode: the stored size and the EXIF tag are read first)
        np.testing.assert_array_equal(ds.load_image("img2"), shown)
    Image.fromarray(np.ascontiguousarray(np.rot90(stored, k=-1))).save(path, exif=exif)  # stored 64x48, as annotated
    assert voc(tmp_path).load_image("img2").shape == (48, 64, 3)  # the pixels as stored: the annotation's size


def test_voc_unknown_class_names_file_and_object(tmp_path):
    write_voc(tmp_path)
    with pytest.raises(DatasetError, match=r"img1.xml: object 1 has class 'dog', which is not in dataset.classes"):
        voc(tmp_path, "dataset.classes=[cat]")


def test_bad_boxes_are_clipped_or_dropped_with_a_warning_naming_them(tmp_path, caplog):
    objects = {
        "img1": [
            ("cat", 1, 1, 10, 10),  # fine
            ("cat", -5, 1, 10, 10),  # partly outside: clipped to x1 = 0
            ("cat", 10, 5, 10, 20),  # x2 <= x1 (continuous 9..10 is fine: one pixel) -> kept
            ("cat", 12, 5, 10, 20),  # xmax < xmin: dropped
            ("dog", 70, 50, 90, 60),  # entirely outside the 64x48 image: dropped
            ("dog", 60, 40, 80, 60),  # partly outside: clipped to (59, 39, 64, 48)
        ]
    }
    write_voc(tmp_path, images=objects, splits={"trainval": ["img1"], "test": ["img1"]})
    with caplog.at_level(logging.WARNING, logger="rcnn.datasets"):
        ds = voc(tmp_path)
    a = ds.annotation("img1")
    np.testing.assert_array_equal(a.boxes, [[0, 0, 10, 10], [0, 0, 10, 10], [9, 4, 10, 20], [59, 39, 64, 48]])
    assert ds.report.clipped == 2 and ds.report.dropped == 2
    text = caplog.text
    assert "img1.xml: box 1 (cat) [-6.0, 0.0, 10.0, 10.0]: partly outside the 64x48 image, clipped" in text
    assert "img1.xml: box 3 (cat) [11.0, 4.0, 10.0, 20.0]: x2 <= x1 or y2 <= y1, dropped" in text
    assert "img1.xml: box 4 (dog)" in text and "entirely outside the 64x48 image, dropped" in text


# -- image modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "P", "RGBA", "I;16"])
def test_read_image_is_always_rgb_uint8(tmp_path, mode):
    path = write_image(tmp_path / f"x.{mode.replace(';', '')}", 20, 10, mode=mode)
    img = read_image(path)
    assert img.shape == (10, 20, 3) and img.dtype == np.uint8
    if mode == "L":
        assert (img[..., 0] == img[..., 1]).all()


def test_read_image_missing_and_unreadable(tmp_path):
    with pytest.raises(DatasetError, match="nope.jpg: image file not found"):
        read_image(tmp_path / "nope.jpg")
    (tmp_path / "truncated.jpg").write_bytes(write_image(tmp_path / "ok.jpg").read_bytes()[:200])
    with pytest.raises(DatasetError, match="truncated.jpg: unreadable image"):
        read_image(tmp_path / "truncated.jpg")


# -- COCO ----------------------------------------------------------------------------------------


def test_coco_maps_categories_to_contiguous_labels_and_back(tmp_path):
    ds = coco(write_coco(tmp_path))
    assert ds.classes == ("person", "car", "dog")  # sorted by category id 1, 3, 18
    assert ds.category_ids == (1, 3, 18)
    assert ds.supercategories == (None, "vehicle", "animal")  # the error analysis's similar classes
    assert ds.splits == {"train": [7, 9], "test": [11]}
    a = ds.annotation(7)
    np.testing.assert_allclose(a.boxes, [[1.5, 2, 11.5, 22], [0, 0, 64, 48]])
    assert a.labels.tolist() == [1, 2]
    assert a.difficult.tolist() == [False, True]  # iscrowd -> ignored like a difficult box
    assert a.crowd.tolist() == [False, True]  # ... and a crowd region, which training leaves out
    assert [ds.category_ids[k] for k in a.labels] == [3, 18]
    assert ds.load_image(11).shape == (48, 64, 3)


def test_coco_splits_numbering_their_images_independently(tmp_path):
    """Issue #15: both JSON files start at id 1 (Roboflow's exports). The test split keeps its ids (what a
    detections file names), the train split's become "train:<id>"; the data stage checks them all."""
    paths = write_coco(tmp_path)
    for name, first in (("train.json", 1), ("test.json", 1)):
        data = json.loads((tmp_path / name).read_text())
        renum = {im["id"]: first + k for k, im in enumerate(data["images"])}
        for im in data["images"]:
            im["id"] = renum[im["id"]]
        for ann in data["annotations"]:
            ann["image_id"] = renum[ann["image_id"]]
        (tmp_path / name).write_text(json.dumps(data))
    ds = coco(paths)
    assert ds.splits == {"train": ["train:1", "train:2"], "test": [1]}
    assert ds.annotation("train:1").labels.tolist() == [1, 2] and ds.annotation(1).labels.tolist() == [0]
    assert ds.load_image("train:2").shape == (48, 64, 3)
    from rcnn.run import main

    keys = [f"dataset.{k}={v}" for k, v in paths.items()]
    assert main(["stage=data", "dataset=coco", *keys, f"out={tmp_path / 'run'}", "progress=false"]) == 0


def test_coco_split_names_and_limit(tmp_path):
    ds = coco(write_coco(tmp_path), "dataset.train_split=train2017", "dataset.limit=1")
    assert ds.splits == {"train2017": [7], "test": [11]}
    assert len(ds.annotation(7).labels) == 2


def test_coco_classes_subset(tmp_path):
    ds = coco(write_coco(tmp_path), "dataset.classes=[dog]")
    assert ds.classes == ("dog",) and ds.category_ids == (18,)
    assert ds.annotation(9).labels.tolist() == []


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["annotations"][0].update(category_id=99), "annotation 1 .*unknown category_id 99"),
        (lambda d: d["annotations"][0].update(image_id=12345), "annotation 1 refers to image 12345"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotation 1 \(image 7\) has bbox \[1, 2, 3\]"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, "x", 4]), "image 7 .*not a number"),
        (lambda d: d["images"].append(dict(d["images"][0])), "image id 7 appears twice"),
        (lambda d: d.pop("categories"), "missing or non-list 'categories'"),
    ],
)
def test_coco_bad_json_names_file_and_annotation(tmp_path, mutate, message):
    paths = write_coco(tmp_path)
    data = json.loads((tmp_path / "train.json").read_text())
    mutate(data)
    (tmp_path / "train.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=message) as e:
        coco(paths)
    assert "train.json" in str(e.value)


def test_coco_empty_malformed_and_missing_files(tmp_path):
    paths = write_coco(tmp_path)
    (tmp_path / "train.json").write_text("")
    with pytest.raises(DatasetError, match="train.json: empty COCO annotation file"):
        coco(paths)
    (tmp_path / "train.json").write_text("{not json")
    with pytest.raises(DatasetError, match="train.json: malformed JSON"):
        coco(paths)
    (tmp_path / "train.json").unlink()
    with pytest.raises(DatasetError, match="train.json: COCO annotation file not found"):
        coco(paths)


def test_coco_missing_image_and_mismatched_categories(tmp_path):
    paths = write_coco(tmp_path)
    (tmp_path / "test" / "c.jpg").unlink()
    with pytest.raises(DatasetError, match=r"c.jpg: image file not found \(image 11 of .*test.json\)"):
        coco(paths)
    write_coco(tmp_path)
    (tmp_path / "test.json").write_text(json.dumps(coco_json([], [], [{"id": 1, "name": "person"}])))
    with pytest.raises(DatasetError, match="categories differ"):
        coco(paths)


def test_coco_images_beside_their_json_and_json_found_in_root(tmp_path, caplog):
    # Roboflow's export: <split>/_annotations.coco.json beside the images, the dataset itself a category
    paths = write_coco(tmp_path)
    for split in ("train", "test"):
        Path(paths[f"{split}_json"]).rename(tmp_path / f"{split}.src")
        paths[f"{split}_json"] = str(tmp_path / f"{split}.src")
    cats = [{"id": 0, "name": "things", "supercategory": "none"}] + [
        {**c, "supercategory": "things"} for c in json.loads(Path(paths["train_json"]).read_text())["categories"]
    ]
    for split, folder in (("train", "train"), ("test", "valid")):
        data = json.loads(Path(paths[f"{split}_json"]).read_text())
        data["categories"] = cats
        (tmp_path / folder).mkdir(exist_ok=True)
        if folder != split:
            for f in (tmp_path / split).iterdir():
                f.rename(tmp_path / folder / f.name)
        (tmp_path / folder / "_annotations.coco.json").write_text(json.dumps(data))
    with caplog.at_level(logging.INFO, logger="rcnn.datasets"):
        ds = coco({"root": tmp_path})
    assert ds.classes == ("person", "car", "dog")  # "things" (id 0, no annotation, their supercategory) left out
    assert "left out 'things' (id 0)" in caplog.text
    assert ds.image_path(11) == tmp_path / "valid" / "c.jpg"
    assert len(ds.image_ids("train")) == 2
    kept = coco({"root": tmp_path}, "dataset.classes=[things,dog]")  # named, it stays
    assert kept.classes == ("things", "dog")
    with pytest.raises(DatasetError, match=r"no instances JSON for the train split \(looked for train/_annotations"):
        coco({"root": tmp_path / "valid"})


def test_coco_train_file_alone_holds_out_30_percent_by_file_name(tmp_path, caplog):
    # Roboflow's export of an unsplit set: train/_annotations.coco.json alone
    from tests.fakes import coco_json

    images = [{"id": k, "file_name": f"p{k:02d}.jpg", "width": 64, "height": 48} for k in range(20)]
    anns = [{"id": k + 1, "image_id": k, "category_id": 1, "bbox": [2, 2, 20, 20], "iscrowd": 0, "area": 400} for k in range(20)]
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "_annotations.coco.json").write_text(json.dumps(coco_json(images, anns)))
    for k, im in enumerate(images):
        write_image(tmp_path / "train" / im["file_name"], 64, 48, seed=k)
    with caplog.at_level(logging.INFO, logger="rcnn.datasets"):
        ds = coco({"root": tmp_path})
    train, test = ds.image_ids(ds.train_split), ds.image_ids(ds.test_split)
    assert sorted(train + test) == list(range(20)) and not set(train) & set(test) and 2 <= len(test) <= 10
    assert all(len(ds.annotation(i).boxes) == 1 for i in train + test)  # each image keeps its own box
    assert f"testing on {len(test)} of its 20 images" in caplog.text
    images.reverse()  # the same file names listed in another order: the same images held out
    (tmp_path / "train" / "_annotations.coco.json").write_text(json.dumps(coco_json(images, anns)))
    assert sorted(coco({"root": tmp_path}).image_ids(ds.test_split)) == sorted(test)


@pytest.mark.parametrize("layout", ["cvat", "label-studio"])
def test_coco_unsplit_exports_of_annotation_tools_found_in_root(tmp_path, layout):
    """CVAT's COCO export (annotations/instances_default.json, images/) and Label Studio's (result.json, file
    names under images/): one file, so 30% of its images test."""
    from tests.fakes import coco_json

    prefix = "images/" if layout == "label-studio" else ""
    images = [{"id": k + 1, "file_name": f"{prefix}p{k}.jpg", "width": 64, "height": 48} for k in range(10)]
    anns = [{"id": k + 1, "image_id": k + 1, "category_id": 1, "bbox": [2, 2, 20, 20], "iscrowd": 0} for k in range(10)]
    path = tmp_path / ("annotations/instances_default.json" if layout == "cvat" else "result.json")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(coco_json(images, anns)))
    for k in range(10):
        write_image(tmp_path / "images" / f"p{k}.jpg", 64, 48, seed=k)
    ds = coco({"root": tmp_path})
    train, test = ds.image_ids(ds.train_split), ds.image_ids(ds.test_split)
    assert sorted(train + test) == list(range(1, 11)) and test and not set(train) & set(test)
    assert ds.image_path(test[0]) == tmp_path / "images" / f"p{test[0] - 1}.jpg"


def test_coco_file_names_from_the_datasets_root(tmp_path):
    # file names that carry their split's folder (train/a.jpg; test\\c.jpg as a Windows tool writes it) while the
    # JSON sits inside that folder
    paths = write_coco(tmp_path)
    for split, sep in (("train", "/"), ("test", "\\")):
        data = json.loads(Path(paths[f"{split}_json"]).read_text())
        for im in data["images"]:
            im["file_name"] = f"{split}{sep}{im['file_name']}"
        (tmp_path / split / "_annotations.coco.json").write_text(json.dumps(data))
        Path(paths[f"{split}_json"]).unlink()
    ds = coco({"root": tmp_path})
    assert ds.image_path(11) == tmp_path / "test" / "c.jpg"


def test_coco_2017_layout_found_in_root(tmp_path):
    (tmp_path / "src").mkdir()
    paths = write_coco(tmp_path / "src")
    (tmp_path / "annotations").mkdir()
    for split, name in (("train", "train2017"), ("test", "val2017")):
        Path(paths[f"{split}_json"]).rename(tmp_path / "annotations" / f"instances_{name}.json")
        Path(paths[f"{split}_images"]).rename(tmp_path / name)
    ds = coco({"root": tmp_path})
    assert ds.image_path(11) == tmp_path / "val2017" / "c.jpg"
    (tmp_path / "annotations" / "instances_train2017_copy.json").write_text("{}")
    with pytest.raises(DatasetError, match="could each be the train split's file; set dataset.train_json=FILE"):
        coco({"root": tmp_path})


def test_coco_degenerate_box_dropped_with_warning(tmp_path, caplog):
    paths = write_coco(tmp_path)
    data = json.loads((tmp_path / "train.json").read_text())
    data["annotations"][2]["bbox"] = [30, 10, 0, 5]
    (tmp_path / "train.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="rcnn.datasets"):
        ds = coco(paths)
    assert ds.annotation(9).boxes.shape == (0, 4)
    assert "image 9 (b.jpg): box 0 (annotation 3) [30.0, 10.0, 30.0, 15.0]: x2 <= x1" in caplog.text


# -- ILSVRC --------------------------------------------------------------------------------------


def test_ilsvrc_synsets_names_and_blacklist(tmp_path):
    root = write_ilsvrc(tmp_path)
    ds = build_dataset(load_config(["dataset=ilsvrc", f"dataset.root={root}"]).dataset)
    assert ds.classes == ("n02084071", "n01443537", "n09999999")  # map_det.txt order
    assert ds.display_names == ("dog", "goldfish", "unused class")
    assert ds.splits["val"] == ["ILSVRC2013_val_00000001", "ILSVRC2013_val_00000002", "ILSVRC2013_val_00000003"]
    a = ds.annotation("ILSVRC2013_val_00000002")
    assert a.labels.tolist() == [0, 1]
    np.testing.assert_array_equal(a.boxes[0], [0, 0, 8, 8])
    # blacklist line "2 n02084071": image index 2 of val.txt, class dog
    assert ds.blacklist == {("ILSVRC2013_val_00000002", 0)}
    assert ds.load_image("tr/x_1").shape == (48, 64, 3)


def test_ilsvrc_without_synset_map_or_blacklist(tmp_path):
    root = write_ilsvrc(tmp_path)
    cfg = load_config(["dataset=ilsvrc", f"dataset.root={root}", "dataset.synsets=null", "dataset.blacklist=null"])
    ds = build_dataset(cfg.dataset)
    assert ds.classes == ("n01443537", "n02084071") and not ds.blacklist


def test_ilsvrc_bad_blacklist_and_unknown_synset(tmp_path):
    root = write_ilsvrc(tmp_path)
    bl = root / "devkit" / "data" / "ILSVRC2015_det_validation_blacklist.txt"
    bl.write_text("2 n00000000\n")
    with pytest.raises(DatasetError, match=r"blacklist.txt: line 1 '2 n00000000'"):
        build_dataset(load_config(["dataset=ilsvrc", f"dataset.root={root}"]).dataset)
    (root / "devkit" / "data" / "map_det.txt").write_text("n02084071 1 dog\n")
    with pytest.raises(DatasetError, match="class 'n01443537', which is not in dataset.classes"):
        build_dataset(load_config(["dataset=ilsvrc", f"dataset.root={root}"]).dataset)


# -- presets and the demo ------------------------------------------------------------------------


def test_missing_preset_data_says_where_to_put_it(tmp_path):
    cfg = load_config(["dataset=voc2007", f"dataset.root={tmp_path / 'VOC2007'}"])
    with pytest.raises(DatasetError, match="VOCtrainval_06-Nov-2007.tar .* or set dataset.root=PATH"):
        build_dataset(cfg.dataset)
    cfg = load_config(["dataset=coco2017", f"dataset.root={tmp_path}"])
    with pytest.raises(DatasetError, match="instances_train2017.json: COCO annotation file not found; unzip"):
        build_dataset(cfg.dataset)


def demo(root, *extra):
    return build_dataset(load_config(["dataset=demo", f"dataset.root={root}", *extra]).dataset)


def test_demo_is_deterministic_and_regenerates_on_new_settings(tmp_path):
    small = ["dataset.train_images=6", "dataset.test_images=3"]
    a, b = demo(tmp_path / "a", *small), demo(tmp_path / "b", *small)
    assert a.classes == b.classes == CLASSES
    for i in a.image_ids("train") + a.image_ids("test"):
        np.testing.assert_array_equal(a.annotation(i).boxes, b.annotation(i).boxes)
        assert a.image_path(i).read_bytes() == b.image_path(i).read_bytes()
    before = a.load_image("train_0000")
    c = demo(tmp_path / "a", "dataset.train_images=6", "dataset.test_images=3", "dataset.seed=1")
    assert len(c.image_ids("test")) == 3
    assert not np.array_equal(c.load_image("train_0000"), before)  # regenerated in place


def test_demo_has_varied_objects_and_valid_boxes(tmp_path):
    ds = demo(tmp_path, "dataset.train_images=30", "dataset.test_images=2")
    boxes = np.concatenate([ds.annotation(i).boxes for i in ds.image_ids("train")])
    labels = np.concatenate([ds.annotation(i).labels for i in ds.image_ids("train")])
    assert set(labels.tolist()) == set(range(len(CLASSES)))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (w > 0).all() and (h > 0).all() and boxes.min() >= 0
    assert (boxes[:, 2] <= 320).all() and (boxes[:, 3] <= 240).all()
    assert w.max() / w.min() > 2 and (w / h).max() > 1.5 and (w / h).min() < 0.67
    assert ds.report.clipped == ds.report.dropped == 0


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a demo dataset folder"):
        demo(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "precious"


ROADSIGNS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "roadsigns"


@pytest.mark.slow
@pytest.mark.skipif(not ROADSIGNS.exists(), reason="needs ../shared/datasets/roadsigns")
def test_roadsigns_splits_found_from_its_folder_alone():
    found = voc(ROADSIGNS)
    preset = build_dataset(load_config(["dataset=roadsigns"]).dataset)
    assert (found.train_split, found.test_split) == ("train", "test")
    assert found.splits == preset.splits and len(found.image_ids("train")) == 614
