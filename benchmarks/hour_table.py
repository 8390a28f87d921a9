"""The table of an hour run's comparison (benchmarks/hour_compare.sh, benchmarks/hour60_compare.sh).

    python benchmarks/hour_table.py OUT_DIR TITLE [NOTE]

reads each row's `ddpmkit eval --out` JSON in OUT_DIR and writes OUT_DIR.md: one line per row, best FID last, with
the ratio against the row named `plain`; rows named `mNN-plain` and `mNN-best` (NN training minutes) also make the
time-to-quality table, plain against the best setting at each point."""
import json
import pathlib
import re
import sys


def row_line(name, r, base):
    m = r["settings"]["model"]
    s = m["sampler"]
    calls = f"{m['nfe']} + {m['guide_calls']}" if m.get("guide_calls") else str(m["nfe"])
    ratio = f"{base / r['fid']:.2f}" if base else "-"
    return (f"| {name} | {m['name']} | {s.get('autoguide', '-')} | {s.get('autoguide_scale', '-')} | {calls} | "
            f"{r['fid']:.1f} | {ratio} | {r['kid_mean']:.4f} ± {r['kid_std']:.4f} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} |")


def curve_lines(rows):
    minutes = sorted({int(m.group(1)) for n in rows if (m := re.match(r"m(\d+)-(plain|best)$", n))})
    if not minutes:
        return []
    lines = ["", "Time to quality: plain against the best setting at each point", "",
             "| minutes | plain FID | best FID | plain / best | plain KID | best KID |", "|---|---|---|---|---|---|"]
    for mins in minutes:
        p, b = rows.get(f"m{mins}-plain"), rows.get(f"m{mins}-best")
        if not (p and b):
            continue
        lines.append(f"| {mins} | {p['fid']:.1f} | {b['fid']:.1f} | {p['fid'] / b['fid']:.2f} | "
                     f"{p['kid_mean']:.4f} | {b['kid_mean']:.4f} |")
    return lines


def main(out, title, note=""):
    out = pathlib.Path(out)
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    if not rows:
        sys.exit(f"no row in {out}: run the comparison first")
    base = rows.get("plain", {}).get("fid")
    floor = next(iter(rows.values()))["floor"]
    lines = ["| row | main model | guide | scale | model calls per image | FID (500 images) | plain / FID | KID | "
             "precision | recall |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row_line(n, r, base) for n, r in sorted(rows.items(), key=lambda kv: -kv[1]["fid"])
              if not re.match(r"m\d+-", n)]
    text = (f"# {title}\n\n{note}{' ' if note else ''}`ddpmkit eval --per_class --num_images 500 --scheduler deis`, "
            f"seed 0; floor at 500 images: FID {floor['fid']:.1f}.\n\n" + "\n".join(lines + curve_lines(rows)) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
