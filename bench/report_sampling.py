"""The sampler sweep as a table, a plot and the targets: ``python -m bench.report_sampling RESULTS.json``.

Reads a pytest-benchmark JSON holding ``bench/bench_sampling.py``'s groups and writes
``bench/results/<machine>-sampling.md`` (speedup = eager median / decodekit median, the two timed alternately in
one test) and ``bench/results/<machine>-sampling.png`` (speedup per distribution and shape, one panel per parameter
set). The targets checked are those of the sampler issue: >= 1.0x everywhere (quiet), busy ratios within 2x of the
quiet ones, >= 10x (top-k sets) and >= 3x (top-p alone) at B >= 8, V = 128256, >= 1.0x at B = 1 for V <= 8194.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from bench.report import RESULTS, _median_s, _slug

Key = tuple[str, str, int, int, str]  # pset, dist, B, V, load


def speedups(data: dict) -> tuple[str, dict[Key, float], dict[Key, tuple[float, float]]]:
    """(machine, speedup per point, (eager, decodekit) medians per point) of the sampler groups."""
    med: dict[Key, dict[str, float]] = defaultdict(dict)
    device = "?"
    for b in data.get("benchmarks", []):
        ex = b.get("extra_info", {})
        if "pset" not in ex or "load" not in ex:
            continue
        device = ex.get("device", device)
        key = (ex["pset"], ex["dist"], int(ex["B"]), int(ex["V"]), ex["load"])
        if "interleaved_eager_s" in ex:  # both sides timed alternately in this test: the ratio comes from these
            med[key]["eager"] = ex["interleaved_eager_s"]
            med[key]["decodekit"] = ex["interleaved_decodekit_s"]
        else:
            med[key].setdefault(ex["impl"], _median_s(b))
    machine = "cpu" if device.startswith("CPU") else _slug(device)
    sp, times = {}, {}
    for key, m in med.items():
        if "eager" in m and "decodekit" in m:
            sp[key] = m["eager"] / m["decodekit"]
            times[key] = (m["eager"], m["decodekit"])
    return machine, sp, times


def targets(sp: dict[Key, float]) -> list[tuple[str, bool, str]]:
    quiet = {k: v for k, v in sp.items() if k[4] == "quiet"}
    out = []
    if quiet:
        worst = min(quiet, key=quiet.get)
        out.append(("every point >= 1.0x (quiet)", quiet[worst] >= 1.0, f"worst {quiet[worst]:.2f}x at {_fmt(worst)}"))
    busy = [(k, v, quiet.get(k[:4] + ("quiet",))) for k, v in sp.items() if k[4] == "busy"]
    busy = [(k, v, q) for k, v, q in busy if q]
    if busy:
        k, v, q = min(busy, key=lambda t: t[1] / t[2])
        out.append(("busy ratio within 2x of quiet", all(v >= q / 2 for _, v, q in busy),
                    f"worst busy/quiet {v / q:.2f} ({v:.2f}x vs {q:.2f}x) at {_fmt(k)}; {len(busy)} points"))
    big = {k: v for k, v in quiet.items() if k[2] >= 8 and k[3] == 128256}
    topk = {k: v for k, v in big.items() if "-k" in k[0]}
    topp = {k: v for k, v in big.items() if "-k" not in k[0]}
    if topk:
        w = min(topk, key=topk.get)
        out.append((">= 10x, top-k sets, B >= 8, V = 128256", topk[w] >= 10, f"worst {topk[w]:.2f}x at {_fmt(w)}"))
    if topp:
        w = min(topp, key=topp.get)
        out.append((">= 3x, top-p alone, B >= 8, V = 128256", topp[w] >= 3, f"worst {topp[w]:.2f}x at {_fmt(w)}"))
    small = {k: v for k, v in quiet.items() if k[2] == 1 and k[3] <= 8194}
    if small:
        w = min(small, key=small.get)
        out.append((">= 1.0x at B = 1, V <= 8194", small[w] >= 1.0, f"worst {small[w]:.2f}x at {_fmt(w)}"))
    return out


def _fmt(k: Key) -> str:
    return f"{k[0]} / {k[1]} / B={k[2]} V={k[3]} ({k[4]})"


def table(sp: dict[Key, float], times: dict[Key, tuple[float, float]]) -> str:
    shapes = sorted({(k[3], k[2]) for k in sp if k[4] == "quiet"})
    head = "| set | distribution | " + " | ".join(f"V={v} B={b}" for v, b in shapes) + " |"
    lines = [head, "|" + " --- |" * (len(shapes) + 2)]
    for pset in sorted({k[0] for k in sp}):
        for dist in sorted({k[1] for k in sp if k[0] == pset}):
            cells = []
            for v, b in shapes:
                x = sp.get((pset, dist, b, v, "quiet"))
                cells.append("" if x is None else f"{x:.2f}x")
            lines.append(f"| {pset} | {dist} | " + " | ".join(cells) + " |")
    busy = sorted(k for k in sp if k[4] == "busy")
    if busy:
        lines += ["", "Under contention (a second process spinning on one of the two cores), quiet vs busy:", "",
                  "| set | distribution | B | V | quiet | busy | eager busy | decodekit busy |", "|" + " --- |" * 8]
        for k in busy:
            q = sp.get(k[:4] + ("quiet",))
            e, d = times[k]
            lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {q:.2f}x | {sp[k]:.2f}x | {e * 1e3:.2f} ms | "
                         f"{d * 1e3:.2f} ms |" if q else "")
    return "\n".join(lines) + "\n"


def plot(sp: dict[Key, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    psets = sorted({k[0] for k in sp})
    shapes = sorted({(k[3], k[2]) for k in sp if k[4] == "quiet"})
    fig, axes = plt.subplots(1, len(psets), figsize=(5 * len(psets), 4.5), sharey=True, squeeze=False)
    for ax, pset in zip(axes[0], psets):
        for dist in sorted({k[1] for k in sp if k[0] == pset}):
            xs, ys = [], []
            for i, (v, b) in enumerate(shapes):
                if (pset, dist, b, v, "quiet") in sp:
                    xs.append(i)
                    ys.append(sp[(pset, dist, b, v, "quiet")])
            ax.plot(xs, ys, marker="o", ms=3, lw=1, label=dist)
        ax.axhline(1.0, color="k", lw=1, ls="--")
        ax.set_yscale("log")
        ax.set_title(pset, fontsize=10)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"{v}/{b}" for v, b in shapes], rotation=90, fontsize=6)
        ax.set_xlabel("V / B")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("speedup vs eager (log)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("decodekit sampler (PyTorch path) vs the eager references, medians side by side", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.report_sampling RESULTS.json", file=sys.stderr)
        return 2
    data = json.loads(Path(argv[0]).read_text())
    machine, sp, times = speedups(data)
    if not sp:
        print("no sampler sweep in this file", file=sys.stderr)
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"{machine}-sampling.png"
    plot(sp, png)
    checks = targets(sp)
    text = [f"# Sampler sweep on {machine}", "", f"Run {data.get('datetime', '?')}. Speedup = eager median / "
            "decodekit median, the two timed alternately (interleaved) at every point. Plot: " + png.name, "",
            "## Targets", ""]
    text += [f"- {'met' if ok else 'NOT met'}: {name} ({detail})" for name, ok, detail in checks]
    text += ["", "## Every point (quiet)", "", table(sp, times)]
    (RESULTS / f"{machine}-sampling.md").write_text("\n".join(text))
    print("\n".join(text[:8 + len(checks)]))
    print(f"wrote {RESULTS / (machine + '-sampling.md')} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
