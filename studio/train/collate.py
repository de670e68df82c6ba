"""Batches for the Trainer: transformers' own collators, counting the real tokens they pass on.

- packed (`TrainSettings.packing`): `DataCollatorWithFlattening` puts a batch's rows end to end in
  one padding-free row; position ids restart at each row and the first label of each row is -100, so
  with no attention mask transformers derives a block-diagonal causal mask from the position ids: no
  row attends to another and the loss is the same as one row at a time. The batch also carries the
  rows' boundaries (`cu_seq_lens_q/k`, `max_length_q/k`), with which the trainer attends to each row
  alone on a GPU (`studio.model.attention.packed_row_attention`). With CUDA graphs, each pass is padded
  to a size the graphs were captured for (`studio.train.graphs`).
- padded: `DataCollatorForSeq2Seq` pads input ids with the pad id and labels with -100.

`tokens_seen` counts the non-padding tokens of the batches made while `counting` is on (the trainer
turns it off during evaluation), for tokens/s.
"""

from __future__ import annotations

from studio.train.formatting import IGNORE
from studio.train.settings import TrainSettings


class CountingCollator:
    """Wraps a collator and counts the real tokens of each training batch it makes."""

    def __init__(self, inner):
        self.inner = inner
        self.tokens_seen = 0
        self.counting = True

    def __call__(self, features: list[dict]) -> dict:
        if self.counting:
            self.tokens_seen += sum(len(feature["input_ids"]) for feature in features)
        return self.inner([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])


class PackedCollator(CountingCollator):
    """One padding-free row per batch (transformers' `DataCollatorWithFlattening`). While
    `graph_padding` is (multiple, segments), as CUDA-graphed training sets it, each batch is padded to
    sizes the graphs were captured for (`studio.train.graphs.pad_packed`)."""

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        super().__init__(DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE,
                                                    return_flash_attn_kwargs=True))
        self.graph_padding: tuple[int, int] | None = None

    def __call__(self, features: list[dict]) -> dict:
        batch = super().__call__(features)
        if self.graph_padding is None:
            return batch
        from studio.train.graphs import pad_packed

        return pad_packed(batch, *self.graph_padding, ignore=IGNORE)


class PaddedCollator(CountingCollator):
    """Rows padded to the batch's longest (transformers' `DataCollatorForSeq2Seq`)."""

    def __init__(self, tokenizer):
        import copy

        from transformers import DataCollatorForSeq2Seq

        right = copy.copy(tokenizer)  # pads on the right whatever the shared tokenizer's default side
        right.padding_side = "right"
        super().__init__(DataCollatorForSeq2Seq(right, padding=True, label_pad_token_id=IGNORE, return_tensors="pt"))


def make_collator(settings: TrainSettings, tokenizer) -> CountingCollator:
    """The collator for `settings`: packed or padded."""
    return PackedCollator() if settings.packing else PaddedCollator(tokenizer)
