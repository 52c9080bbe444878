"""The `treegraft` command through its real entry point, on real checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from kauldron_run import snapshot

import treegraft as tg

# The console script installed beside this interpreter, else the one on PATH.
_BESIDE = os.path.join(os.path.dirname(sys.executable), "treegraft")
EXE = _BESIDE if os.path.exists(_BESIDE) else shutil.which("treegraft") or ""


def run(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    """Runs the installed console script (the same entry point a user types)."""
    cmd = [EXE, *args] if EXE else [sys.executable, "-m", "treegraft._app.cli", *args]
    env = dict(os.environ, NO_COLOR="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Kauldron-layout run written by `treegraft demo --keep` (two steps)."""
    workdir = str(tmp_path_factory.mktemp("cli") / "run")
    result = run("demo", "--keep", workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir


def test_demo_grafts_and_verifies(demo_run: str) -> None:
    result = run("demo")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "The plan" in out and "'params.decoder.layers_*' <- 'params.encoder.layers_*'" in out
    assert "OK  29 grafted leaves equal their checkpoint arrays" in out
    assert "OK  25 other leaves are the very same objects as before" in out
    assert "FAIL" not in out


def test_demo_keep_refuses_a_non_empty_folder(tmp_path) -> None:
    (tmp_path / "x").write_text("mine")
    result = run("demo", "--keep", str(tmp_path))
    assert result.returncode == 2
    assert "is not empty" in result.stderr
    assert os.listdir(tmp_path) == ["x"]


def test_inspect_workdir_lists_steps_and_tree(demo_run: str) -> None:
    before = snapshot(demo_run)
    result = run("inspect", demo_run)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "steps: 1000, 2000 (showing 2000)" in out
    assert "ckpt_2000" in out
    assert "embedding  float32[32, 16]  2.0 KiB" in out
    assert "opt_state" in out and "count  int32[]" in out
    assert snapshot(demo_run) == before  # metadata only: nothing written


def test_inspect_step_depth_and_filter(demo_run: str) -> None:
    result = run("inspect", demo_run, "--step", "1000", "--depth", "1")
    assert result.returncode == 0, result.stderr
    assert "ckpt_1000" in result.stdout
    assert "params  13 leaves" in result.stdout and "…" in result.stdout
    assert "embedding" not in result.stdout  # folded below depth 1
    result = run("inspect", demo_run, "--filter", "params.encoder.**")
    lines = result.stdout.splitlines()
    assert any("encoder" in line for line in lines)
    assert not any("decoder" in line or "embed" in line for line in lines)


def test_inspect_json_matches_the_metadata(demo_run: str) -> None:
    result = run("inspect", demo_run, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    meta = tg.flatten(tg.KauldronCheckpoint(demo_run).metadata())
    assert data["steps"] == [1000, 2000] and data["step"] == 2000
    got = {row["path"]: (tuple(row["shape"]), row["dtype"]) for row in data["leaves"]}
    want = {
        str(p): (tuple(leaf.shape), getattr(leaf.dtype, "__name__", str(leaf.dtype)))
        for p, leaf in meta.items()
    }
    assert got == want
    assert data["total_bytes"] == sum(row["nbytes"] for row in data["leaves"])
    assert data["total_bytes"] == sum(
        int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        for leaf in meta.values()
        if not isinstance(leaf.dtype, type)
    )


def test_inspect_an_item_folder_and_a_step_folder(demo_run: str) -> None:
    step = os.path.join(demo_run, "checkpoints", "ckpt_1000")
    for path in (step, os.path.join(step, "default")):
        result = run("inspect", path, "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["steps"] is None
        assert len(json.loads(result.stdout)["leaves"]) == 42


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "/nonexistent/run"], "does not exist"),
        (["inspect", "{run}", "--step", "7"], "available steps: 1000, 2000"),
        (["inspect", "{run}/checkpoints"], "is not an orbax PyTree checkpoint"),
    ],
    ids=["missing", "no-such-step", "not-a-checkpoint"],
)
def test_inspect_unusable_input_exits_2(demo_run: str, args: list[str], message: str) -> None:
    result = run(*[a.format(run=demo_run) for a in args])
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_plan_that_would_succeed_exits_0(demo_run: str) -> None:
    target = os.path.join(demo_run, "checkpoints", "ckpt_1000")
    result = run("plan", demo_run, "--target", target, "--map", "params.decoder=params.encoder")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "the graft would succeed" in out
    assert "'params.decoder' <- 'params.encoder'  6       8.1 KiB" in out
    assert "params.decoder.layers_0.mlp.kernel       params.encoder.layers_0.mlp.kernel" in out


