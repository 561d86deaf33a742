"""Turn the npm package ``emoji-datasource-google`` into a captioned image folder.

The result follows the Hugging Face imagefolder convention that ldmkit reads: one folder per
category (the class) and a ``metadata.jsonl`` whose ``text`` is the emoji's name::

    mkdir -p /tmp/emoji && cd /tmp/emoji && npm pack emoji-datasource-google@16.0.0
    tar xzf emoji-datasource-google-16.0.0.tgz package/emoji.json package/img/google/64
    python examples/prepare_emoji.py /tmp/emoji/package data/emoji
    ldmkit dataset preview folder data/emoji --out emoji.png
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "package", type=Path, help="the unpacked npm package folder (holds emoji.json)"
    )
    parser.add_argument("out", type=Path, help="output image folder")
    parser.add_argument("--skin-tones", action="store_true", help="also include skin-tone variants")
    args = parser.parse_args()

    table = json.loads((args.package / "emoji.json").read_text())
    images = args.package / "img" / "google" / "64"
    if not images.is_dir():
        raise SystemExit(f"{images} not found: unpack package/img/google/64 from the tarball")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for entry in table:
        variants = [(entry["image"], entry.get("has_img_google", True))]
        if args.skin_tones:
            variants += [
                (v["image"], v.get("has_img_google", True))
                for v in entry.get("skin_variations", {}).values()
            ]
        category = entry["category"].lower().replace(" & ", "_and_").replace(" ", "_")
        for image, available in variants:
            source = images / image
            if not available or not source.is_file():
                continue
            target = Path(category) / image
            (args.out / category).mkdir(exist_ok=True)
            shutil.copyfile(source, args.out / target)
            rows.append({"file_name": target.as_posix(), "text": entry["name"].lower()})
    with (args.out / "metadata.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} images and metadata.jsonl to {args.out}")


if __name__ == "__main__":
    main()
