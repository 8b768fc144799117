"""Per-class linear SVMs with hard-negative mining and box regressors: the detector file (stage=svm)."""
