"""Prompt data: read rows from files or `datasets`, check them, encode them to token ids.

On-policy distillation needs only prompts (the student writes the completions); a reference
`completion` (off-policy warm-up, held-out KL) and an `answer` (task verifiers) are optional.
The parts, one concept per module:

  rows      the row schema and its checks (`Row`, `parse_row`), TRL's conversational formats
  readers   file formats and `load_rows` (.jsonl, .json, .csv, .parquet, saved datasets)
  hub       `datasets` folders (`save_to_disk`) and Hub datasets (`hf:ORG/NAME:SPLIT`)
  encode    `encode_rows`: chat template, system prompt, bounded left truncation
  sets      `build_data` / `PromptSets`: a run's train and eval sources and the eval rule

docs/data.md describes the formats, the eval rule and the limits for users. Batching and
splitting live in `opd.stream` (`PromptStream`, `split_rows`), re-exported here by a plain
import (`opd.stream` imports nothing from this package at run time).
"""

from opd.data.encode import (
    END_OF_TURN_TOKENS,
    EncodeResult,
    Example,
    encode_rows,
    end_of_turn_ids,
)
from opd.data.readers import FORMATS, MAX_SKIPPED_EXAMPLES, LoadResult, load_rows
from opd.data.rows import ROLES, Row, parse_row
from opd.stream import PromptStream, split_rows

__all__ = [
    "END_OF_TURN_TOKENS",
    "FORMATS",
    "MAX_SKIPPED_EXAMPLES",
    "ROLES",
    "EncodeResult",
    "Example",
    "LoadResult",
    "PromptStream",
    "Row",
    "encode_rows",
    "end_of_turn_ids",
    "load_rows",
    "parse_row",
    "split_rows",
]
