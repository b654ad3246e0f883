"""Class names of every supported data set, each in that data set's own label order (docs/method.md §5).

At least four orders are in use in FER; labels are always mapped through these tuples, never
through a folder sort order. ``CLASS_NAMES[name]`` gives the default list for ``build_dataset``.
"""

from __future__ import annotations

# RAF-DB: labels 1..7 in list_patition_label.txt (stored 0-based).
RAFDB_CLASSES = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")
# AffectNet "expression" column 0..7 (8 None, 9 Uncertain, 10 No-Face are never classes).
AFFECTNET_CLASSES = ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt")
# FER2013 "emotion" column 0..6.
FER2013_CLASSES = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
# FERPlus vote columns, in fer2013new.csv order (unknown and NF are never classes).
FERPLUS_CLASSES = ("Neutral", "Happiness", "Surprise", "Sadness", "Anger", "Disgust", "Fear", "Contempt")

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "rafdb": RAFDB_CLASSES,
    "synthetic": RAFDB_CLASSES,
    "affectnet": AFFECTNET_CLASSES[:7],
    "affectnet7": AFFECTNET_CLASSES[:7],
    "affectnet8": AFFECTNET_CLASSES,
    "fer2013": FER2013_CLASSES,
    "ferplus": FERPLUS_CLASSES,
    "ferplus8": FERPLUS_CLASSES,
    "ferplus7": FERPLUS_CLASSES[:7],
}
