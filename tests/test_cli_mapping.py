"""The command line as users asked for it (issue #26 items 2 and 3), in process.

What this proves:
- `plan --mapping file.py:NAME` and `--mapping file.json` give the rules (JSON
  values in `--map`'s Python syntax), `--map` adds to them, and a missing file,
  name, bad JSON or failing script exits 2 with one line;
- `transpose(x, (1, 0))` written as in Python plans, in `--map` and in JSON;
- `plan`'s default mapping (`params=params`, `collections=collections`) applies
  to Kauldron workdirs (and their step folders) only: any other source without a
  mapping exits 2 saying how to give one;
- `plan --target module:function` imports the module from the current folder,
  calls the function and plans against the abstract state it returns; an
  unknown module or function, a function that raises or returns None, and
  `--target-step` with it exit 2 with one line;
- `plan --suggest` exists only when `tg.suggest` does, and prints its code then
  its explanation;
- a path given as a source names `tg.SafetensorsCheckpoint` when it holds
  safetensors (and all three kinds otherwise);
- `inspect` folds 4 or more alike repeated layers into `[0..N]` with `x N` on
  their leaves, and `--expand` shows every one;
- `--map` text writes the operations of docs/design.md section 16 as Python
  does (`take`, `slice`, `pad`, `scale`, `offset`, `concat([...])`,
  `stack([...])`, nested), each parsing to the operation `tg` builds, a plan
  from a real checkpoint showing them and a graft through them equal to
  numpy; malformed text exits 2 with one line naming the entry (a bracket
  that does not close with its column).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import jax
import numpy as np
import pytest
from kauldron_run import write_item

import treegraft as tg
from treegraft._app import cli


def plan_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = cli.main(["plan", *args, "--plain"])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def item(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An orbax item: a torch-style `weight` [3, 2] and a bias."""
    folder = tmp_path_factory.mktemp("mapping") / "item"
    return write_item(folder, {"weight": np.ones((3, 2), np.float32),
                               "bias": np.zeros(3, np.float32)})


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An orbax item in flax's layout: `kernel` [2, 3] and `bias`."""
    folder = tmp_path_factory.mktemp("mapping") / "target"
    return write_item(folder, {"kernel": np.zeros((2, 3), np.float32),
                               "bias": np.zeros(3, np.float32)})


# ----------------------------------------------------------------------------
# --mapping FILE
# ----------------------------------------------------------------------------


def test_mapping_from_a_python_file(capsys, tmp_path, item, target) -> None:
    (tmp_path / "rules.py").write_text(textwrap.dedent("""
        import treegraft as tg
        MAPPING = {"kernel": tg.transpose("weight", (1, 0)), "bias": "bias"}
    """))
    status, out, err = plan_cli(capsys, item, "--target", target,
                                "--mapping", f"{tmp_path}/rules.py:MAPPING")
    assert status == 0, err
    assert "the graft would succeed" in out
    assert "transpose('weight', (1, 0))" in out


def test_mapping_from_a_json_file_with_operations_in_python_syntax(
    capsys, tmp_path, item, target
) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"kernel": "transpose(weight, (1, 0))", "bias": "bias"}))
    status, out, err = plan_cli(capsys, item, "--target", target, "--mapping", str(rules),
                                "--json")
    assert status == 0, err
    entries = {e["target"]: e for e in json.loads(out)["entries"]}
    assert entries["kernel"]["source"] == "weight"
    assert "transpose" in entries["kernel"]["rule"]


def test_map_flags_add_to_the_mapping_file(capsys, tmp_path, item, target) -> None:
    (tmp_path / "rules.json").write_text(json.dumps({"kernel": "transpose(weight, 1, 0)"}))
    status, out, err = plan_cli(capsys, item, "--target", target,
                                "--mapping", str(tmp_path / "rules.json"))
    assert status == 0, err
    assert "untouched target leaves: 1" in out
    status, out, err = plan_cli(capsys, item, "--target", target, "--mapping",
                                str(tmp_path / "rules.json"), "--map", "bias=bias")
    assert status == 0, err
    assert "untouched target leaves: 0" in out and "transpose (1, 0)" in out


