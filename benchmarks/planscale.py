"""Case 7 (planscale): planning time as rules and leaves grow, success and failure paths.

    python benchmarks/planscale.py            # full sizes, 5 repeats
    python benchmarks/planscale.py --quick    # small sizes, 1 repeat (a smoke test)

Each point times `tg.plan` (median of the repeats) beside the floor a user pays
anyway: one `jax.tree_util.tree_flatten_with_path` and one `tree_unflatten` of
the same state. Points of one curve alternate with their floor inside each
repeat. Reported per curve: the times, the ratio to the floor, and the growth
exponent between the smallest and largest point (1.0 is linear; 2.0 quadratic).
Aims (issue #12, item 8): no worse than O((rules + leaves) log); the largest
point of each curve under 2 s on this machine.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import treegraft as tg

_LEAF = np.zeros(1, np.float32)
_WIDE = np.zeros(2, np.float32)


def literal_rules(n: int) -> tuple[Any, Any, dict, dict]:
    """One literal rule per leaf: n rules over n leaves."""
    state = {"a": {f"l{i}": {"w": _LEAF} for i in range(n)}}
    return state, state, {f"a.l{i}": f"a.l{i}" for i in range(n)}, {}


def glob_rules(rules: int, leaves: int) -> tuple[Any, Any, dict, dict]:
    """`rules` glob rules, each over its own subtree of leaves / rules layers."""
    per = leaves // rules
    state = {f"m{r}": {f"layers_{i}": {"w": _LEAF} for i in range(per)} for r in range(rules)}
    return state, state, {f"m{r}.layers_*": f"m{r}.layers_*" for r in range(rules)}, {}


def failure_path(n: int) -> tuple[Any, Any, dict, dict]:
    """n shape mismatches, each beside an unexpected source leaf: the error path."""
    state = {"dec": {f"l{i}": {"w": _LEAF} for i in range(n)}}
    source = {"enc": {f"l{i}": {"w": _WIDE, "extra": _LEAF} for i in range(n)}}
    return state, source, {"dec": "enc"}, {}


def unmatched_ignores(k: int, leaves: int = 20000) -> tuple[Any, Any, dict, dict]:
    """k ignore patterns that match nothing, over `leaves` leaves: the error path."""
    state = {"a": {f"l{i}": {"w": _LEAF} for i in range(leaves)}}
    return state, state, {"a": "a"}, {"ignore_model_keys": [f"nomatch_{j}" for j in range(k)]}


SIZES = {
    "full": {
        "literal rules (n rules over n leaves)": (literal_rules, [(2500,), (5000,), (10000,)]),
        "glob rules (r rules over 100 r leaves)": (
            glob_rules, [(500, 50000), (1000, 100000), (2000, 200000)]
        ),
        "failure path (n mismatches + n unexpected)": (failure_path, [(2000,), (4000,), (8000,)]),
        "unmatched ignore patterns (k over 20,000 leaves)": (
            unmatched_ignores, [(1,), (4,), (16,)]
        ),
    },
    "quick": {
        "literal rules (n rules over n leaves)": (literal_rules, [(250,), (500,)]),
        "glob rules (r rules over 100 r leaves)": (glob_rules, [(50, 5000), (100, 10000)]),
        "failure path (n mismatches + n unexpected)": (failure_path, [(200,), (400,)]),
        "unmatched ignore patterns (k over 20,000 leaves)": (unmatched_ignores, [(1,), (2,)]),
    },
}


def _time(fn: Callable[[], Any]) -> float:
    gc.collect()
    start = time.perf_counter()
    try:
        fn()
    except tg.GraftError:
        pass  # the failure paths raise; their time is what is measured
    return time.perf_counter() - start


def _floor(state: Any) -> None:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    jax.tree_util.tree_unflatten(treedef, [x for _, x in leaves])


def measure(mode: str, repeats: int) -> list[dict]:
    curves = []
    for title, (make, points) in SIZES[mode].items():
        rows = []
        for args in points:
            state, source, mapping, opts = make(*args)
            n_leaves = len(jax.tree_util.tree_leaves(state))
            plan_t, floor_t = [], []
            for _ in range(repeats):
                plan_t.append(_time(functools.partial(tg.plan, state, source, mapping, **opts)))
                floor_t.append(_time(functools.partial(_floor, state)))
            rows.append(
                {
                    "point": args,
                    "rules": len(mapping) + len(opts.get("ignore_model_keys", ())),
                    "leaves": n_leaves,
                    "plan_s": statistics.median(plan_t),
                    "plan_runs": plan_t,
                    "floor_s": statistics.median(floor_t),
                }
            )
            print(
                f"  {title}: {args} -> plan {rows[-1]['plan_s']:.3f} s, "
                f"floor {rows[-1]['floor_s']:.3f} s",
                file=sys.stderr,
                flush=True,
            )
        first, last = rows[0], rows[-1]
        # Growth in the quantity the curve varies (its first argument).
        growth = math.log(last["plan_s"] / first["plan_s"]) / math.log(
            last["point"][0] / first["point"][0]
        )
        curves.append(
            {
                "title": title,
                "rows": rows,
                "growth": growth,
                "aims": [
                    {"aim": "growth exponent <= 1.2 (linear: 1.0, quadratic: 2.0)",
                     "measured": f"{growth:.2f}", "met": growth <= 1.2},
                    {"aim": "largest point < 2 s", "measured": f"{last['plan_s']:.2f} s",
                     "met": last["plan_s"] < 2.0},
                ],
            }
        )
    return curves


def report(curves: list[dict]) -> str:
    lines = []
    for curve in curves:
        lines.append(f"{curve['title']}")
        lines.append("  point              rules    leaves   plan      floor     plan/floor")
        for r in curve["rows"]:
            lines.append(
                f"  {str(r['point']):<18} {r['rules']:<8} {r['leaves']:<8} "
                f"{r['plan_s']:>7.3f} s {r['floor_s']:>7.3f} s {r['plan_s'] / r['floor_s']:>8.1f}x"
            )
        for a in curve["aims"]:
            lines.append(f"  aim: {a['aim']}: {a['measured']} ({'met' if a['met'] else 'MISSED'})")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    repeats = args.repeats or (1 if args.quick else 5)
    curves = measure(mode, repeats)
    text = report(curves)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": mode, "repeats": repeats, "load": os.getloadavg(),
                       "curves": curves, "report": text}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
