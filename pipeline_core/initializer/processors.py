"""Stage 5, processor inference: take the tokenizer, feature extractor and image processor out of a processor.

Multimodal checkpoints ship one processor that bundles the others. And an old-style "feature extractor" of a
vision model is really an image processor, so it serves as one.
"""

from __future__ import annotations


def infer_processor_parts(components) -> None:
    """Fill the components' missing tokenizer / feature extractor / image processor from what is there."""
    processor = components.processor
    if processor is not None:
        for part in ("tokenizer", "feature_extractor", "image_processor"):
            if getattr(components, part) is None:
                setattr(components, part, getattr(processor, part, None))
    if components.image_processor is None and components.feature_extractor is not None:
        # deferred: the image stack costs seconds of start-up, and a text job has no feature extractor to classify
        from transformers.image_processing_utils import BaseImageProcessor

        if isinstance(components.feature_extractor, BaseImageProcessor):
            components.image_processor = components.feature_extractor
