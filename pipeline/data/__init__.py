"""Datasets, from a file or the embedded default task to a padded batch.

Every stage reads its rows here, whether they come from the embedded default task or from the
user's files, so the same checks apply to both. Bad rows raise UserError naming file, row and
field. One concern per module:

- sources.py: finding and reading files, folders and hub datasets (through `datasets`), a role's
  `Source` (its datasets, share of data_split, held-out eval slice, mixing weights), `load_role`.
- formats.py: detecting a dataset's format (prompt/response, prompt/chosen/rejected, HH-RLHF
  dialogues, chat messages, prompt only), checking it can feed the stage, converting its rows,
  rendering chat messages with the tokenizer's chat template.
- tokenize.py: token ids within max_prompt_len / max_response_len (truncation reported once per
  dataset), each stage's examples, re-encoding for a reward model with its own tokenizer.
- cache.py: the tokenised-example cache (by content hash, built once per node).
- collate.py: padding examples into batches (IGNORE_INDEX labels).

The stages and the orchestrator use the names re-exported below (`data.load_role`,
`data.collate_sft`, ...); everything else is imported from its module.
"""

from pipeline.data.cache import build_cached, examples_cache_file, read_cached
from pipeline.data.collate import IGNORE_INDEX, collate_pairs, collate_prompts, collate_sft
from pipeline.data.sources import FIELDS, Source, file_digest, is_hub_name, load_role
from pipeline.data.tokenize import pair_examples, prompt_examples, reencode, sft_examples

__all__ = [
    "FIELDS",
    "IGNORE_INDEX",
    "Source",
    "build_cached",
    "collate_pairs",
    "collate_prompts",
    "collate_sft",
    "examples_cache_file",
    "file_digest",
    "is_hub_name",
    "load_role",
    "pair_examples",
    "prompt_examples",
    "read_cached",
    "reencode",
    "sft_examples",
]
