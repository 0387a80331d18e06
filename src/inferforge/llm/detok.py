"""Tokenizer access and incremental detokenization with stop strings.

Streaming must never emit text it may later take back: a partial UTF-8 character (decoded as U+FFFD) waits for
its next byte, and a tail that could be the start of a stop string waits until it is ruled in or out. Stop
strings are cut out of the text, as OpenAI's API does.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

from inferforge.errors import ModelSourceError


class Tokenizer:
    """The folder's fast tokenizer: the Rust backend for the hot path, transformers for chat templates."""

    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoTokenizer

        if not (Path(folder) / "tokenizer.json").exists() and not (Path(folder) / "tokenizer.model").exists():
            raise ModelSourceError(f"{folder} has no tokenizer.json; the engine needs the model's tokenizer")
        self.hf: Any = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        self.backend = self.hf.backend_tokenizer
        self.eos_token_id: int | None = self.hf.eos_token_id
        self.byte_table = _byte_table(self.hf)
        # the text of special tokens, which `byte_table` holds as b"" (skipped, the default)
        self.special_bytes = {i: self.hf.convert_ids_to_tokens(i).encode() for i in self.hf.all_special_ids}

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Rendered by transformers in its sandboxed Jinja environment; the template brings its own BOS and
        renders `tools` (OpenAI's function definitions) where it knows how."""
        if not getattr(self.hf, "chat_template", None):
            raise ModelSourceError("this model's tokenizer has no chat template; send a plain prompt instead")
        text = self.hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        return list(self.hf.encode(text, add_special_tokens=False))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, used by byte-level BPE vocabularies."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _byte_table(hf: Any) -> list[bytes] | None:
    """Bytes of every token id for byte-level BPE tokenizers (Llama 3, Qwen2, GPT-2), else None.

    With it, streaming text is a table lookup and an incremental UTF-8 decode per token instead of two calls
    into the tokenizer, which matters when 64 sequences each produce a token every 2 ms.
    """
    backend = hf.backend_tokenizer
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        return None
    inverse = {c: b for b, c in _bytes_to_unicode().items()}
    special = set(hf.all_special_ids)
    added = backend.get_added_tokens_decoder()
    table: list[bytes] = []
    for i in range(backend.get_vocab_size(with_added_tokens=True)):
        if i in special:
            table.append(b"")
        elif i in added:
            table.append(added[i].content.encode("utf-8"))
        else:
            token = backend.id_to_token(i)
            if token is None or any(c not in inverse for c in token):
                return None
            table.append(bytes(inverse[c] for c in token))
    return table


class IncrementalDetokenizer:
    """Output text of one sequence, grown a token at a time, with `pop()` giving only text safe to emit."""

    def __init__(
        self, tokenizer: Tokenizer, stop: tuple[str, ...] = (), skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer, self.stop, self.skip_special = tokenizer, stop, skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self._prefix_offset = 0
        self._read_offset = 0
        self._max_stop = max((len(s) for s in stop), default=0)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int, check_stop: bool = True) -> bool:
        """Append a token; returns True when a stop string appeared (the text is then cut before it).
        `check_stop` False (before a request's min_tokens): stop strings do not count yet."""
        self.ids.append(token_id)
        table = self.tokenizer.byte_table
        if table is not None:
            start = len(self.text)
            piece = table[token_id] if 0 <= token_id < len(table) else b""
            if not piece and not self.skip_special:
                piece = self.tokenizer.special_bytes.get(token_id, b"")
            self.text += self._utf8.decode(piece)
            return check_stop and len(self.text) > start and self._cut_at_stop(start)
        skip = self.skip_special
        prefix = self.tokenizer.decode(self.ids[self._prefix_offset : self._read_offset], skip)
        full = self.tokenizer.decode(self.ids[self._prefix_offset :], skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False  # an incomplete character; wait for the next byte
        start = len(self.text)
        self.text += full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return check_stop and self._cut_at_stop(start)

    def _cut_at_stop(self, start: int) -> bool:
        if not self.stop:
            return False
        lo = max(0, start - self._max_stop + 1)
        hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def _held_back(self) -> int:
        for k in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def pop(self, final: bool) -> str:
        """Text not yet emitted, minus a tail that may still become a stop string (unless final)."""
        if final and self.tokenizer.byte_table is not None and self._utf8.getstate()[0]:
            self.text += self._utf8.decode(
                b"", final=True
            )  # a dangling partial character, as decode() shows it
        end = len(self.text) if final else len(self.text) - self._held_back()
        end = max(end, self.emitted)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out


class NoText:
    """The detokenizer of a request with `detokenize=False`: its text is made elsewhere."""

    def add(self, token_id: int, check_stop: bool = True) -> bool:
        return False

    def pop(self, final: bool) -> str:
        return ""


NO_TEXT = NoText()
