"""Layer reduction: the student.blocks rule, its checks, and the student it builds."""

from __future__ import annotations

import pytest
import torch

from qdsl.compiler.build import explain
from qdsl.config.student import StudentError, parse_blocks, student_map
from qdsl.errors import RecipeError
from qdsl.lang import parse_recipe
from qdsl.models.student import find_blocks, make_student
from tiny import tiny, tiny_ids


@pytest.mark.parametrize("value, n, expected", [
    ("every_other", 12, (1, 3, 5, 7, 9, 11)),   # de Moor's 6L set
    ("every_other", 4, (1, 3)),
    ("every_other", 5, (1, 3)),
    ("bottom_half", 12, (0, 1, 2, 3, 4, 5)),
    ("top_half", 12, (6, 7, 8, 9, 10, 11)),
    ("top_half", 5, (3, 4)),
    ("0,2", 4, (0, 2)),
    ("3", 4, (3,)),
])
def test_map_is_as_documented(value, n, expected):
    assert student_map(value, n) == expected


@pytest.mark.parametrize("value", ["3,1", "1,1", "odd", "1,-2", "", "1.5"])
def test_bad_values(value):
    with pytest.raises(StudentError):
        parse_blocks(value)


def test_index_past_the_model():
    with pytest.raises(StudentError, match="block 4, but the model has 4 blocks"):
        student_map("1,4", 4)
    with pytest.raises(StudentError, match="keeps no block"):
        student_map("every_other", 1)


def test_checker_locates_a_malformed_value():
    with pytest.raises(RecipeError) as e:
        parse_recipe('* -> w8\nset student.blocks = "2,1"\n', "r.qrec")
    d = e.value.diagnostics[0]
    assert (d.file, d.line, d.col) == ("r.qrec", 2, 22)


def test_explain_locates_an_index_the_model_lacks():
    model = tiny("gpt2")   # 2 blocks
    with pytest.raises(RecipeError) as e:
        explain(parse_recipe('* -> w8\nset student.blocks = "0,2"\n', "r.qrec"), model)
    d = e.value.diagnostics[0]
    assert (d.line, d.col) == (2, 22) and "block 2" in d.message


def test_explain_shows_the_map():
    model = tiny("gpt2", n_layer=4)
    ex = explain(parse_recipe("* -> w8\nset student.blocks = every_other\n"), model)
    assert ex.student == (1, 3) and ex.teacher_blocks == 4
    assert "0 <- 1, 1 <- 3" in ex.summary()
    assert ex.named.blocks == 2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_student_copies_the_kept_blocks(family):
    teacher = tiny(family, **({"n_layer": 4} if family == "gpt2" else {"num_hidden_layers": 4}))
    student = make_student(teacher, (1, 3))
    _, t_blocks = find_blocks(teacher)
    _, s_blocks = find_blocks(student)
    assert len(s_blocks) == 2 and len(t_blocks) == 4        # the teacher is untouched
    for s, t in zip(s_blocks, (t_blocks[1], t_blocks[3])):
        for (ks, ps), (kt, pt) in zip(s.state_dict().items(), t.state_dict().items()):
            assert ks == kt and torch.equal(ps, pt)
        assert s is not t
    layer_idx = [m.layer_idx for b in s_blocks for m in b.modules()
                 if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(layer_idx)) == [0, 1]
    ids = tiny_ids(student, 1, 6)
    out = student.generate(ids, max_new_tokens=3, do_sample=False)   # the cache works
    assert out.shape == (1, 9)


@pytest.mark.parametrize("lower", ["fake", "int8"])
def test_compiled_student_reloads(tmp_path, lower):
    """compile with student.blocks = the post-training baseline (no training); a fake
    artifact reloads against the teacher, reduced again on load."""
    import qdsl
    from qdsl.compiler.build import compile
    teacher = tiny("gpt2", n_layer=4)
    recipe = parse_recipe("set student.blocks = every_other\n* -> w4 sym per_channel\n")
    qm = compile(teacher, recipe, lower=lower, progress=False)
    qm.save(tmp_path / "a")
    back = qdsl.load(tmp_path / "a", teacher)
    ids = tiny_ids(teacher, 1, 8)
    assert torch.equal(qm(ids), back(ids))
    assert qm.named.blocks == 2
