"""scripts/bench_proc.py: resident memory from /proc and one configuration per subprocess."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
bench_proc = pytest.importorskip("bench_proc")
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")

CHILD = """import json, sys
spec = json.loads(sys.argv[2])
print("log line before the result")
if spec.get("fail"):
    sys.exit("child failed: " + spec["fail"])
print(json.dumps({"doubled": 2 * spec["x"], "flag": sys.argv[1]}))
"""


def test_status_reads_resident_memory() -> None:
    assert 0 < bench_proc.proc_status_mib("VmRSS") <= bench_proc.proc_status_mib("VmHWM")
    assert bench_proc.proc_status_mib("NoSuchField") != bench_proc.proc_status_mib("NoSuchField")  # NaN


def test_subprocess_result_is_its_last_json_line_and_failures_are_errors(tmp_path: Path) -> None:
    script = tmp_path / "scripts" / "child.py"
    script.parent.mkdir()
    script.write_text(CHILD)
    assert bench_proc.run_in_subprocess(script, {"x": 21}, timeout=60) == {"doubled": 42, "flag": "--one"}
    assert bench_proc.run_in_subprocess(script, {"x": 1, "fail": "bad spec"}, timeout=60) == {
        "error": "child failed: bad spec"
    }


def test_write_doc_replaces_only_the_generated_block(tmp_path: Path) -> None:
    doc = tmp_path / "docs" / "report.md"
    begin, end = "<!-- x:begin -->", "<!-- x:end -->"
    bench_proc.write_doc(doc, "# generated\n\nfirst", begin, end)
    assert doc.read_text() == f"{begin}\n# generated\n\nfirst\n{end}\n"
    doc.write_text("intro by hand\n\n" + doc.read_text() + "\n## Hand-measured\n\nkept\n")
    bench_proc.write_doc(doc, "# generated\n\nsecond", begin, end)
    text = doc.read_text()
    assert text.startswith("intro by hand\n\n" + begin) and "second" in text and "first" not in text
    assert text.endswith(f"{end}\n\n## Hand-measured\n\nkept\n")
