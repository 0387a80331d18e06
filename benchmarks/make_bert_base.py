"""Write a BERT-base folder (random weights from a fixed seed, the MiniLM tokenizer: the same uncased
vocabulary) and an .npz of standard-library sentences tokenized to exactly 128 tokens, for the BERT-base
benchmark.

Random weights are fine for speed and for fidelity to the fp32 original; they make no accuracy claim.
Usage: python benchmarks/make_bert_base.py OUT_DIR [TOKENIZER_DIR]   (default: the built-in MiniLM's folder)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch


def main(out: Path, tokenizer_dir: Path | None = None) -> None:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from inferforge.models.builtin.stdlib_text import stdlib_sentences
    from inferforge.models.sources import minilm_dir

    torch.manual_seed(0)
    model_dir = out / "bert-base"
    BertModel(BertConfig()).save_pretrained(model_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy2((tokenizer_dir or minilm_dir()) / name, model_dir / name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    encoded = tokenizer(
        stdlib_sentences(512), padding="max_length", truncation=True, max_length=128, return_tensors="np"
    )
    np.savez(
        out / "bert-seq128.npz",
        input_ids=encoded["input_ids"].astype(np.int64),
        attention_mask=encoded["attention_mask"].astype(np.int64),
    )
    print(f"wrote {model_dir} and {out / 'bert-seq128.npz'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
