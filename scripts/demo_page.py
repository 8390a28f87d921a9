"""The `make demo` page: `add` records one picture (files, one line of explanation, the command that made it)
in OUT/manifest.jsonl; `render` writes OUT/index.html from it.

    python scripts/demo_page.py add OUT "Section" "caption" "command" image.png [image2.png ...]
    python scripts/demo_page.py render OUT [--seconds N]
"""
from __future__ import annotations

import html
import json
import sys
import time
from pathlib import Path

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #ddd}
figure{margin:1.2em 0} figure img{image-rendering:pixelated;max-width:100%;border:1px solid #eee;margin-right:8px;
vertical-align:top} figcaption{margin:.4em 0} pre{background:#f6f6f6;padding:.5em;overflow-x:auto;font-size:90%}
pre.text{white-space:pre-wrap}"""


def add(out: Path, section: str, caption: str, command: str, *files: str) -> None:
    missing = [f for f in files if not (out / f).is_file()]
    if missing:
        sys.exit(f"demo: {', '.join(missing)} was not written in {out}")
    entry = {"section": section, "caption": caption, "command": command, "files": list(files)}
    with (out / "manifest.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")


def render(out: Path, seconds: str | None = None) -> Path:
    entries = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines() if l.strip()]
    took = f" in {int(seconds) // 60} min {int(seconds) % 60} s" if seconds else ""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>ddpmkit demo</title>",
             f"<style>{STYLE}</style></head><body>", "<h1>ddpmkit demo</h1>",
             f"<p>Units 1 and 2 of the Hugging Face diffusion models course with ddpmkit, made by <code>make demo</code>"
             f"{took} on {html.escape(time.strftime('%Y-%m-%d'))}. Every picture comes from the command under it; "
             "the emoji are Twemoji (CC-BY 4.0).</p>"]
    section = None
    for e in entries:
        if e["section"] != section:
            section = e["section"]
            parts.append(f"<h2>{html.escape(section)}</h2>")
        parts.append("<figure>")
        for f in e["files"]:
            if f.endswith((".txt", ".json")):
                parts.append(f"<pre class='text'>{html.escape((out / f).read_text())}</pre>")
            else:
                parts.append(f"<a href='{html.escape(f)}'><img src='{html.escape(f)}' alt='{html.escape(f)}'></a>")
        parts.append(f"<figcaption>{html.escape(e['caption'])}</figcaption>")
        parts.append(f"<pre>{html.escape(e['command'])}</pre></figure>")
    parts.append("</body></html>")
    page = out / "index.html"
    page.write_text("\n".join(parts) + "\n")
    return page


if __name__ == "__main__":
    if len(sys.argv) >= 6 and sys.argv[1] == "add":
        add(Path(sys.argv[2]), *sys.argv[3:])
    elif len(sys.argv) >= 3 and sys.argv[1] == "render":
        print(render(Path(sys.argv[2]), sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--seconds" else None))
    else:
        sys.exit(__doc__)
