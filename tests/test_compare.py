"""``qdsl compare`` / ``qdsl.study.compare``: two eval rows, paired, with verdicts."""

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qdsl.cli import main
from qdsl.study.compare import CompareError, Row, compare, load_row, parse_spec, shared
from qdsl.study.stats import n_for_halfwidth, paired_t, ppl_ratio, t_quantile


def _row(es, em=None, nll=None, ids=None, model="m", humaneval=None):
    ids = ids or [f"s{i}" for i in range(len(es))]
    em = em or [False] * len(es)
    r = {"model": model, "es": sum(es) / len(es),
         "samples": [{"id": i, "es": e, "em": m} for i, e, m in zip(ids, es, em)]}
    if nll is not None:
        r["ppl_window_nll"] = list(nll)
        r["ppl_window_tokens"] = [100] * len(nll)
        r["ppl"] = math.exp(sum(nll) / len(nll))
    if humaneval is not None:
        r["humaneval"] = {"results": [{"task_id": t, "passed": p} for t, p in humaneval]}
    return r


def _metrics(result):
    return {m["metric"]: m for m in result["metrics"]}


def test_es_matches_paired_t_and_the_verdicts_follow_the_interval():
    rng = random.Random(1)
    b = [rng.uniform(0, 100) for _ in range(400)]
    for shift, verdict in ((-0.2, "within"), (-6.0, "beyond"), (-1.9, "inconclusive")):
        a = [x + shift + rng.gauss(0, 5) for x in b]
        m = _metrics(compare(Row("a", _row(a)), Row("b", _row(b))))["es"]
        iv = paired_t(a, b)
        assert (m["diff"]["est"], m["diff"]["lo"], m["diff"]["hi"]) == (iv.est, iv.lo, iv.hi)
        assert m["margin_verdict"] == verdict, (shift, m["diff"])
        assert m["difference"] == ("A lower" if iv.hi < 0 else "A higher" if iv.lo > 0
                                   else "not distinguishable")
        if verdict == "inconclusive":
            n = m["n_to_decide"]
            # at that n an interval of the same SD around the same estimate clears -2
            assert iv.est - t_quantile(0.975, n - 1) * iv.sd / math.sqrt(n) >= -2.0
            assert n == n_for_halfwidth(iv.sd, iv.est + 2.0)


def test_an_estimate_past_the_margin_has_no_deciding_n():
    b = [50.0 + (i % 7) for i in range(10)]
    a = [x - 2.5 + (3 if i % 2 else -3) for i, x in enumerate(b)]   # -2.5, wide
    m = _metrics(compare(Row("a", _row(a)), Row("b", _row(b))))["es"]
    assert m["margin_verdict"] == "inconclusive" and m["n_to_decide"] is None


def test_em_is_mcnemar_and_ppl_the_paired_log_loss_ratio():
    b_es = [50.0] * 100
    em_a = [i < 30 for i in range(100)]
    em_b = [i < 20 for i in range(100)]
    nll_b = [2.0 + 0.01 * i for i in range(64)]
    nll_a = [x + 0.2 for x in nll_b]                # x e^0.2 = 1.22: beyond 5%
    r = compare(Row("a", _row(b_es, em_a, nll_a)), Row("b", _row(b_es, em_b, nll_b)))
    m = _metrics(r)
    assert m["em"]["mcnemar"]["b"] == 10 and m["em"]["mcnemar"]["c"] == 0
    assert m["em"]["diff"]["est"] == pytest.approx(10.0) and m["em"]["difference"] == "A higher"
    assert m["ppl"]["ratio"]["est"] == pytest.approx(math.exp(0.2))
    assert m["ppl"]["ratio"]["est"] == pytest.approx(ppl_ratio(nll_a, nll_b).est)
    assert m["ppl"]["margin_verdict"] == "beyond" and m["ppl"]["difference"] == "A higher"
    # a margin given overrides the study's
    m = _metrics(compare(Row("a", _row(b_es, em_a, nll_a)), Row("b", _row(b_es, em_b, nll_b)),
                         {"ppl_pct": 30.0}))
    assert m["ppl"]["margin_verdict"] == "within"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0, 100), st.floats(0.5, 5),
                          st.floats(0.5, 5)), min_size=3, max_size=40))
