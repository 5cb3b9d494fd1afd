"""Print the short table of every benchmark JSON in a folder (bench/gpu.sh calls it last), and plot
time against sequence length for all of them into DIR/results.png (one panel per benchmark) when
matplotlib is there.

Each bench_*.py writes DIR/<name>.json with {"rows": [{...}, ...]}; every row is printed as one line
of `key=value` pairs, so new columns need no change here."""
import json
import pathlib


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


LENGTH_KEYS = ("T", "L", "seqlen")


def plot(folder, tables):
    """One log-log panel per benchmark: every numeric `*_ms` column against the sequence length."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    panels = []
    for name, rows in tables:
        series = {}
        for row in rows:
            length = next((row[k] for k in LENGTH_KEYS if isinstance(row.get(k), (int, float))), None)
            if not length or length <= 1:
                continue
            tag = "/".join(str(row[k]) for k in ("dtype", "mode", "B") if k in row)
            for key, value in row.items():
                if key.endswith("_ms") and isinstance(value, (int, float)) and value > 0:
                    series.setdefault(f"{key} {tag}".strip(), []).append((length, value))
        if series:
            panels.append((name, series))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels):
        for label, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("ms")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(pathlib.Path(folder) / "results.png", dpi=110)


def main(folder):
    tables = []
    for path in sorted(pathlib.Path(folder).glob("*.json")):
        data = json.loads(path.read_text())
        rows = data.get("rows", data) if isinstance(data, dict) else data
        print(f"\n## {path.stem}")
        if not isinstance(rows, list):
            print(json.dumps(rows)[:2000])
            continue
        for row in rows:
            print("  " + "  ".join(f"{k}={fmt(v)}" for k, v in row.items()))
        tables.append((path.stem, [r for r in rows if isinstance(r, dict)]))
    plot(folder, tables)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default="bench/results", help="folder of bench_*.py JSON files")
    main(ap.parse_args().folder)
