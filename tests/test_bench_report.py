"""bench/report.py --peers: the peers table and bar chart from a bench_peers.py JSON (synthetic rows here)."""

from __future__ import annotations

import json

import pytest


def _row(group: str, impl: str, median: float, tok_s: float | None, equal: bool = True) -> dict:
    extra = {"impl": impl, "baseline": impl == "decodekit-ort-plain", "device": "CPU x86_64 x2", "tokens": 128,
             "greedy_equal": equal}
    if tok_s is not None:
        extra["interleaved_tok_s"] = tok_s
    return {"name": f"test_peers[{impl}]", "group": group, "stats": {"median": median}, "extra_info": extra}


def test_peers_report_writes_table_and_chart(tmp_path, monkeypatch):
    from bench import report

    monkeypatch.setattr(report, "RESULTS", tmp_path / "results")
    g1 = "peers stories260K B=1 greedy 128 new tokens (fp32, CPU, 1 thread(s))"
    g2 = "peers SmolLM2-135M B=8 greedy 128 new tokens (fp32, CPU, 2 thread(s))"
    data = {"datetime": "2026-11-30T16:00:00", "benchmarks": [
        _row(g1, "decodekit-ort-plain", 0.02, 6400.0), _row(g1, "ctranslate2", 0.0066, None),
        _row(g2, "decodekit-ort-gqa", 3.0, 340.0), _row(g2, "ort-genai", 2.8, 367.0, equal=False),
        _row(g2, "decodekit-ort-plain", 3.4, 300.0),
        {"name": "other", "group": "sample_logits x", "stats": {"median": 1.0}, "extra_info": {}},  # not a peer
    ]}
    src = tmp_path / "peers.json"
    src.write_text(json.dumps(data))
    md, png = report.peers_report(src)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = md.read_text()
    assert "ctranslate2" in text and "ort-genai" in text and "sample_logits" not in text
    # speedups against decodekit's plain graph, from the medians: 3.4 / 3.0, 3.4 / 2.8, 0.02 / 0.0066
    assert "| 1.13x |" in text and "| 1.21x |" in text and "| 3.03x |" in text


def test_peers_report_refuses_a_file_without_peer_rows(tmp_path):
    from bench import report

    src = tmp_path / "x.json"
    src.write_text(json.dumps({"benchmarks": [{"name": "a", "group": "g", "stats": {"median": 1}}]}))
    with pytest.raises(SystemExit, match="no bench_peers.py rows"):
        report.peers_report(src)
