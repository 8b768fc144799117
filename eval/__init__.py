"""Evaluation: VOC, ILSVRC and COCO mAP, reports (stage=eval) and the chain benchmark (stage=benchmark)."""
