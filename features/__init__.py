"""Region features: GoogLeNet backbone, warped crops or RoI pooling, fine-tuning (stage=features, stage=finetune)."""
