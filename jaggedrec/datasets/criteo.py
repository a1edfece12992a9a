"""The Criteo click logs' column layout, at TorchRec's path (``torchrec.datasets.criteo``).

Each row of the Criteo 1TB / Kaggle data sets holds one label, 13 integer (dense) features
and 26 categorical (sparse) features; the 1TB set spans 24 days. Only the names and counts
are here, which is what programs written for TorchRec import to name their features; the
file readers (``CriteoIterDataPipe``, the binary preprocessing utilities) are not.
"""

from typing import List

INT_FEATURE_COUNT = 13
CAT_FEATURE_COUNT = 26
DAYS = 24
# ids seen fewer times than this are mapped to one shared id by the preprocessing TorchRec
# documents; kept so that programs reading the constant import
FREQUENCY_THRESHOLD = 3
# rows of the 1TB set's training days (0 to 22; day 23 is held out for validation and test)
TOTAL_TRAINING_SAMPLES = 4195197692
DEFAULT_LABEL_NAME = "label"
DEFAULT_INT_NAMES: List[str] = [f"int_{i}" for i in range(INT_FEATURE_COUNT)]
DEFAULT_CAT_NAMES: List[str] = [f"cat_{i}" for i in range(CAT_FEATURE_COUNT)]
# the order of the columns in a raw row: label, then dense, then sparse
DEFAULT_COLUMN_NAMES: List[str] = [DEFAULT_LABEL_NAME, *DEFAULT_INT_NAMES, *DEFAULT_CAT_NAMES]

__all__ = ["CAT_FEATURE_COUNT", "DAYS", "DEFAULT_CAT_NAMES", "DEFAULT_COLUMN_NAMES", "DEFAULT_INT_NAMES",
           "DEFAULT_LABEL_NAME", "FREQUENCY_THRESHOLD", "INT_FEATURE_COUNT", "TOTAL_TRAINING_SAMPLES"]