def test_transpose_with_a_tuple_as_python_writes_it(capsys, item, target) -> None:
    status, out, err = plan_cli(capsys, item, "--target", target,
                                "--map", "kernel=transpose(weight, (1, 0))", "--map", "bias=bias")
    assert status == 0, err
    assert "kernel  weight  float32[3, 2]  transpose (1, 0)" in out


@pytest.mark.parametrize(
    ("files", "spec", "message"),
    [
        ({}, "{d}/nope.py:M", "no file"),
        ({"r.py": "MAPPING = {}"}, "{d}/r.py:MAPING",
         "defines no 'MAPING' (did you mean 'MAPPING'?)"),
        ({"r.py": "M = [1]"}, "{d}/r.py:M", "M is a list, not a mapping"),
        ({"r.py": "1/0"}, "{d}/r.py:M", "raised ZeroDivisionError: division by zero"),
        ({"r.py": "M = {}"}, "{d}/r.py", "FILE.py:NAME"),
        ({"r.json": "{bad"}, "{d}/r.json", "not valid JSON"),
        ({"r.json": "[1]"}, "{d}/r.json", "must be one object"),
        ({"r.json": '{"a": 3}'}, "{d}/r.json", "key 'a': a value is a path or operation"),
        ({"r.json": '{"a": "stack(b, axis=x)"}'}, "{d}/r.json",
         "key 'a': stack: the axis must be an integer, got 'x'"),
        ({}, "{d}/none.json", "cannot be read"),
    ],
    ids=["no-file", "no-name", "not-a-dict", "raises", "no-name-given", "bad-json",
         "json-list", "json-number", "json-bad-op", "json-missing"],
)
def test_a_bad_mapping_file_exits_2_with_one_line(
    capsys, tmp_path, item, target, files, spec, message
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    status, out, err = plan_cli(capsys, item, "--target", target,
                                "--mapping", spec.format(d=tmp_path))
    assert status == 2
    assert message in err and err.startswith("treegraft plan: --mapping ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------
# The default mapping: Kauldron only
# ----------------------------------------------------------------------------


def test_no_mapping_for_a_source_that_is_not_kauldron_exits_2(capsys, item, target) -> None:
    status, out, err = plan_cli(capsys, item, "--target", target)
    assert status == 2 and out == ""
    assert "is not a Kauldron workdir, so there is no default mapping" in err
    assert "--map NEW=OLD" in err and "--mapping FILE.py:NAME" in err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = str(tmp_path_factory.mktemp("mapping") / "run")
    assert cli.main(["demo", "--keep", folder, "--plain"]) == 0
    return folder


def test_the_default_mapping_still_applies_to_a_kauldron_workdir_and_step(
    capsys, workdir
) -> None:
    capsys.readouterr()
    step = os.path.join(workdir, "checkpoints", "ckpt_1000")
    for source in (workdir, step):
        status, out, err = plan_cli(capsys, source, "--target", step)
        assert status == 0, err
        assert "'params' <- 'params'" in out


# ----------------------------------------------------------------------------
# --target module:function
# ----------------------------------------------------------------------------


@pytest.fixture
def model_module(tmp_path, monkeypatch):
    """A module `newmodel` in the current folder with functions returning states."""
    (tmp_path / "newmodel.py").write_text(textwrap.dedent("""
        import jax, jax.numpy as jnp

        def init():
            return {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}

        def abstract_state():
            return jax.eval_shape(init)

        def wrong_state():
            return {"kernel": jax.ShapeDtypeStruct((3, 3), jnp.float32),
                    "bias": jax.ShapeDtypeStruct((3,), jnp.float32)}

        def broken():
            raise RuntimeError("no config")

        def nothing():
            return None

        NOT_A_FUNCTION = 3
    """))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("newmodel", None)  # another test's (or docs page's) module of that name
    yield "newmodel"
    sys.modules.pop("newmodel", None)


def test_plan_against_a_model_defined_in_code(capsys, model_module, item) -> None:
    status, out, err = plan_cli(capsys, item, "--target", "newmodel:abstract_state",
                                "--map", "kernel=transpose(weight, (1, 0))", "--map", "bias=bias")
    assert status == 0, err
    assert "the graft would succeed" in out and "transpose (1, 0)" in out
    assert os.getcwd() not in sys.path  # the current folder was put on the path only to import


def test_a_model_in_code_is_checked_like_a_checkpoint(capsys, model_module, item) -> None:
    status, out, err = plan_cli(capsys, item, "--target", "newmodel:wrong_state",
                                "--map", "kernel=transpose(weight, (1, 0))", "--map", "bias=bias")
    assert status == 1
    assert "the graft would fail" in out and "kernel" in out


@pytest.mark.parametrize(
    ("spec", "extra", "message"),
    [
        ("nomodule_xyz:f", [], "no module named 'nomodule_xyz' in the current folder"),
        ("newmodel:abstract_stat", [], "newmodel has no 'abstract_stat' (did you mean "
                                       "'abstract_state'?)"),
        ("newmodel:NOT_A_FUNCTION", [], "NOT_A_FUNCTION is a int, not a function"),
        ("newmodel:broken", [], "calling broken() raised RuntimeError: no config"),
        ("newmodel:nothing", [], "nothing() returned None"),
        ("newmodel:abstract_state", ["--target-step", "1"], "is a function, not a Kauldron"),
    ],
    ids=["no-module", "no-function", "not-callable", "raises", "none", "step"],
)
def test_a_bad_model_target_exits_2_with_one_line(
    capsys, model_module, item, spec, extra, message
) -> None:
    status, out, err = plan_cli(capsys, item, "--target", spec, "--map", "bias=bias", *extra)
    assert status == 2
    assert message in err and err.startswith("treegraft plan: ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_model_target_may_return_an_nnx_module(capsys, tmp_path, monkeypatch) -> None:
    pytest.importorskip("flax")
    (tmp_path / "nnxmodel.py").write_text(textwrap.dedent("""
        from flax import nnx

        class Model(nnx.Module):
            def __init__(self, rngs):
                self.linear = nnx.Linear(2, 3, rngs=rngs)

        def abstract_model():
            return nnx.eval_shape(lambda: Model(nnx.Rngs(0)))
    """))
    item = write_item(tmp_path / "torch_linear", {"w": np.ones((3, 2), np.float32),
                                                  "b": np.zeros(3, np.float32)})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "nnxmodel", raising=False)
    status, out, err = plan_cli(capsys, item, "--target", "nnxmodel:abstract_model",
                                "--map", "linear.kernel=transpose(w, (1, 0))",
                                "--map", "linear.bias=b")
    assert status == 0, err
    assert "linear.kernel  w       float32[3, 2]  transpose (1, 0)" in out
    assert "untouched target leaves: 0" in out


def test_model_target_error_is_a_graft_error() -> None:
    from treegraft._app.model_target import ModelTargetError, load_model_target

    with pytest.raises(ModelTargetError) as info:
        load_model_target("nomodule_xyz:f")
    assert isinstance(info.value, tg.GraftError)


# ----------------------------------------------------------------------------
# --suggest: the mapping as Python code to paste, and why
# ----------------------------------------------------------------------------


def test_suggest_prints_code_that_grafts_and_its_explanation(capsys, item, target) -> None:
    import jax.numpy as jnp

    status, out, err = plan_cli(capsys, item, "--target", target, "--suggest")
    assert status == 0, err
    code, _, explanation = out.partition("\n\n")
    mapping = eval(code, {"tg": tg, "jnp": jnp})  # the code a user pastes
    assert mapping == {"bias": "bias", "kernel": tg.transpose("weight", (1, 0))}
    assert "kernel <- transpose(\"weight\", (1, 0))" in explanation
    assert "transposed" in explanation
    weight = np.arange(6, dtype=np.float32).reshape(3, 2)
    state = {"kernel": np.zeros((2, 3), np.float32), "bias": np.zeros(3, np.float32)}
    out_state = tg.graft(state, {"weight": weight, "bias": np.ones(3, np.float32)}, mapping)
    np.testing.assert_array_equal(out_state["kernel"], weight.T)


def test_suggest_against_a_model_defined_in_code(capsys, model_module, item) -> None:
    status, out, err = plan_cli(capsys, item, "--target", "newmodel:abstract_state", "--suggest")
    assert status == 0, err
    assert '"kernel": tg.transpose("weight", (1, 0))' in out


# ----------------------------------------------------------------------------
# A path as the source names all three kinds, safetensors first when it holds them
# ----------------------------------------------------------------------------


def test_a_path_holding_safetensors_says_to_use_safetensors_checkpoint(tmp_path) -> None:
    from safetensors.numpy import save_file

    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(tg.MappingError, match=r"holds safetensors weights, so wrap it in "
                       r"tg\.SafetensorsCheckpoint\("):
        tg.plan({"w": np.zeros(2, np.float32)}, str(tmp_path), {"w": "w"})
    with pytest.raises(tg.MappingError, match=r"tg\.KauldronCheckpoint\(.*tg\.Safetensors"):
        tg.plan({"w": np.zeros(2, np.float32)}, str(tmp_path / "other"), {"w": "w"})


# ----------------------------------------------------------------------------
# inspect folds repeated layers
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Safetensors weights of 6 layers of 8 experts each (and a gate per layer)."""
    from safetensors.numpy import save_file

    tensors = {"model.embed.weight": np.zeros((4, 2), np.float32)}
    for layer in range(6):
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = np.zeros(8, np.float32)
        for expert in range(8):
            key = f"model.layers.{layer}.mlp.experts.{expert}.up_proj.weight"
            tensors[key] = np.zeros((3, 2), np.float16)
    path = tmp_path_factory.mktemp("moe") / "model.safetensors"
    save_file(tensors, str(path))
    return str(path)


def test_inspect_folds_repeated_layers(capsys, moe) -> None:
    assert cli.main(["inspect", moe, "--plain"]) == 0
    out = capsys.readouterr().out
    assert "[0..5]  54 leaves" in out and "[0..7]  48 leaves" in out
    assert "weight  float16[3, 2]  x 48  576 B" in out
    assert "gate" in out and "float32[8]  x 6" in out
    assert "layers[1]" not in out and "[1]" not in out
    assert out.splitlines()[0].endswith("55 leaves, 800 B")
    assert len(out.splitlines()) < 15


def test_inspect_expand_shows_every_layer(capsys, moe) -> None:
    assert cli.main(["inspect", moe, "--plain", "--expand"]) == 0
    out = capsys.readouterr().out
    assert "[0..5]" not in out and " x " not in out
    assert out.count("up_proj") == 48


def test_short_runs_and_unlike_layers_are_not_folded() -> None:
    from treegraft._app.display import render_tree
    from treegraft._tree.pytree import flatten_parts

    spec = jax.ShapeDtypeStruct
    short = {"layers": [{"w": spec((2,), np.float32)} for _ in range(3)]}
    unlike = {"layers": [{"w": spec((i + 1,), np.float32)} for i in range(5)]}
    for tree in (short, unlike):
        paths, leaves, _ = flatten_parts(tree)
        lines = render_tree(list(zip(paths, leaves, strict=True)), title="t", fold=True)
        assert not any(".." in line or " x " in line for line in lines)


def test_fold_does_not_apply_to_json(capsys, moe) -> None:
    assert cli.main(["inspect", moe, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["leaves"]) == 55




# ----------------------------------------------------------------------------
# --map text for the operations of docs/design.md section 16
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("take(x, 3, axis=0)", tg.take("x", 3, axis=0)),
        ("take(x, -1, 1)", tg.take("x", -1, axis=1)),
        ("slice(x, 0, 128, axis=-1)", tg.slice("x", 0, 128, axis=-1)),
        ("slice(x, start=2, stop=4)", tg.slice("x", 2, 4)),
        ("pad(x, 32128, axis=0, constant=0)", tg.pad("x", 32128, axis=0, constant=0)),
        ("pad(x, 8, 1, -1.5)", tg.pad("x", 8, axis=1, constant=-1.5)),
        ("pad(x, 8, constant=True)", tg.pad("x", 8, constant=True)),
        ("scale(x, 0.125)", tg.scale("x", 0.125)),
        ("scale(x, factor=1e-3)", tg.scale("x", 0.001)),
        ("offset(x, 1.0)", tg.offset("x", 1.0)),
        ("offset(x, -.5)", tg.offset("x", -0.5)),
        ("concat([a, b, c], axis=0)", tg.concat(["a", "b", "c"], axis=0)),
        ("concat([a['k,]'], b[0],], -1)", tg.concat(["a['k,]']", "b[0]"], axis=-1)),
        ("stack([a, b], axis=0)", tg.stack(["a", "b"], axis=0)),
        ("stack([k.*, v.*])", tg.stack(["k.*", "v.*"])),
        ("stack([transpose(k, 1, 0), cast(v, float32)], 1)",
         tg.stack([tg.transpose("k", (1, 0)), tg.cast("v", np.float32)], axis=1)),
        ("concat([slice(a, 0, 2), pad(scale(b, 2), 4, constant=0)], axis=-1)",
         tg.concat([tg.slice("a", 0, 2), tg.pad(tg.scale("b", 2.0), 4)], axis=-1)),
        ("stack(concat([l_*.q, l_*.k]), axis=1)",
         tg.stack(tg.concat(["l_*.q", "l_*.k"]), axis=1)),
        ("offset(take(stack([a, b]), 1), 1)", tg.offset(tg.take(tg.stack(["a", "b"]), 1), 1.0)),
    ],
    ids=["take", "take-positional", "slice", "slice-keywords", "pad", "pad-positional",
         "pad-bool", "scale", "scale-exponent", "offset", "offset-leading-dot", "concat",
         "concat-quoted-and-indexed", "stack-list", "stack-list-patterns", "stack-list-of-ops",
         "concat-of-ops", "stack-of-concat", "nested-take"],
)
def test_map_text_writes_the_new_operations_as_python_does(text, expected) -> None:
    from treegraft._app.map_text import parse_map, parse_rule_value

    assert parse_map([f"new={text}"])["new"] == expected
    # a mapping file's JSON values use the same text
    assert parse_rule_value(f"  {text}", where="--mapping 'm.json', key 'new'") == expected


@pytest.mark.parametrize(
    "op",
    [
        tg.concat(["k", tg.pad("v", 4, axis=-1, constant=-1.5)], axis=1),
        tg.stack(["k", tg.scale("v", 0.125)], axis=0),
        tg.take(tg.offset("k", 1.0), 1, axis=-1),
        tg.slice(tg.transpose("k", (1, 0)), 0, 2, axis=1),
        tg.stack(tg.concat(["l_*.q", "l_*.k"]), axis=1),
    ],
    ids=["concat-pad", "stack-list-scale", "take-offset", "slice-transpose", "stack-concat"],
)
def test_an_operation_as_a_plan_prints_it_parses_back_to_itself(op) -> None:
    from treegraft._app.map_text import parse_map

    text = op.describe()  # quoted paths, as the plan shows them
    assert "'k'" in text or "'l_*.q'" in text
    assert parse_map([f"x={text}"])["x"] == op


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, np.ndarray]]:
    """An orbax item of a fused attention and its neighbours, random bits."""
    rng = np.random.default_rng(7)
    tree = {
        "qkv": rng.normal(size=(4, 12)).astype(np.float32),
        "kv": rng.normal(size=(2, 4, 3)).astype(np.float32),
        "k": rng.normal(size=(4, 3)).astype(np.float32),
        "v": rng.normal(size=(4, 3)).astype(np.float32),
        "embed": rng.normal(size=(5, 4)).astype(np.float32),
        "norm": rng.normal(size=4).astype(np.float32),
    }
    return write_item(tmp_path_factory.mktemp("fused") / "item", tree), tree


def test_new_operations_from_map_text_plan_and_graft_as_numpy_computes(capsys, fused) -> None:
    from treegraft._app.map_text import parse_map

    path, tree = fused
    entries = [
        "q=slice(qkv, 0, 4, axis=-1)",
        "kt=take(kv, 0, axis=0)",
        "joined=concat([k, v], axis=1)",
        "pair=stack([k, v], axis=1)",
        "embed=pad(embed, 8, axis=0, constant=0)",
        "nq=scale(offset(norm, 1.0), 0.5)",
    ]
    want = {
        "q": tree["qkv"][:, 0:4],
        "kt": tree["kv"][0],
        "joined": np.concatenate([tree["k"], tree["v"]], axis=1),
        "pair": np.stack([tree["k"], tree["v"]], axis=1),
        "embed": np.concatenate([tree["embed"], np.zeros((3, 4), np.float32)], axis=0),
        "nq": ((tree["norm"] + np.float32(1.0)) * np.float32(0.5)).astype(np.float32),
    }
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in want.items()}
    with tg.OrbaxCheckpoint(path) as ckpt:
        got = tg.graft(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), target), ckpt,
                       parse_map(entries))
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=key)
    target_path = write_item(os.path.join(os.path.dirname(path), "target"),
                             {k: np.zeros(v.shape, v.dtype) for k, v in want.items()})
    args = [a for e in entries for a in ("--map", e)]
    status, out, err = plan_cli(capsys, path, "--target", target_path, *args)
    assert status == 0, out + err
    assert "the graft would succeed" in out
    for shown in ("slice 0:4 along axis -1", "take [0] along axis 0", "pad axis 0 to 8 with 0",
                  "scale by 0.5", "offset by 1.0", "concat(['k', 'v'], axis=1)",
                  "stack(['k', 'v'], axis=1)"):
        assert shown in out, shown


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("x=concat([a, b, axis=0)", "the '[' at column 10 is never closed by a ']'"),
        ("x=concat([a, b]], axis=0)", "the ']' at column 16 closes no '['"),
        ("x=stack([a, [b], axis=0)", "the '[' at column 9 is never closed by a ']'"),
        ("x=concat([a, b]c, axis=0)", "concat: unexpected text after the list closed at column 15"),
        ("x=concat(a, axis=0)", "concat takes a list of values in square brackets, got 'a'"),
        ("x=concat([], axis=0)", "concat takes at least one value, got an empty list"),
        ("x=concat([a,,b])", "concat: its list has an empty value"),
        ("x=stack([a, None])", "stack: a value of its list is None"),
        ("x=concat()", "concat() needs a list of values as its first argument"),
        ("x=concat([a, b], axis=q)", "concat: the axis must be an integer, got 'q'"),
        ("x=take(x)", "take needs an index: take(path, index, axis=0)"),
        ("x=take(x, 1.5)", "take: the index must be an integer, got '1.5'"),
        ("x=take(x, 1, 2, 3)", "take takes a source and at most 2 arguments (index, axis), got 3"),
        ("x=take(x, 1, index=2)", "take: index is given by position and as index="),
        ("x=take(x, 1, ax=0)", "take: unknown argument ax=; it takes index=, axis="),
        ("x=slice(x, 0)", "slice needs a stop: slice(path, start, stop, axis=0)"),
        ("x=slice(x, 3, 1)", "slice: needs 0 <= start < stop, got start=3, stop=1"),
        ("x=pad(x)", "pad needs a size: pad(path, size, axis=0, constant=0)"),
        ("x=pad(x, 3, constant=z)", "pad: the constant must be a number such as 0.125, got 'z'"),
        ("x=pad(x, -3)", "pad: size must be >= 0, got -3"),
        ("x=scale(x)", "scale needs a factor: scale(path, factor)"),
        ("x=scale(x, inf)", "scale: the factor must be a number such as 0.125, got 'inf'"),
        ("x=scale(x, 1, 2)", "scale takes a source and one factor, got 2 factor values: 1, 2"),
        ("x=offset(x, amount=1/2)", "offset: the amount must be a number such as 0.125, got '1/2'"),
        ("x=offset(x, by=1)", "offset: unknown argument by=; it takes amount="),
        ("x=cast(take(x, a), float32)", "take: the index must be an integer, got 'a'"),
    ],
    ids=lambda v: v if v.startswith("x=") else "",
)
def test_malformed_new_operations_exit_2_with_one_line_naming_the_entry(
    capsys, entry, reason
) -> None:
    status = cli.main(["plan", "/nonexistent/src", "--target", "/nonexistent/t", "--map", entry])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"treegraft plan: --map {entry!r}: "), lines[0]
    assert reason in lines[0]


def test_a_bad_path_inside_a_new_operation_points_at_its_column(capsys, fused) -> None:
    path, _ = fused
    status = cli.main(["plan", path, "--target", path, "--map", "x=concat([k, a..b], axis=0)"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "invalid path 'a..b': empty name" in err and "at column 3" in err
    assert err.rstrip().splitlines()[-2:] == ["      a..b", "        ^"]
