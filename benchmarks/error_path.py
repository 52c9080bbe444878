"""Case error_path: how long a plan with a mistake takes to report it, beside the same plan without.

    python benchmarks/error_path.py            # full sizes, 5 repeats
    python benchmarks/error_path.py --quick    # small sizes, 1 repeat (a smoke test)
    python benchmarks/error_path.py --cap 120  # give up on a failing plan after 120 s

Each case is one plan twice: with the mistake (it raises a GraftError) and
without (it plans), on metadata only (`jax.ShapeDtypeStruct` leaves: no array
bytes). The two alternate inside each repeat; the medians are reported with
their ratio, the size of the message, and the aim (issue round 3, item 19): a
failing plan reports within 2x the successful one plus 0.5 s (plus 0.25 s for
the typo against a node of 100k keys; under 0.8 s in all for 50 unmatched
ignore patterns).

Cases:
  moe       a Qwen-3-30B-A3B-sized source (48 layers x 128 experts x 3
            projections, attention and norms: 18,867 tensors) into a state
            stacked over experts with tg.stack; the mistake: one stack pattern
            mistyped (`up_prj`), so every layer misses its source.
  flat3     a flat source of 30,000 keys (`model.layers.0.block_0.weight`);
            3 rules name a key mistyped (`wieght`).
  flat110   the same with 110-character keys and 1 mistyped rule.
  ignores   50 ignore_model_keys patterns that match nothing, over 10,000
            leaves (the plan without them is the baseline).
  node100k  one rule naming a key of a node of 100,000 keys, mistyped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import treegraft as tg

try:
    from treegraft._errors import _names_of
except ImportError:  # before round 3: no index of names to forget
    _names_of = None  # type: ignore[assignment]

SDS = jax.ShapeDtypeStruct


def _leaf(*shape: int) -> Any:
    return SDS(shape, jnp.bfloat16)


def moe(layers: int, experts: int) -> dict:
    """Hugging Face Qwen-3-MoE names into a state stacked over experts, one stack typo."""
    def layer() -> dict:
        attn = {f"{k}_proj": {"weight": _leaf(8, 8)} for k in "qkvo"}
        attn |= {"q_norm": {"weight": _leaf(8)}, "k_norm": {"weight": _leaf(8)}}
        projections = ("gate_proj", "up_proj", "down_proj")
        return {
            "self_attn": attn,
            "input_layernorm": {"weight": _leaf(8)},
            "post_attention_layernorm": {"weight": _leaf(8)},
            "mlp": {
                "gate": {"weight": _leaf(experts, 8)},
                "experts": [{p: {"weight": _leaf(4, 8)} for p in projections}
                            for _ in range(experts)],
            },
        }

    source = {
        "model": {"embed_tokens": {"weight": _leaf(16, 8)}, "norm": {"weight": _leaf(8)},
                  "layers": [layer() for _ in range(layers)]},
        "lm_head": {"weight": _leaf(16, 8)},
    }
    state = {
        "embed": _leaf(16, 8), "final_norm": _leaf(8), "head": _leaf(16, 8),
        "layers": [
            {"attn": {k: _leaf(8, 8) for k in "qkvo"} | {"q_norm": _leaf(8), "k_norm": _leaf(8)},
             "pre_norm": _leaf(8), "post_norm": _leaf(8), "router": _leaf(experts, 8),
             "experts": {p: _leaf(experts, 4, 8) for p in ("gate", "up", "down")}}
            for _ in range(layers)
        ],
    }
    good: dict[str, Any] = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
                            "head": "lm_head.weight"}
    for k in "qkvo":
        good[f"layers.*.attn.{k}"] = f"model.layers.*.self_attn.{k}_proj.weight"
    for k in ("q_norm", "k_norm"):
        good[f"layers.*.attn.{k}"] = f"model.layers.*.self_attn.{k}.weight"
    good["layers.*.pre_norm"] = "model.layers.*.input_layernorm.weight"
    good["layers.*.post_norm"] = "model.layers.*.post_attention_layernorm.weight"
    good["layers.*.router"] = "model.layers.*.mlp.gate.weight"
    for p in ("gate", "up", "down"):
        good[f"layers.*.experts.{p}"] = tg.stack(f"model.layers.*.mlp.experts.*.{p}_proj.weight")
    bad = dict(good)
    bad["layers.*.experts.up"] = tg.stack("model.layers.*.mlp.experts.*.up_prj.weight")
    return {"state": state, "source": source, "good": good, "bad": bad}


def _flat_keys(n: int, width: int) -> list[str]:
    pad = "x" * max(0, width - len("model..layers.0.block_00.weight")) + "." if width else ""
    return [f"model.{pad}layers.{i // 100}.block_{i % 100:02d}.weight" for i in range(n)]


def flat(n: int, typos: int, width: int = 0) -> dict:
    """A flat source of n keys; `typos` rules name one of them with 'weight' mistyped."""
    keys = _flat_keys(n, width)
    leaf = _leaf(2)
    source = {k: leaf for k in keys}
    state = {"w": dict(source)}
    picked = keys[:: max(1, n // max(typos, 1))][:typos]
    good = {"w": ""} | {f"w[{k!r}]": f"[{k!r}]" for k in picked}
    bad = {"w": ""} | {f"w[{k!r}]": f"[{k.replace('weight', 'wieght')!r}]" for k in picked}
    return {"state": state, "source": source, "good": good, "bad": bad}


def ignores(k: int, leaves: int) -> dict:
    """k ignore patterns matching nothing over `leaves` leaves; the baseline has none."""
    state = {"a": {f"l{i}": {"w": _leaf(1)} for i in range(leaves)}}
    return {"state": state, "source": state, "good": {"a": "a"}, "bad": {"a": "a"},
            "bad_opts": {"ignore_model_keys": [f"nomatch_{j}" for j in range(k)]}}


def node(n: int) -> dict:
    """One rule naming a key of a node of n keys; the mistake: that key mistyped."""
    keys = _flat_keys(n, 0)
    source = {k: _leaf(2) for k in keys}
    key = keys[n // 2]
    return {"state": {"w": _leaf(2)}, "source": source, "good": {"w": f"[{key!r}]"},
            "bad": {"w": f"[{key.replace('block', 'blok')!r}]"}}


CASES: dict[str, tuple[str, Callable[..., dict], tuple, tuple, float, float | None]] = {
    # id: (title, builder, full args, quick args, slack in s, absolute limit in s)
    "moe": ("MoE, 18,867 tensors, one stack pattern mistyped", moe, (48, 128), (4, 4), 0.5, None),
    "flat3": ("flat source of 30,000 keys, 3 rules mistyped", flat, (30000, 3), (300, 3), 0.5,
              None),
    "flat110": ("flat source of 30,000 110-character keys, 1 rule mistyped", flat,
                (30000, 1, 110), (300, 1, 110), 0.5, None),
    "ignores": ("50 unmatched ignore patterns over 10,000 leaves", ignores, (50, 10000),
                (5, 100), 0.5, 0.8),
    "node100k": ("one rule mistyped against a node of 100,000 keys", node, (100000,), (1000,),
                 0.25, None),
}


class _Capped(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Capped


def _time(case: dict, which: str, cap: float) -> tuple[float, int | None]:
    """Seconds one plan takes, and the length of its error message (None: it planned)."""
    opts = case.get(f"{which}_opts", {})
    if _names_of is not None:
        _names_of.cache_clear()  # each run builds its own index of names, as a first run does
    gc.collect()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, cap)
    start = time.perf_counter()
    try:
        tg.plan(case["state"], case["source"], case[which], **opts)
        size = None
    except tg.GraftError as e:
        size = len(str(e))
    except _Capped:
        return float("inf"), -1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return time.perf_counter() - start, size


def measure(mode: str, repeats: int, cap: float, only: list[str]) -> list[dict]:
    rows = []
    for cid, (title, make, full, quick, slack, limit) in CASES.items():
        if only and cid not in only:
            continue
        case = make(*(quick if mode == "quick" else full))
        good_t, bad_t, size = [], [], None
        for _ in range(repeats):
            t, s = _time(case, "good", cap)
            assert s is None, f"{cid}: the plan without the mistake failed"
            good_t.append(t)
            t, size = _time(case, "bad", cap)
            assert size is not None, f"{cid}: the plan with the mistake planned"
            bad_t.append(t)
            if size == -1:
                break  # over the cap: once is enough
        good, bad = statistics.median(good_t), statistics.median(bad_t)
        allowed = 2 * good + slack
        if limit is not None:
            allowed = min(allowed, limit)
        rows.append({
            "id": cid, "title": title, "point": quick if mode == "quick" else full,
            "good_s": good, "bad_s": bad, "good_runs": good_t, "bad_runs": bad_t,
            "message_chars": size, "allowed_s": allowed, "met": bad <= allowed,
        })
        print(f"  {cid}: with the mistake {bad:.3f} s, without {good:.3f} s", file=sys.stderr,
              flush=True)
    return rows


def report(rows: list[dict], mode: str) -> str:
    lines = ["case       without   with the mistake  ratio   message  aim (with <=)  met?"]
    for r in rows:
        bad = "> cap" if r["bad_s"] == float("inf") else f"{r['bad_s']:.3f} s"
        ratio = r["bad_s"] / r["good_s"] if r["good_s"] else float("nan")
        met = "n/a" if mode == "quick" else ("met" if r["met"] else "MISSED")
        lines.append(
            f"{r['id']:<10} {r['good_s']:>7.3f} s {bad:>16} {ratio:>7.1f}x "
            f"{r['message_chars'] or 0:>7}  {r['allowed_s']:>9.2f} s    {met}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--cap", type=float, default=120.0,
                        help="seconds after which a failing plan is given up (reported '> cap')")
    parser.add_argument("--cases", default="", help=f"comma-separated subset of {','.join(CASES)}")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    repeats = args.repeats or (1 if args.quick else 5)
    only = [c for c in args.cases.split(",") if c]
    rows = measure(mode, repeats, args.cap, only)
    text = report(rows, mode)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": mode, "repeats": repeats, "load": os.getloadavg(),
                       "rows": rows, "report": text}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