def test_swapping_the_rows_negates_es_and_inverts_perplexity(data):
    a_es, b_es, a_nll, b_nll = (list(x) for x in zip(*data))
    ab = _metrics(compare(Row("a", _row(a_es, nll=a_nll)), Row("b", _row(b_es, nll=b_nll))))
    ba = _metrics(compare(Row("b", _row(b_es, nll=b_nll)), Row("a", _row(a_es, nll=a_nll))))
    assert ab["es"]["diff"]["est"] == pytest.approx(-ba["es"]["diff"]["est"], abs=1e-9)
    assert ab["es"]["diff"]["lo"] == pytest.approx(-ba["es"]["diff"]["hi"], abs=1e-9)
    assert ab["ppl"]["ratio"]["est"] * ba["ppl"]["ratio"]["est"] == pytest.approx(1.0)
    for m in ab.values():   # every interval holds its estimate
        iv = m.get("diff") or m["ratio"]
        assert iv["lo"] <= iv["est"] <= iv["hi"]


def test_rows_that_do_not_pair_are_errors_that_say_why():
    a = _row([1.0, 2.0, 3.0])
    with pytest.raises(CompareError, match="different completion samples .3 and 2, 2 shared"):
        compare(Row("a", a), Row("b", _row([1.0, 2.0])))
    with pytest.raises(CompareError, match="different perplexity windows .3 and 2 windows"):
        compare(Row("a", _row([1.0, 2.0], nll=[1, 2, 3])), Row("b", _row([1.0, 2.0], nll=[1, 2])))
    with pytest.raises(CompareError, match="different HumanEval problems"):
        compare(Row("a", _row([1.0, 2.0], humaneval=[("t0", True)])),
                Row("b", _row([1.0, 2.0], humaneval=[("t1", True)])))


def test_a_row_without_samples_is_an_error():
    with pytest.raises(CompareError, match="a: no per-sample completion scores"):
        compare(Row("a", {"model": "m", "samples": []}), Row("b", _row([1.0])))


def test_shared_compares_on_the_samples_both_rows_scored():
    big = _row([10.0 * i for i in range(10)], nll=[1.0] * 8)
    small = _row([10.0 * i - 1 for i in range(4)], nll=[1.0] * 4)
    a, b, n = shared(Row("a", big), Row("b", small))
    assert n == 4 and [s["id"] for s in a.data["samples"]] == ["s0", "s1", "s2", "s3"]
    m = _metrics(compare(a, b))
    assert m["es"]["diff"]["est"] == pytest.approx(1.0) and "ppl" not in m   # windows differ
    with pytest.raises(CompareError, match="share no completion sample"):
        shared(Row("a", big), Row("b", _row([1.0], ids=["other"])))


def test_specs_and_files(tmp_path):
    assert parse_spec("x.json") == ("x.json", None)
    assert parse_spec("x.json:baseline") == ("x.json", "baseline")
    assert parse_spec("c:/x.json") == ("c:/x.json", None)
    f = tmp_path / "e.json"
    f.write_text(json.dumps({"target": _row([1.0, 2.0]), "baseline": None}))
    assert load_row(str(f)).label == f"{f}:target"
    with pytest.raises(CompareError, match="has no baseline row .the eval ran with --no-baseline"):
        load_row(f"{f}:baseline")
    (tmp_path / "x.json").write_text("[1]")
    with pytest.raises(CompareError, match="not a `qdsl eval --json` file"):
        load_row(str(tmp_path / "x.json"))


