"""The one schema training reads: TRL's preference columns, Pick-a-Pic's label columns (mapped onto TRL's, with ties
and bad labels skipped and counted), and the optional columns of SmPO's scores, editing sources and loss masks.

Data in other column names is renamed before training: ``train --dataset_columns`` maps the known layouts at load,
and ``datasets.Dataset.rename_columns`` any other (docs/data.md).
"""

from __future__ import annotations

__all__ = [
    "CAPTION",
    "CHOSEN",
    "IMAGE_0",
    "IMAGE_1",
    "LABEL_0",
    "MASK",
    "PROMPT",
    "REJECTED",
    "SCORE_0",
    "SCORE_1",
    "SOURCE_IMAGE",
    "SOURCE_IMAGES",
]

# TRL's preference columns
PROMPT, CHOSEN, REJECTED = "prompt", "chosen", "rejected"
# Pick-a-Pic's: label_0 is 1 (or "leftvote") when image 0 is preferred, 0 ("rightvote") when image 1 is, 0.5 a tie
CAPTION, IMAGE_0, IMAGE_1, LABEL_0 = "caption", "jpg_0", "jpg_1", "label_0"
# SmPO: the score of each image (the higher-scored one is the winner)
SCORE_0, SCORE_1 = "score_0", "score_1"
# editing: each row's source image, or its list of source images (multi-image editing)
SOURCE_IMAGE, SOURCE_IMAGES = "source_image", "source_images"
# the loss mask (loss_mask=True): an image per row, white where the preference lives
MASK = "mask"
