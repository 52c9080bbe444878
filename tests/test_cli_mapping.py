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
  their leaves, and `--expand` shows every one.
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