def test_cli(tmp_path, capsys):
    rng = random.Random(0)
    b = [rng.uniform(0, 100) for _ in range(200)]
    nll = [rng.uniform(1, 3) for _ in range(32)]
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"target": _row([x - 0.1 for x in b], nll=[x + 0.001 for x in nll]),
                               "baseline": _row(b, nll=nll)}))
    two = tmp_path / "two.json"
    two.write_text(json.dumps({"target": _row([x - 8 for x in b], nll=nll), "baseline": _row(b)}))
    out = tmp_path / "c.json"
    assert main(["compare", str(one), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "loss within the 2-point margin" in text and "loss within the x1.05 margin" in text
    assert json.loads(out.read_text())["b"]["row"] == f"{one}:baseline"
    assert main(["compare", str(two), str(one), "--margin-es", "10"]) == 0
    text = capsys.readouterr().out
    assert "A-B -7.90" in text and "A lower; loss within the 10-point margin" in text
    # errors: one line, no traceback, exit 2
    for argv, msg in ((["compare", str(tmp_path / "none.json")], "no such file"),
                      (["compare", f"{one}:baseline"], "needs a row B")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err


def _ex(runner="graph", batch=1, threads=1, cpu="AVX512", torch_v="2.13.0"):
    return {"runner": runner, "batch_size": batch, "threads": threads, "cpu": cpu,
            "torch": torch_v}


def test_rows_on_different_execution_paths_are_named(capsys):
    """Two artifacts' rows at another batch or decode path differ by summation order
    alone (up to 3 ES points measured): compare names the fields; a float row against
    a graph differs in runner by design, and a float model's batch does not matter."""
    es = [float(i % 50) for i in range(40)]

    def pair(ea, eb):
        a, b = _row(es), _row([x + 1 for x in es])
        a["execution"], b["execution"] = ea, eb
        return compare(Row("A", a), Row("B", b))["execution_differs"]

    assert pair(_ex(), _ex()) == []
    assert pair(_ex(batch=8), _ex(runner="graph, compiled step")) == [
        "runner graph vs graph, compiled step", "batch size 8 vs 1"]
    assert pair(_ex("transformers", batch=8), _ex(batch=1)) == []       # float vs graph
    assert pair(_ex("transformers", batch=8), _ex(cpu="AVX2")) == ["cpu AVX512 vs AVX2"]
    assert pair(_ex("transformers", batch=8), _ex("transformers", batch=1)) == []
    assert pair(_ex(threads=2), _ex(torch_v="2.12.0")) == ["threads 2 vs 1",
                                                           "torch 2.13.0 vs 2.12.0"]
    a, b = _row(es), _row(es)          # older files without the record: nothing to say
    a["execution"] = _ex()
    assert compare(Row("A", a), Row("B", b))["execution_differs"] == []
    a, b = _row(es), _row(es)          # two graphs under other numerics revisions
    a["execution"], b["execution"], a["numerics"], b["numerics"] = _ex(), _ex(), 1, 2
    assert compare(Row("A", a), Row("B", b))["execution_differs"] == ["qdsl numerics 1 vs 2"]
    a["execution"] = _ex("transformers")          # a float model: not qdsl's numerics
    assert compare(Row("A", a), Row("B", b))["execution_differs"] == []
    del a["numerics"]                  # not recorded on one side: nothing to say
    b["execution"] = _ex()
    assert compare(Row("A", a), Row("B", b))["execution_differs"] == []


def test_cli_says_when_the_paths_differ(tmp_path, capsys):
    es = [float(i % 50) for i in range(40)]
    a, b = _row(es), _row(es)
    a["execution"], b["execution"] = _ex(batch=8), _ex(batch=1)
    f = tmp_path / "e.json"
    f.write_text(json.dumps({"target": a, "baseline": b}))
    assert main(["compare", str(f)]) == 0
    assert "note: the rows ran different execution paths (batch size 8 vs 1)" in \
        capsys.readouterr().out


def test_a_sweeps_cache_entries_are_rows(tmp_path, capsys):
    """One job's cache entry (DIR/cache/KEY.json) compares like an eval row; it has no
    baseline side, so the float row is named as B."""
    rng = random.Random(1)
    b = [rng.uniform(0, 100) for _ in range(100)]
    nll = [rng.uniform(1, 3) for _ in range(16)]
    fp = tmp_path / "aa.json"
    fp.write_text(json.dumps({**_row(b, nll=nll), "key": "aa", "kind": "quality",
                              "recipe": None}))
    q = tmp_path / "bb.json"
    q.write_text(json.dumps({**_row([x - 5 for x in b], nll=[x + 0.1 for x in nll]),
                             "key": "bb", "kind": "quality", "recipe": "/r/wei/t4_x.qrec"}))
    a = load_row(str(q))
    assert a.label == f"{q} (t4_x)"
    assert _metrics(compare(a, load_row(str(fp))))["es"]["diff"]["est"] == pytest.approx(-5)
    assert main(["compare", str(q), str(fp)]) == 0
    out = capsys.readouterr().out
    assert "(t4_x)" in out and "(fp32)" in out and "A-B -5.00" in out
    for argv in (["compare", str(q)], ["compare", f"{q}:baseline", str(fp)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "a sweep's cache entry is one row" in err and "Traceback" not in err
    he = tmp_path / "cc.json"
    he.write_text(json.dumps({"key": "cc", "kind": "humaneval", "samples": []}))
    with pytest.raises(CompareError, match="no per-sample completion scores .a humaneval job"):
        load_row(str(he))


def test_a_sweep_row_is_named_by_its_recipe(tmp_path, capsys):
    """DIR:RECIPE finds the recipe's quality job in the sweep's results.json and reads
    its cache entry; no match or several are errors that say what there is."""
    rng = random.Random(2)
    b = [rng.uniform(0, 100) for _ in range(50)]
    (tmp_path / "cache").mkdir()
    runs = {}
    for key, recipe, kind, shift in (("k0", None, "quality", 0), ("k1", "/x/storti/t2_w8a32.qrec",
                                     "quality", 3), ("k2", "/x/storti/t2_w8a32.qrec", "robust", 9),
                                     ("k3", "/x/wei/t2_w8a32.qrec", "quality", 1)):
        entry = {**_row([x - shift for x in b]), "key": key, "kind": kind, "recipe": recipe}
        (tmp_path / "cache" / f"{key}.json").write_text(json.dumps(entry))
        runs[key] = {"kind": kind, "recipe": recipe}
    (tmp_path / "results.json").write_text(json.dumps({"runs": runs}))
    d = str(tmp_path)
    assert load_row(f"{d}:storti/t2_w8a32").label.endswith("k1.json (t2_w8a32)")
    assert load_row(f"{d}:wei/t2_w8a32.qrec").data["key"] == "k3"
    assert load_row(f"{d}:fp32").data["key"] == "k0"
    with pytest.raises(CompareError, match=r"2 finished quality jobs of 't2_w8a32' \(name one: "):
        load_row(f"{d}:t2_w8a32")
    with pytest.raises(CompareError, match="no finished quality jobs of 'nope'; it has fp32, t2_w8a32"):
        load_row(f"{d}:nope")
    assert main(["compare", f"{d}:storti/t2_w8a32", f"{d}:fp32"]) == 0
    assert "A-B -3.00" in capsys.readouterr().out


def test_a_sweep_row_carries_its_humaneval_job(tmp_path, capsys):
    """DIR:RECIPE attaches the recipe's HumanEval job (a separate cache entry) to its
    quality row, so pass@1 compares paired per problem; not when the sweep has none."""
    rng = random.Random(3)
    b = [rng.uniform(0, 100) for _ in range(40)]
    (tmp_path / "cache").mkdir()
    passed = {None: [True] * 30 + [False] * 10, "/x/wei/t4.qrec": [True] * 18 + [False] * 22}
    runs = {}
    for key, recipe, kind in (("q0", None, "quality"), ("q1", "/x/wei/t4.qrec", "quality"),
                              ("h0", None, "humaneval"), ("h1", "/x/wei/t4.qrec", "humaneval"),
                              ("q2", "/x/wei/t5.qrec", "quality")):
        entry = {**_row(b), "key": key, "kind": kind, "recipe": recipe}
        if kind == "humaneval":
            res = [{"task_id": f"HumanEval/{i}", "passed": p} for i, p in enumerate(passed[recipe])]
            entry = {"key": key, "kind": kind, "recipe": recipe, "samples": [],
                     "humaneval": {"problems": 40, "passed": sum(passed[recipe]),
                                   "pass@1": sum(passed[recipe]) / 40, "results": res}}
        (tmp_path / "cache" / f"{key}.json").write_text(json.dumps(entry))
        runs[key] = {"kind": kind, "recipe": recipe}
    (tmp_path / "results.json").write_text(json.dumps({"runs": runs}))
    d = str(tmp_path)
    row = load_row(f"{d}:wei/t4")
    assert row.data["key"] == "q1" and row.data["humaneval"]["passed"] == 18
    assert "humaneval" not in load_row(f"{d}:wei/t5").data
    got = _metrics(compare(row, load_row(f"{d}:fp32")))["pass@1"]
    assert got["diff"]["est"] == pytest.approx(-30.0)
    assert main(["compare", f"{d}:wei/t4", f"{d}:fp32"]) == 0
    assert "pass@1  A-B -30.00" in capsys.readouterr().out
