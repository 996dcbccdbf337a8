"""Every Triton kernel compiled ahead of time for Hopper (sm_90) and Blackwell (sm_100), without a GPU, and the
compiled kernels' resources checked: no spill at all (each launch states its register budget, ``maxnreg``), shared
memory within the per-block limit, occupancy at or above a floor stated per kernel with its reason.

The rest of the suite runs the kernels in Triton's interpreter, which neither type-checks loop-carried values nor
lowers ``tl.dot`` layouts, and says nothing about registers. ``tests/ops/aot_compile.py`` (run here in a subprocess
with the interpreter off) replays each family's real launchers for launches that reach every configuration their
block-size helpers or autotuners can pick, compiles each specialization with the ptxas that ships with Triton, and
reads registers, stack (local memory: Triton kernels have no local arrays or calls, so any stack frame is spilled
registers), and shared memory from the cubin. The table goes to ``bench/results/sm90-resources.md``
(``sm100-resources.md``), one section per Triton release that ran it. Under ``make gpu-check`` the kernels compile
for real in the other tests, so these skip.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("aot_compile.py")
RESULTS = ROOT / "bench" / "results"
BLOCK_MAX_SMEM = 227 * 1024  # per-block opt-in maximum on sm_90 and sm_100

# Occupancy floor per kernel, in resident warps per SM, and why that many suffice.
STREAM = "streams its rows from HBM with no shared-memory pipeline: it needs many warps in flight per SM"
FLOORS: dict[str, tuple[int, str]] = {
    "_stats_kernel": (16, "sampler: " + STREAM),
    "_search_kernel": (16, "sampler: " + STREAM),
    "_race_kernel": (16, "sampler: " + STREAM),
    "_probs_kernel": (16, "sampler: " + STREAM),
    "_finalize_kernel": (1, "sampler: one warp per row reduces a few partial results; no bandwidth at stake"),
    "_block_kernel": (16, "sample_block: one program per position; " + STREAM),
    "_beam_row_kernel": (4, "beam candidates: one program per beam row (B x N programs, fewer than the SMs): the "
                            "grid, not occupancy, bounds the parallelism; the block must fit"),
    "_beam_merge_kernel": (1, "beam candidates: merges B x N short lists; tiny"),
    "_norm_linear_fwd_kernel": (4, "tensor-core tiles fed by a num_stages-deep async-copy pipeline inside the "
                                   "block (the matmul-tutorial design): one resident block keeps the MMA busy"),
    "_attn_fwd_kernel": (4, "FlashAttention-2 tiles: K/V loads pipelined num_stages deep inside one block"),
    "_attn_bwd_dkdv_kernel": (4, "FlashAttention-2 backward tiles, pipelined inside one block"),
    "_attn_bwd_dq_kernel": (4, "FlashAttention-2 backward tiles, pipelined inside one block"),
    "_attn_bwd_preprocess_kernel": (16, "row-wise dot(out, dout): " + STREAM),
    "_decode_split_kernel": (8, "split-K decode: K/V tiles pipelined in shared memory; two blocks per SM let one "
                                "block's loads overlap the other's softmax"),
    "_decode_merge_kernel": (8, "merges the splits' partial outputs: small, but " + STREAM),
}


def _archs() -> list[int]:
    """sm_90 always; sm_100 where the installed Triton ships the Blackwell ptxas. ``DECODEKIT_AOT_ARCHS`` (e.g.
    ``90``) narrows the list: ``make test-triton`` checks the other Triton releases on sm_90 only."""
    try:
        import triton
    except ImportError:
        return [90]
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    archs = [90, 100] if (bin_dir / "ptxas-blackwell").exists() else [90]
    wanted = os.environ.get("DECODEKIT_AOT_ARCHS")
    return [a for a in archs if str(a) in wanted.replace(",", " ").split()] if wanted else archs


_SECTION = re.compile(r"^## (?P<family>\w+), triton (?P<triton>\S+) \(torch [^)]*\)$")


def _sections(text: str) -> dict[tuple[str, str], list[str]]:
    """A resources table's sections, ``(triton, family) -> its lines`` (heading to last row, no blank tail)."""
    out: dict[tuple[str, str], list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            current = out[(m["triton"], m["family"])] = [line]
        elif line.startswith("## "):
            current = None  # a heading of another form: not a section this test writes
        elif current is not None:
            current.append(line)
    for lines in out.values():
        while lines and not lines[-1].strip():
            lines.pop()
    return out


def _write_table(data: dict) -> Path:
    """Store this run's rows (JSON, not committed) and rebuild the markdown table from every stored run."""
    store = RESULTS / "resources"
    store.mkdir(parents=True, exist_ok=True)
    name = f"sm{data['arch']}-triton{data['triton']}-{data['family']}.json"
    md = RESULTS / f"sm{data['arch']}-resources.md"
    with open(store / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the xdist workers write their families side by side
        (store / name).write_text(json.dumps(data, indent=1))
        runs = [json.loads(p.read_text()) for p in sorted(store.glob(f"sm{data['arch']}-triton*.json"))]
        lines = [
            f"# Compiled resources of every kernel configuration, sm_{data['arch']}",
            "",
            "Written by `tests/ops/test_compile_sm90.py` (part of `make test`): each kernel compiled ahead of time "
            "with the launch arguments its launcher passes on an H100/H200 (132 SMs), read from the cubin with the "
            "`cuobjdump` Triton ships. maxnreg = the register budget the launch states (`register_budget` in "
            "`decodekit/ops/_dispatch.py`, from the kernel's floor). Spill = stack frame bytes per thread (local "
            "memory). Blocks/SM by the CUDA "
            "occupancy calculator's rule (64K registers, 228 KiB shared memory, 64 warps, 32 blocks per SM). The "
            "test fails on any spill, on shared memory over 227 KiB per block, or on fewer "
            "resident warps than the kernel's floor.",
            "",
            "| kernel | floor (warps/SM) | why |",
            "| --- | --- | --- |",
            *[f"| `{k}` | {f} | {why} |" for k, (f, why) in FLOORS.items()],
        ]
        # one section per (family, triton): this store's runs, and the table's other sections as they stand (another
        # release's venv, or another machine, wrote those: a run under one release must not erase the others)
        sections = _sections(md.read_text()) if md.is_file() else {}
        for run in runs:
            sections[(run["triton"], run["family"])] = [
                f"## {run['family']}, triton {run['triton']} (torch {run['torch']})", "",
                "| kernel | specialization | warps | stages | maxnreg | regs | spill B | smem KiB | blocks/SM "
                "| warps/SM | limited by |", "|" + " --- |" * 11,  # fmt: skip
                *[f"| `{r['kernel']}` | {r['spec']} | {r['num_warps']} | {r['num_stages']} | "
                  f"{r.get('maxnreg') or '-'} | {r['regs']} | "
                  f"{r['stack_bytes'] + r['spill_bytes']} | {r['shared_bytes'] / 1024:.1f} | {r['blocks_per_sm']} | "
                  f"{r['warps_per_sm']} | {r['limited_by']} |" for r in run["rows"]],
            ]
        for key in sorted(sections):
            lines += ["", *sections[key]]
        md.write_text("\n".join(lines) + "\n")
    return md


@pytest.mark.parametrize("arch", _archs())
@pytest.mark.parametrize("family", ["norm_linear", "sampling", "attention"])
def test_kernels_compile_within_resources(family, arch, compile_offline, tmp_path):
    """Each kernel configuration of ``family`` compiles for ``arch`` with no spill, fitting shared memory, and at
    least its floor of resident warps per SM."""
    out = tmp_path / f"{family}-{arch}.json"
    compile_offline(f"import runpy, sys; sys.argv = [{str(SCRIPT)!r}, {family!r}, '{arch}', {str(out)!r}]; "
                    f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')", timeout=900)  # fmt: skip
    data = json.loads(out.read_text())
    _write_table(data)
    problems = []
    for r in data["rows"]:
        what = f"{r['kernel']} [{r['spec']}, {r['num_warps']} warps, {r['num_stages']} stages]"
        if r["kernel"] not in FLOORS:
            problems.append(f"{what}: no occupancy floor stated in FLOORS")
            continue
        spill = r["stack_bytes"] + r["spill_bytes"]
        if spill:
            problems.append(f"{what}: spills {spill} bytes per thread ({r['regs']} registers, maxnreg "
                            f"{r.get('maxnreg')})")  # fmt: skip
        if r["shared_bytes"] > BLOCK_MAX_SMEM:
            problems.append(f"{what}: {r['shared_bytes']} bytes of shared memory > {BLOCK_MAX_SMEM}")
        floor = FLOORS[r["kernel"]][0]
        if r["warps_per_sm"] < floor:
            problems.append(f"{what}: {r['warps_per_sm']} resident warps per SM < floor {floor} "
                            f"(limited by {r['limited_by']})")  # fmt: skip
    assert not problems, f"sm_{arch} {family}:\n" + "\n".join(problems)


def test_occupancy_rule():
    """The occupancy helper against hand-worked cases of the CUDA occupancy calculator (sm_90)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("aot_compile_rule", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # as a module, not __main__: leaves TRITON_INTERPRET alone
    # 32 regs x 4 warps: registers would allow 16 blocks, warps 16 -> 16 blocks (64 warps)
    assert mod.occupancy(32, 0, 4) == (16, "registers")
    # 255 regs -> 256 per thread, 8192 per warp -> 8 warps per SM -> 2 blocks of 4 warps
    assert mod.occupancy(255, 0, 4) == (2, "registers")
    # 100 KiB of shared memory (+1 KiB reserved) -> 2 blocks in 228 KiB
    assert mod.occupancy(32, 100 * 1024, 4) == (2, "shared memory")
    # tiny kernel, 1 warp: the 32-blocks-per-SM limit
    assert mod.occupancy(16, 0, 1) == (32, "blocks")
    # over the per-SM shared memory: nothing fits
    assert mod.occupancy(32, 240 * 1024, 4)[0] == 0


def test_a_run_keeps_the_other_releases_sections(tmp_path, monkeypatch):
    """The table is rebuilt from this machine's store and keeps the sections it holds no run of: a ``make test``
    under one Triton release must not erase what the other releases' venvs wrote (it once cut 3.6 and 3.9)."""
    monkeypatch.setattr(sys.modules[__name__], "RESULTS", tmp_path)
    row = dict(kernel="k", spec="s", num_warps=4, num_stages=2, maxnreg=None, regs=40, stack_bytes=0, spill_bytes=0,
               shared_bytes=2048, blocks_per_sm=8, warps_per_sm=32, limited_by="warps")
    other = dict(arch="90", triton="3.6.0", family="attention", torch="2.13.0+cpu", rows=[dict(row, regs=99)])
    md = _write_table(other)  # as the 3.6 venv wrote it
    (tmp_path / "resources" / "sm90-triton3.6.0-attention.json").unlink()  # ... its store is elsewhere
    _write_table(dict(other, triton="3.8.0", family="sampling", rows=[row]))
    sections = _sections(md.read_text())
    assert sorted(sections) == [("3.6.0", "attention"), ("3.8.0", "sampling")]
    assert "| 99 |" in "\n".join(sections[("3.6.0", "attention")])  # kept as it was
    _write_table(dict(other, triton="3.6.0", rows=[dict(row, regs=77)]))  # a fresh 3.6 run replaces its section
    again = "\n".join(_sections(md.read_text())[("3.6.0", "attention")])
    assert "| 77 |" in again and "| 99 |" not in again
