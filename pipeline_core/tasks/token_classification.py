"""token-classification: entities as grouped spans {entity_group, score, word, start, end}.

Tokens are labelled by the argmax of a softmax; neighbouring tokens of one entity (B-X then I-X, or repeated X)
become one span whose score is the mean of its tokens' and whose word is the original text between the span's
character offsets (the "simple" aggregation of the transformers pipeline).
"""

from __future__ import annotations

import pyarrow as pa
import torch

from pipeline_core.tasks.text import Encoded, TextEncoder

ENTITY = pa.struct(
    [("entity_group", pa.string()), ("score", pa.float32()), ("word", pa.string()),
     ("start", pa.int32()), ("end", pa.int32())]
)


class TokenClassificationTask:
    columns = {"entities": pa.list_(ENTITY)}
    slice_rows = None  # the loader's default: a text row is a few tokens

    def __init__(self, encoder: TextEncoder, model_config):
        self.encoder = encoder
        self.encode, self.collate = encoder, encoder.collate  # preprocessing, run in the workers
        self.labels = [model_config.id2label[index] for index in range(model_config.num_labels)]

    def forward(self, model, inputs: dict):
        return model(**inputs).logits

    def decode(self, logits, inputs: dict, encoded: Encoded, rows: list[int]) -> dict[str, list]:
        scores, labels = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        scores, labels = scores.cpu().tolist(), labels.cpu().tolist()
        entities = []
        for batch_row, row in enumerate(rows):
            # offsets cover the row's real tokens; labels and scores run on over the padding, which zip drops
            tokens = zip(encoded.offsets[row], labels[batch_row], scores[batch_row], strict=False)
            entities.append(group_entities(tokens, self.labels, encoded.texts[row]))
        return {"entities": entities}


def group_entities(tokens, labels: list[str], text: str) -> list[dict]:
    """Spans of consecutive tokens of one entity; special tokens (empty offsets) and O tokens end a span."""
    spans: list[dict] = []
    current = None
    for (start, end), label_id, score in tokens:
        if start == end:  # special tokens and padding carry no text
            current = None
            continue
        label = labels[label_id]
        prefix, _, kind = label.rpartition("-") if "-" in label else ("", "", label)
        if label == "O" or kind == "O":
            current = None
            continue
        continues = current is not None and current["entity_group"] == kind and prefix != "B"
        if continues:
            current["end"] = end
            current["scores"].append(score)
        else:
            current = {"entity_group": kind, "start": start, "end": end, "scores": [score]}
            spans.append(current)
    return [
        {"entity_group": span["entity_group"], "score": sum(span["scores"]) / len(span["scores"]),
         "word": text[span["start"]:span["end"]], "start": span["start"], "end": span["end"]}
        for span in spans
    ]
