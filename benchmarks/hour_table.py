"""The table of an hour run's comparison (benchmarks/hour_compare.sh, benchmarks/hour60_compare.sh).

    python benchmarks/hour_table.py OUT_DIR TITLE [NOTE]

reads each row's `ddpmkit eval --out` JSON in OUT_DIR and writes OUT_DIR.md: one line per row, best FID last, with
the ratio against plain at the same sampler and seed (the row `plain` or a row named `plain-...` without guidance);
rows named `mNN-plain` and `mNN-best` (NN training minutes; `-sde` after them: at the SDE sampler) also make the
time-to-quality table, plain against the best setting at each point, and its plot OUT_DIR.png."""
import json
import pathlib
import re
import sys


def sampling_key(r):
    """What a row's plain baseline must share with it: the sampler, its steps and the seed."""
    m = r["settings"]["model"]
    return m["sampler"]["scheduler"], m["sampler"].get("steps"), m.get("seed", 0)


def plain_fids(rows):
    """{sampling key: FID} of the plain rows (`plain`, `plain-...`: no autoguidance)."""
    return {sampling_key(r): r["fid"] for n, r in rows.items()
            if (n == "plain" or n.startswith("plain-")) and not r["settings"]["model"]["sampler"].get("autoguide")}


def sampler_name(r):
    s = r["settings"]["model"]["sampler"]
    return f"{s['scheduler']} {s.get('steps') or ''}".strip()


def row_line(name, r, base):
    m = r["settings"]["model"]
    s = m["sampler"]
    calls = f"{m['nfe']} + {m['guide_calls']}" if m.get("guide_calls") else str(m["nfe"])
    ratio = f"{base / r['fid']:.2f}" if base else "-"
    guide = s.get("autoguide", "-") + (f" in {s['guidance_interval']}" if s.get("guidance_interval") else "")
    sampler = sampler_name(r) + (f", seed {m['seed']}" if m.get("seed") else "")
    return (f"| {name} | {m['name']} | {guide} | {s.get('autoguide_scale', '-')} | {sampler} | {calls} | "
            f"{r['fid']:.1f} | {ratio} | {r['kid_mean']:.4f} ± {r['kid_std']:.4f} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} |")


CURVE = re.compile(r"m(\d+)-(plain|best)(-sde)?$")  # a curve's rows: mNN-plain, mNN-best (deis), the same + -sde


def curve_points(rows, suffix=""):
    """[(minutes, plain row, best row)] of one curve (suffix "": at deis, "-sde": at the SDE sampler) for the points
    that have both."""
    minutes = sorted({int(m.group(1)) for n in rows if (m := CURVE.match(n)) and (m.group(3) or "") == suffix})
    return [(mins, rows[f"m{mins}-plain{suffix}"], rows[f"m{mins}-best{suffix}"]) for mins in minutes
            if f"m{mins}-plain{suffix}" in rows and f"m{mins}-best{suffix}" in rows]


def plot_curve(curves, path):
    """FID against training minutes, plain and best, one pair of lines per sampler: the time-to-quality picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    for points in curves:
        for which, index, style in (("plain", 1, "o-"), ("post-hoc EMA + autoguidance", 2, "s-")):
            ax.plot([p[0] for p in points], [p[index]["fid"] for p in points], style,
                    label=f"{which}, {sampler_name(points[0][1])}")
    ax.axhline(curves[0][0][1]["floor"]["fid"], color="gray", linestyle=":", label="floor (two halves of the data)")
    ax.set_xlabel("training minutes (quiet 2-core CPU)")
    ax.set_ylabel("FID (500 images)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def curve_lines(points):
    if not points:
        return []
    lines = ["", f"Time to quality: plain against the best setting at each point ({sampler_name(points[0][1])})", "",
             "| minutes | plain FID | best FID | plain / best | plain KID | best KID |", "|---|---|---|---|---|---|"]
    for mins, p, b in points:
        lines.append(f"| {mins} | {p['fid']:.1f} | {b['fid']:.1f} | {p['fid'] / b['fid']:.2f} | "
                     f"{p['kid_mean']:.4f} | {b['kid_mean']:.4f} |")
    return lines


def main(out, title, note=""):
    out = pathlib.Path(out)
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    if not rows:
        sys.exit(f"no row in {out}: run the comparison first")
    bases = plain_fids(rows)
    curves = [c for c in (curve_points(rows), curve_points(rows, "-sde")) if c]
    floor = next(iter(rows.values()))["floor"]
    lines = ["| row | main model | guide | scale | sampler | model calls per image | FID (500 images) | plain / FID | "
             "KID | precision | recall |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row_line(n, r, bases.get(sampling_key(r))) for n, r in sorted(rows.items(), key=lambda kv: -kv[1]["fid"])
              if not CURVE.match(n)]
    text = (f"# {title}\n\n{note}{' ' if note else ''}`ddpmkit eval --per_class --num_images 500` (deis 15 steps "
            f"unless the row says), seed 0 unless the row says; plain / FID: against plain at the row's sampler and "
            f"seed; floor at 500 images: FID {floor['fid']:.1f}.\n\n"
            + "\n".join(lines + [line for c in curves for line in curve_lines(c)]) + "\n")
    out.with_suffix(".md").write_text(text)
    if curves:
        plot_curve(curves, out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