def test_plan_that_would_fail_exits_1_with_every_problem(demo_run: str) -> None:
    target = os.path.join(demo_run, "checkpoints", "ckpt_1000")
    result = run(
        "plan", demo_run, "--target", target,
        "--map", "params.decoder=params.encodr",
        "--map", "params.embd=params.embed",
    )
    assert result.returncode == 1
    out = result.stdout
    assert "the graft would fail" in out
    assert "2 problems" in out
    assert "did you mean 'encoder'" in out and "did you mean 'embed'" in out


def test_plan_ignore_and_non_strict(demo_run: str) -> None:
    target = os.path.join(demo_run, "checkpoints", "ckpt_1000")
    # The checkpoint's params have more than the decoder: unexpected unless ignored.
    base = ["plan", demo_run, "--target", target, "--map", "params.decoder=params"]
    failing = run(*base)
    assert failing.returncode == 1
    assert "unexpected in the source" in failing.stdout
    assert "ignore_restored_keys" in failing.stdout
    report = run(*base, "--non-strict", "--json")
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    assert data["ok"] is True
    assert {p["kind"] for p in data["report"]} >= {"missing", "unexpected"}


def test_plan_json_lists_entries(demo_run: str) -> None:
    target = os.path.join(demo_run, "checkpoints", "ckpt_1000")
    result = run("plan", demo_run, "--target", target, "--map", "params.embed=params.embed",
                 "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["entries"] == [
        {
            "target": "params.embed.embedding",
            "source": "params.embed.embedding",
            "rule": "'params.embed' <- 'params.embed'",
            "shape": [32, 16],
            "dtype": "float32",
            "nbytes": 2048,
        }
    ]
    assert data["bytes"] == 2048 and data["unused"] == 41
    failing = run("plan", demo_run, "--target", target, "--map", "params.embed=params.x",
                  "--json")
    assert failing.returncode == 1
    data = json.loads(failing.stdout)
    assert data["ok"] is False and data["problems"][0]["kind"] == "missing"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--map", "params.decoder"], "--map takes NEW=OLD"),
        (["--map", "params..x=params"], "invalid mapping"),
        (["--map", "a=b", "--ignore-model-keys", "a[b]"], "invalid --ignore-model-keys"),
    ],
    ids=["no-equals", "path-syntax", "ignore-syntax"],
)
def test_plan_usage_errors_exit_2(demo_run: str, extra: list[str], message: str) -> None:
    target = os.path.join(demo_run, "checkpoints", "ckpt_1000")
    result = run("plan", demo_run, "--target", target, *extra)
    assert result.returncode == 2
    assert message in result.stderr


def test_usage_errors_from_argparse_exit_2() -> None:
    assert run().returncode == 2
    result = run("plan", "/x")
    assert result.returncode == 2 and "--target" in result.stderr


def test_the_console_script_is_installed() -> None:
    assert EXE, "the treegraft console script is not installed (pip install the package)"


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == tg.__version__


def test_inspect_and_plan_read_shapes_in_one_batch(tmp_path, monkeypatch, capsys):
    # Run in process, with single array opens forbidden: every shape they show
    # or check must come from a batch read.
    import numpy as np
    from kauldron_run import write_item

    from treegraft._app import cli as _cli
    from treegraft._formats.orbax import metadata

    item = write_item(tmp_path / "item", {"w": {f"k{i:02d}": np.zeros(i + 1) for i in range(40)}})

    def forbidden(self, name):
        raise AssertionError(f"single array open of {name}")

    monkeypatch.setattr(metadata.OrbaxStore, "header", forbidden)
    assert _cli.main(["inspect", item, "--plain"]) == 0
    assert "float64[40]" in capsys.readouterr().out
    assert _cli.main(["plan", item, "--target", item, "--map", "w=w", "--plain"]) == 0


