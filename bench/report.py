"""Turn a pytest-benchmark JSON file into ``bench/results/<machine>.json`` + ``.md``.

Usage: ``python -m bench.report bench/results/.last.json`` (``--peers JSON``: the peers table and bar chart from a
run of ``bench/bench_peers.py``; ``--gpu-check FOLDER``: a GPU check's report)

For each group, the speedup of every implementation is ``median(baseline) / median(impl)``,
from medians measured side by side in the same run. GB/s and TFLOP/s come from the
``bytes_moved`` / ``flops`` each benchmark declared. The markdown table is also written into
README.md between ``<!-- bench:<machine>:start -->`` and ``<!-- bench:<machine>:end -->`` when
README.md has those markers.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _median_s(bench: dict) -> float:
    extra = bench.get("extra_info", {})
    return float(extra.get("cuda_event_median_s") or bench["stats"]["median"])


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def build_table(data: dict) -> tuple[str, str]:
    benches = data.get("benchmarks", [])
    devices = sorted({b.get("extra_info", {}).get("device", "?") for b in benches}) or ["?"]
    gpus = [d for d in devices if not d.startswith("CPU") and d != "?"]  # host-only rows also run on GPU machines
    machine = _slug(gpus[0]) if gpus else ("cpu" if devices[0].startswith("CPU") else "unknown")
    groups: dict[str, list[dict]] = {}
    for b in benches:
        groups.setdefault(b.get("group") or b["name"], []).append(b)
    lines = [
        f"Device: {', '.join(devices)}; run {data.get('datetime', '?')}; "
        f"torch {data.get('machine_info', {}).get('torch', '?')}. Medians; speedup = baseline median / median.",
        "",
        "| group | impl | median | speedup vs baseline | throughput | extra |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for group in sorted(groups):
        rows = groups[group]
        base = [b for b in rows if b.get("extra_info", {}).get("baseline")]
        base_t = _median_s(base[0]) if base else None
        for b in sorted(rows, key=_median_s, reverse=True):
            ex = b.get("extra_info", {})
            t = _median_s(b)
            speed = f"{base_t / t:.2f}x" if base_t else "-"
            thr = []
            if ex.get("bytes_moved"):
                thr.append(f"{ex['bytes_moved'] / t / 1e9:.1f} GB/s")
            if ex.get("flops"):
                thr.append(f"{ex['flops'] / t / 1e12:.2f} TFLOP/s")
            if ex.get("tokens"):
                thr.append(f"{ex['tokens'] / t:.0f} tok/s")
            skip = {"impl", "baseline", "device", "bytes_moved", "flops", "cuda_event_median_s", "tokens"}
            extra = ", ".join(f"{k}={v}" for k, v in ex.items() if k not in skip and v is not None)
            label = ex.get("impl", b["name"]) + (" (baseline)" if ex.get("baseline") else "")
            lines.append(f"| {group} | {label} | {_fmt_time(t)} | {speed} | {' '.join(thr) or '-'} | {extra} |")
    return machine, "\n".join(lines) + "\n"


def gpu_check_report(folder: Path) -> Path:
    """``bench/results/<gpu>.md`` from a GPU check's ``gpu_check.jsonl`` (all it measured, even if stopped)."""
    from bench.gpu_check import render

    records = [json.loads(line) for line in (folder / "gpu_check.jsonl").read_text().splitlines() if line.strip()]
    gpu = next((r["gpu"] for r in records if r["stage"] == "env"), "gpu")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{gpu}.md"
    out.write_text(render(records))
    return out


def peers_report(src: Path) -> tuple[Path, Path]:
    """``bench/results/<machine>-peers.md`` (the table) and ``.png`` (tokens/s per runtime as bars, one panel per
    model and batch) from a run of ``bench/bench_peers.py``. The bars are the table's tokens/s (pytest-benchmark's
    median); a runtime whose greedy tokens differ from decodekit's plain graph is hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(src.read_text())
    data["benchmarks"] = [b for b in data.get("benchmarks", []) if (b.get("group") or "").startswith("peers ")]
    if not data["benchmarks"]:
        raise SystemExit(f"{src}: no bench_peers.py rows")
    machine, table = build_table(data)
    groups: dict[str, list[dict]] = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4.2), squeeze=False)
    for ax, (group, rows) in zip(axes[0], sorted(groups.items()), strict=True):
        bars = []
        for b in rows:
            ex = b.get("extra_info", {})
            tok_s = ex.get("tokens", 0) / _median_s(b)  # the table's throughput
            bars.append((ex.get("impl", b["name"]), float(tok_s), ex.get("greedy_equal", True)))
        bars.sort(key=lambda r: -r[1])
        names = [n for n, _, _ in bars]
        colors = ["tab:blue" if n.startswith("decodekit") else "tab:gray" for n in names]
        drawn = ax.bar(range(len(bars)), [v for _, v, _ in bars], color=colors)
        for rect, (_, v, equal) in zip(drawn, bars, strict=True):
            rect.set_hatch("" if equal else "//")
            ax.annotate(f"{v:,.0f}", (rect.get_x() + rect.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(bars)), names, rotation=30, ha="right", fontsize=8)
        threads = group[group.rfind(" (") + 2 : -1].split(", ")[-1]  # "... (fp32, CPU, 2 thread(s))"
        ax.set_title(f"{group.removeprefix('peers ').split(' greedy')[0]}, {threads}", fontsize=9)
        ax.set_ylabel("tokens / s (greedy)")
    fig.suptitle(f"decodekit's ONNX runtime and its peers on {machine} ({data.get('datetime', '?')[:16]})",
                 fontsize=10)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    png, md = RESULTS / f"{machine}-peers.png", RESULTS / f"{machine}-peers.md"
    fig.savefig(png, dpi=110)
    md.write_text(f"# decodekit's ONNX runtime against its peers on {machine}\n\n"
                  f"`python -m bench.report --peers {src.name}` from one run of `bench/bench_peers.py`; plot: "
                  f"[{png.name}]({png.name}).\n\n{table}")
    return md, png


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--gpu-check":
        print(f"wrote {gpu_check_report(Path(argv[1]))}")
        return 0
    if len(argv) == 2 and argv[0] == "--peers":
        md, png = peers_report(Path(argv[1]))
        print(f"wrote {md} and {png}")
        return 0
    if len(argv) != 1:
        print("usage: python -m bench.report RESULTS.json | --gpu-check FOLDER | --peers PEERS.json", file=sys.stderr)
        return 2
    src = Path(argv[0])
    data = json.loads(src.read_text())
    try:
        import torch

        data.setdefault("machine_info", {})["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    machine, table = build_table(data)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{machine}.json").write_text(json.dumps(data, indent=1, sort_keys=True))
    (RESULTS / f"{machine}.md").write_text(f"# Benchmarks on {machine}\n\n{table}")
    readme = ROOT / "README.md"
    start, end = f"<!-- bench:{machine}:start -->", f"<!-- bench:{machine}:end -->"
    if readme.exists():
        text = readme.read_text()
        if start in text and end in text:
            head, rest = text.split(start, 1)
            _, tail = rest.split(end, 1)
            readme.write_text(f"{head}{start}\n{table}{end}{tail}")
    print(table)
    print(f"wrote {RESULTS / (machine + '.json')} and {RESULTS / (machine + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
