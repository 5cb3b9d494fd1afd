"""Print the short table of every benchmark JSON in a folder (bench/gpu.sh calls it last).

Each bench_*.py writes DIR/<name>.json with {"rows": [{...}, ...]}; every row is printed as one line
of `key=value` pairs, so new columns need no change here."""
import json
import pathlib
import sys


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def main(folder):
    for path in sorted(pathlib.Path(folder).glob("*.json")):
        data = json.loads(path.read_text())
        rows = data.get("rows", data) if isinstance(data, dict) else data
        print(f"\n## {path.stem}")
        if not isinstance(rows, list):
            print(json.dumps(rows)[:2000])
            continue
        for row in rows:
            print("  " + "  ".join(f"{k}={fmt(v)}" for k, v in row.items()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results")
