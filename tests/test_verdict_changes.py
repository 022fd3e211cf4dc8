"""tools/verdict_changes.py: counts and changed verdicts between two findings lists."""

from __future__ import annotations

import json

from toolmod import load_tool


def _tool():
    return load_tool("verdict_changes")


def _f(table, claim, verdict):
    return {"table": table, "claim": claim, "verdict": verdict}


def test_changes_and_counts(tmp_path, capsys):
    vc = _tool()
    before = [_f("wei-4", "a", "inconclusive"), _f("wei-5", "b", "reproduced"),
              _f("storti-2", "c", "contradicted")]
    after = [_f("wei-4", "a", "contradicted"), _f("wei-5", "b", "reproduced"),
             _f("wei-7", "d", "inconclusive")]
    assert vc.changes(before, after) == [("storti-2", "c", "contradicted", "absent"),
                                         ("wei-4", "a", "inconclusive", "contradicted"),
                                         ("wei-7", "d", "absent", "inconclusive")]
    assert vc.counts(after) == ("reproduced 1, contradicted 1, inconclusive 1, "
                                "not run yet 0")
    for name, fs in (("b.json", before), ("a.json", after)):
        (tmp_path / name).write_text(json.dumps({"findings": fs}))
    assert vc.main([str(tmp_path / "b.json"), str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "3 verdict(s) changed:" in out and "wei-4: a: inconclusive -> contradicted" in out
