#!/usr/bin/env python3
"""Recreate data/sample/docs.jsonl.xz and tokenizer.model from the shared proxy corpus (deterministic).

Usage: python data/sample/make_sample.py [CORPUS_DIR]   (default /work/shared/corpus)

Scans proxy_train.jsonl.xz in file order (the corpus is already shuffled with a fixed seed) and keeps, whole,
documents of at most MAX_DOC_BYTES that are confidently Wikipedia ("Title\\n\\n" followed by a paragraph that
mentions the title's first word) or confidently blog (no short title line), until each kind reaches
TARGET_BYTES_PER_KIND bytes of UTF-8 text. Ambiguous documents are skipped. Output keeps corpus order.
"""
import json
import lzma
import re
import shutil
import sys
from pathlib import Path

MAX_DOC_BYTES = 30_000
TARGET_BYTES_PER_KIND = 1_250_000
HERE = Path(__file__).resolve().parent


def kind(text: str) -> str:
    first, sep, rest = text.partition("\n\n")
    titled = bool(sep) and 0 < len(first.strip()) <= 100 and "\n" not in first and len(first.split()) <= 10 \
        and (first.rstrip()[-1] not in ".!?:;," )
    if not titled:
        return "blog"
    title = re.sub(r"\s*\(.*?\)\s*$", "", first).strip()
    word = re.sub(r"\W+$", "", title.split()[0]).lower() if title.split() else ""
    return "wiki" if word and word in rest[:300].lower() else "ambiguous"


def main() -> int:
    corpus = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/corpus")
    got = {"wiki": 0, "blog": 0}
    n = {"wiki": 0, "blog": 0}
    kept = []
    with lzma.open(corpus / "proxy_train.jsonl.xz", "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            b = len(text.encode("utf-8"))
            k = kind(text)
            if k == "ambiguous" or b > MAX_DOC_BYTES or got[k] >= TARGET_BYTES_PER_KIND:
                continue
            kept.append(text)
            got[k] += b
            n[k] += 1
            if all(v >= TARGET_BYTES_PER_KIND for v in got.values()):
                break
    with lzma.open(HERE / "docs.jsonl.xz", "wt", encoding="utf-8", preset=9 | lzma.PRESET_EXTREME) as f:
        for text in kept:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    shutil.copyfile(corpus / "proxy_4096_bpe.model", HERE / "tokenizer.model")
    print(f"{len(kept)} docs, {sum(got.values()):,} bytes: wiki {n['wiki']} docs / {got['wiki']:,} bytes, "
          f"blog {n['blog']} docs / {got['blog']:,} bytes; "
          f"docs.jsonl.xz {(HERE / 'docs.jsonl.xz').stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
