"""The README's speed table is written from saved ``benchmarks/vs_fsrl.py`` documents."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import vs_fsrl  # noqa: E402


def _doc(l1, l2, e2e, e2e_steady, load=3.5):
    return {
        "benchmark": "vs_fsrl",
        "date": "2026-12-05 10:00:00 UTC",
        "ratios_ours_over_fsrl": {
            "learner_1_thread": l1,
            "learner_2_threads": l2,
            "end_to_end_env_steps_per_s": e2e,
            "end_to_end_vs_fsrl_collect_and_update_only": e2e_steady,
        },
        "machine_load_before": {"loadavg_1_5_15": [load, 1.0, 1.0]},
    }


def test_table_rows_carry_each_documents_ratios():
    table = vs_fsrl.speed_table(
        [("a.json", _doc(1.234, None, 3.5, 2.25)), ("b.json", _doc(2.0, 1.5, 4.0, 3.0, 0.25))]
    )
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[2].split("|")[3:7] == [" 1.23x ", " n/ax ", " 3.50x ", " 2.25x "]
    assert "2026-12-05" in lines[2] and "3.5 |" in lines[2]
    assert lines[3].split("|")[3:8] == [" 2.00x ", " 1.50x ", " 4.00x ", " 3.00x ", " 0.2 "]


def test_rejects_a_document_of_another_benchmark():
    with pytest.raises(ValueError, match="not a vs_fsrl document"):
        vs_fsrl.speed_table([("x.json", {"benchmark": "learner"})])


def test_write_readme_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{vs_fsrl.README_BEGIN}\nold table\n{vs_fsrl.README_END}\noutro\n")
    vs_fsrl.write_readme_block(readme, "| new |")
    assert (
        readme.read_text()
        == f"intro\n{vs_fsrl.README_BEGIN}\n| new |\n{vs_fsrl.README_END}\noutro\n"
    )
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    with pytest.raises(SystemExit, match="has no speed block"):
        vs_fsrl.write_readme_block(bare, "| new |")
    assert bare.read_text() == "no markers\n"


def test_cli_table_matches_the_readme_block():
    """The README's block is what the saved measurements give (nobody typed it in)."""
    docs = sorted((REPO / "docs" / "measurements").glob("vs_fsrl_*.json"))
    assert docs, "no saved vs_fsrl documents"
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "vs_fsrl.py"), "--table", *map(str, docs)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout.strip()
    readme = (REPO / "README.md").read_text()
    block = readme.split(vs_fsrl.README_BEGIN, 1)[1].split(vs_fsrl.README_END, 1)[0].strip()
    rel = out.replace(str(REPO) + "/", "")
    assert block == rel
    first = json.loads(docs[0].read_text())["ratios_ours_over_fsrl"]["learner_1_thread"]
    assert f"{first:.2f}x" in block
