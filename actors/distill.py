"""The distillation actor: the caption actor's target, prompt and processor, recording what drafter
training needs instead of writing captions. For each decoded clip the target answers greedily (its
generation config's repetition penalty kept, as `model.generate()` with do_sample off), then runs
once over prompt + answer to record its features (`flash.train.distill_example`). Rows carry the
features in bfloat16 (half the bytes; training reads them back as float32) and an `error` that is
empty unless the clip could not be decoded, processed or answered.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

import flash
from actors.caption import PROCESSED, CaptionActor
from flash.train import DistillExample, distill_example

DISTILL_SCHEMA = pa.schema(
    [
        ("video_uri", pa.string()),
        ("etag", pa.string()),
        ("input_ids", pa.list_(pa.int64())),  # prompt + answer, no padding
        ("visual_mask", pa.list_(pa.bool_())),  # True at image/video tokens
        ("answer_start", pa.int64()),  # index of the first answer token
        ("features", pa.binary()),  # [len(input_ids), hidden] bfloat16, row-major
        ("hidden", pa.int64()),
        ("error", pa.string()),
    ]
)


def example_to_row(example: DistillExample) -> dict:
    features = example.features.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return {
        "input_ids": example.input_ids.tolist(),
        "visual_mask": example.visual_mask.tolist(),
        "answer_start": int(example.answer_start),
        "features": features.tobytes(),
        "hidden": int(example.features.shape[1]),
    }


def row_to_example(row: dict) -> DistillExample:
    """A distillation row back as an example; features as float32."""
    ids = torch.tensor(row["input_ids"], dtype=torch.long)
    raw = np.frombuffer(row["features"], dtype=np.int16).reshape(len(ids), int(row["hidden"]))
    features = torch.from_numpy(raw.copy()).view(torch.bfloat16).float()
    return DistillExample(ids, features, torch.tensor(row["visual_mask"], dtype=torch.bool), int(row["answer_start"]))


class DistillActor(CaptionActor):
    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        self.prepare(rows)
        out = [
            {"video_uri": str(r["video_uri"]), "etag": str(r["etag"]), "error": str(r["error"]), **_EMPTY} for r in rows
        ]
        todo = [(r, o) for r, o in zip(rows, out) if not r["error"]]
        with self._model_lock:
            for group in _chunks(todo, self.config.batch_size):
                try:
                    answers = self._answers([r for r, _ in group])
                except Exception:  # one bad input must not cost the others: answer them one by one
                    answers = []
                    for r, o in group:
                        try:
                            answers.extend(self._answers([r]))
                        except Exception as err:
                            o["error"] = f"distillation failed: {type(err).__name__}: {err}"[:2000]
                            answers.append(None)
                for (r, o), answer in zip(group, answers):
                    if answer is not None:
                        o.update(example_to_row(distill_example(self.target, r[PROCESSED], answer)))
        return pa.Table.from_pylist(out, schema=DISTILL_SCHEMA)

    def _answers(self, rows: list[dict]) -> list[list[int]]:
        """The target's own greedy answers (EOS included when it stopped there)."""
        out = flash.generate(
            self.target, None, self.inputs(rows), max_new_tokens=self.config.max_new_tokens, temperature=0.0
        )
        return out.sequences


_EMPTY = {"input_ids": [], "visual_mask": [], "answer_start": 0, "features": b"", "hidden": 0}


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
