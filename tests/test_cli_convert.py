"""`treegraft convert`: the command line's way out (docs/design.md section 15).

Each test runs the real command in process on real checkpoints and reads the
result back with an independent reader (plain orbax, safetensors.safe_open).
Exit status: 0 written, 1 refused or failed (one line), 2 usage.
"""

from __future__ import annotations

import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

import treegraft as tg
from treegraft._app.cli import main
from treegraft._app.convert_cmd import parse_size


def _layers(tmp_path):
    tree = {"params": {f"layers_{i}": {"w": np.full((2, 3), i, np.float32)} for i in range(3)}}
    return tree, tg.save(tree, str(tmp_path / "src"))


def test_convert_stacks_layers_and_plain_orbax_restores_it(tmp_path, capsys):
    tree, src = _layers(tmp_path)
    dest = str(tmp_path / "out")
    rc = main(["convert", src, dest, "--map", "params.layers=stack(params.layers_*, axis=0)"])
    assert rc == 0, capsys.readouterr().err
    got = ocp.StandardCheckpointer().restore(dest)
    want = np.stack([tree["params"][f"layers_{i}"]["w"] for i in range(3)])
    np.testing.assert_array_equal(got["params"]["layers"]["w"], want)
    assert "wrote" in capsys.readouterr().err


def test_invert_takes_the_result_back(tmp_path, capsys):
    tree, src = _layers(tmp_path)
    rule = "params.layers=stack(params.layers_*, axis=0)"
    assert main(["convert", src, str(tmp_path / "out"), "--map", rule]) == 0
    back = str(tmp_path / "back")
    assert main(["convert", str(tmp_path / "out"), back, "--map", rule, "--invert"]) == 0
    got = ocp.StandardCheckpointer().restore(back)
    for i in range(3):
        np.testing.assert_array_equal(got["params"][f"layers_{i}"]["w"],
                                      tree["params"][f"layers_{i}"]["w"])


def test_safetensors_dest_is_read_by_safe_open(tmp_path, capsys):
    safetensors = pytest.importorskip("safetensors")
    tree, src = _layers(tmp_path)
    dest = str(tmp_path / "model.safetensors")
    assert main(["convert", src, dest, "--map", "model.layers.*.weight=params.layers_*.w"]) == 0
    with safetensors.safe_open(dest, "numpy") as f:
        assert sorted(f.keys()) == [f"model.layers.{i}.weight" for i in range(3)]
        np.testing.assert_array_equal(f.get_tensor("model.layers.2.weight"),
                                      tree["params"]["layers_2"]["w"])


def test_kauldron_step(tmp_path, capsys):
    _, src = _layers(tmp_path)
    workdir = str(tmp_path / "run")
    assert main(["convert", src, workdir, "--format", "kauldron", "--dest-step", "7"]) == 0
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "ckpt_7", "default"))
    assert tg.KauldronCheckpoint(workdir).resolved_step == 7


def test_an_existing_dest_is_refused_in_one_line_naming_the_flag(tmp_path, capsys):
    _, src = _layers(tmp_path)
    dest = str(tmp_path / "out")
    assert main(["convert", src, dest]) == 0
    capsys.readouterr()
    assert main(["convert", src, dest]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and dest in err and "--overwrite" in err
    assert main(["convert", src, dest, "--overwrite"]) == 0


def test_a_failing_plan_is_one_line_and_exit_1(tmp_path, capsys):
    _, src = _layers(tmp_path)
    dest = str(tmp_path / "out")
    assert main(["convert", src, dest, "--map", "a=params.layers_9.w"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("treegraft convert:")
    assert not os.path.exists(dest)


@pytest.mark.parametrize(
    "args",
    [
        ["--max-host-memory", "1XB"],
        ["--max-host-memory", "0"],
        ["--format", "zip"],
        ["--map", "a=stack("],
    ],
)
def test_usage_errors_exit_2(tmp_path, capsys, args):
    _, src = _layers(tmp_path)
    with pytest.raises(SystemExit) as e:
        rc = main(["convert", src, str(tmp_path / "out"), *args])
        raise SystemExit(rc)
    assert e.value.code == 2
    assert not os.path.exists(tmp_path / "out")


def test_a_missing_source_exits_2(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sizes():
    assert parse_size("1GiB") == 2**30
    assert parse_size("64MiB") == 64 * 2**20
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("1000") == 1000