# ----------------------------------------------------------------------------
# Reliability, round 2 (item 20).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, extra, message",
    [
        ("/nonexistent/run", [], "treegraft plan: checkpoint '/nonexistent/run' does not exist"),
        ("{run}", ["--step", "7"], "has no complete step 7; available steps: 1000, 2000"),
    ],
    ids=["missing-source", "missing-step"],
)
def test_plan_with_an_unusable_source_exits_2(demo_run, source, extra, message):
    target = os.path.join(demo_run, "checkpoints", "ckpt_1000")
    result = run("plan", source.format(run=demo_run), "--target", target, *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "the graft would fail" not in result.stdout


@pytest.mark.parametrize(
    "args, flag",
    [
        (["inspect", "{step}", "--step", "1000"], "--step 1000"),
        (["plan", "{step}", "--step", "1000", "--target", "{step}"], "--step 1000"),
        (["plan", "{run}", "--target", "{step}", "--target-step", "-1"], "--target-step -1"),
    ],
    ids=["inspect", "plan-source", "plan-target"],
)
def test_a_step_for_a_plain_orbax_checkpoint_is_refused(demo_run, args, flag):
    step = os.path.join(demo_run, "checkpoints", "ckpt_2000")
    result = run(*[a.format(run=demo_run, step=step) for a in args])
    assert result.returncode == 2
    assert (
        f"{flag}: {step!r} is not a Kauldron workdir (it has no checkpoints/ folder), so it "
        "has no steps to choose from" in result.stderr
    )


def test_inspect_filter_that_matches_nothing_suggests_and_exits_1(demo_run):
    result = run("inspect", demo_run, "--filter", "params.encodr.**")
    assert result.returncode == 1
    assert result.stderr.startswith(
        "treegraft inspect: --filter 'params.encodr.**' matches no leaf of the checkpoint "
    )
    assert "(did you mean 'params.encoder'" in result.stderr
    assert result.stdout == ""


def test_a_tilde_in_paths_is_expanded(demo_run):
    home = os.path.dirname(demo_run)
    name = os.path.basename(demo_run)
    env = dict(os.environ, NO_COLOR="1", HOME=home)
    cmd = [EXE] if EXE else [sys.executable, "-m", "treegraft._app.cli"]
    result = subprocess.run(
        [*cmd, "plan", f"~/{name}", "--target", f"~/{name}/checkpoints/ckpt_1000",
         "--map", "params.embed=params.embed"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert f"from the checkpoint {demo_run}/checkpoints/ckpt_2000" in result.stdout
    assert not os.path.exists("~")


def _hf_weights(folder) -> str:
    """A Hugging Face style folder: one .safetensors shard and its index."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    os.makedirs(folder, exist_ok=True)
    tensors = {
        "model.layers.0.mlp.up_proj.weight": np.ones((4, 3), np.float32),
        "model.layers.1.mlp.up_proj.weight": np.ones((4, 3), np.float32),
        "model.norm.weight": np.ones(3, np.float32),
    }
    safetensors_numpy.save_file(tensors, os.path.join(folder, "model-00001-of-00001.safetensors"))
    index = {"weight_map": {name: "model-00001-of-00001.safetensors" for name in tensors}}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return str(folder)


def test_inspect_and_plan_take_safetensors_weights(tmp_path) -> None:
    folder = _hf_weights(tmp_path / "llama")
    before = snapshot(str(tmp_path))
    result = run("inspect", folder, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["path"]: row for row in json.loads(result.stdout)["leaves"]}
    assert rows["model.layers[1].mlp.up_proj.weight"]["shape"] == [4, 3]
    shard = os.path.join(folder, "model-00001-of-00001.safetensors")
    result = run("plan", shard, "--target", folder, "--map", "model.layers[0]=model.layers[1]")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the graft would succeed" in result.stdout
    result = run("plan", folder, "--target", folder, "--map", "model.layrs=model.layers")
    assert result.returncode == 1
    assert "'model' has no key 'layrs' (did you mean 'layers'?)" in result.stdout
    assert snapshot(str(tmp_path)) == before  # nothing written beside the weights


@pytest.mark.parametrize("kind", ["gcs", "s3"])
def test_inspect_and_plan_a_remote_workdir(demo_run: str, kind: str, request) -> None:
    import servers

    storage = servers.Storage(kind, "treegraft", request.getfixturevalue(f"{kind}_server"))
    url = storage.publish(demo_run)
    result = run("inspect", url, "--depth", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "steps: 1000, 2000" in result.stdout
    result = run("plan", url, "--target", url, "--map", "params.decoder=params.encodr")
    assert result.returncode == 1
    assert f"{url}/checkpoints/ckpt_2000" in result.stdout
    assert "did you mean 'encoder'" in result.stdout


def test_plan_shows_rule_operations_of_every_entry(tmp_path) -> None:
    from kauldron_run import write_item

    layers = {f"layers_{i}": {"w": np.full((2, 3), i, np.float32)} for i in range(4)}
    source = write_item(tmp_path / "unscanned", {"params": layers, "head": np.zeros(5, np.float32)})
    target = write_item(tmp_path / "scanned", {"params": {"layers": {"w": np.zeros((4, 3, 2),
                                                                            np.float32)}},
                                                "head": np.zeros(7, np.float32)})
    result = run("plan", source, "--target", target,
                 "--map", "params.layers=transpose(stack(params.layers_*, axis=0), 0, 2, 1)",
                 "--map", "head=None")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "'params.layers' <- transpose(stack('params.layers_*', axis=0), (0, 2, 1))" in out
    assert "stack 4 along axis 0; transpose (0, 2, 1)" in out
    assert "'head' <- None (keep)" in out
    result = run("plan", source, "--target", target, "--map", "params.layers=stack(params.layers_*")
    assert result.returncode == 2
    assert "stack(...) is missing its closing ')'" in result.stdout + result.stderr
