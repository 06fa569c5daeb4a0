"""Lay out the Gutenberg corpus's official book-level split as folders of links, for `prepare`.

    python scripts/gutenberg_split.py ../shared/data/gutenberg runs/gutenberg
    crosslayer prepare "text:runs/gutenberg/train/*.txt" --val "runs/gutenberg/valid/*.txt" \\
        --tokenizer bpe:8192 --out runs/data/gutenberg

Reads splits.json (books/<slug>.txt per split); writes <out>/{train,valid,test}/<slug>.txt links.
"""

import json
import sys
from pathlib import Path


def main(src: str, out: str) -> None:
    src_dir, out_dir = Path(src).resolve(), Path(out)
    splits = json.loads((src_dir / "splits.json").read_text())["splits"]
    for split, slugs in splits.items():
        folder = out_dir / split
        folder.mkdir(parents=True, exist_ok=True)
        for slug in slugs:
            link = folder / f"{slug}.txt"
            if not link.exists():
                link.symlink_to(src_dir / "books" / f"{slug}.txt")
        print(f"{split}: {len(slugs)} books -> {folder}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
