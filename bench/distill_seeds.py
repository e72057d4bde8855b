"""Distillation on several seeds, by the loop's own protocol: a finished `iro loop` run is copied once
per seed and each copy is resumed with `--distill` (the distillation seed set, the policies named
`<value>-[<tag>]seed<S>-<method>`), so every seed trains on the same final guided rollouts and is evaluated
on the same held-out prompts and sampling seeds as the run's base and IRO-T rows.

    iro serve --values-dir VALUES --policies-dir POLICIES &
    iro loop --task review-sentiment --preset full --iterations 3 --name rs --run-dir runs/rs ...
    python -m bench.distill_seeds --run runs/rs --seeds 0,1,2 --methods apa,is-dpo \
        --values-dir VALUES --policies-dir POLICIES --out bench/results/distill-seeds

With `--distill-from base` (the base model's samples) or `--distill-from mode=pf,k=16,...` (the final
policy's own rollouts with that search), the loop's `distill_from`: the first seed's copy collects
them, the others get a copy (`share_data`), so every seed learns from the same rollouts.

Per seed and method: the held-out reward with its 95% CI, its share of IRO-T's gain over base, its
distinct-2 against base's, its KL to base, and the checkpoint the KL budget and selection published
(trainer/distill_checkpoints.py); whether it lands inside the bounds (`--min-share`, `--max-drop`).
Writes seeds.json, seeds.md and a plot (share of the gain vs distinct-2 change, the bounds drawn) into
--out. The copies (`RUN-seed<S>`) resume: a killed sweep is simply started again.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any


def seed_run(run: Path, seed: int, tag: str = "") -> Path:
    """The copy of `run` that seed `seed` distils in (made once, without any distillation of `run`'s)."""
    dest = run.parent / f"{run.name}-{tag}seed{seed}"
    if dest.exists():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(run, partial, ignore=shutil.ignore_patterns("distilled-*", "report.md", "*.png"))
    state_path = partial / "state.json"
    state = json.loads(state_path.read_text())
    state["stages"] = {k: v for k, v in state["stages"].items() if not k.startswith("distill/")}
    state_path.write_text(json.dumps(state, indent=1))
    partial.rename(dest)
    return dest


def share_data(run: Path, dest: Path, source: str | dict[str, Any]) -> Path | None:
    """Give the seed copy `dest` the distillation rollouts (`distill_from` = `source`) that another
    copy of `run` collected already, so every seed learns from the same rollouts, collected once.
    Returns the copy they came from (None: `dest` has them already, or no copy has)."""
    from trainer.loop_config import LoopConfig
    from trainer.loop_distill import DISTILL_DATA, DISTILL_DATA_STAGES

    wanted = LoopConfig(distill_from=source).distill_source()
    keys = DISTILL_DATA_STAGES

    def finished(state: dict[str, Any]) -> bool:
        stages = state["stages"]
        return all(k in stages for k in keys) and stages[keys[0]].get("source") == wanted

    dest_state = json.loads((dest / "state.json").read_text())
    if finished(dest_state):
        return None
    for copy in sorted(run.parent.glob(f"{run.name}-*seed*")):
        if copy == dest or not (copy / "state.json").exists():
            continue
        state = json.loads((copy / "state.json").read_text())
        if state.get("run_id") != dest_state.get("run_id") or not finished(state):
            continue
        shutil.rmtree(dest / DISTILL_DATA, ignore_errors=True)
        shutil.copytree(copy / DISTILL_DATA, dest / DISTILL_DATA)
        dest_state["stages"].update({k: state["stages"][k] for k in keys})
        (dest / "state.json").write_text(json.dumps(dest_state, indent=1))
        return copy
    return None


def seed_config(run: Path, seed: int, methods: list[str], options: dict[str, Any], preset: str, tag: str = "",
                distill_from: str | dict[str, Any] = "last"):
    """The run's own config with distillation: `preset`, `options` and the seed over it, learning from
    `distill_from`."""
    from trainer.loop_config import LoopConfig
    from trainer.tasks import load_task

    config = json.loads((run / "state.json").read_text())["config"]
    name = config.get("name") or load_task(config["task"]).name  # the value's name, as IroLoop resolves it
    return LoopConfig.model_validate({**config, "distill": methods, "distill_preset": preset,
                                      "distill_options": {**options, "seed": seed},
                                      "distill_name": f"{name}-{tag}seed{seed}",
                                      "distill_from": distill_from})


def row(loop, method: str, seed: int, iro, base, *, min_share: float, max_drop: float) -> dict[str, Any]:
    """One seed's distilled policy of `method` against base and IRO-T (the loop's rows), with the
    checkpoint its selection published."""
    from trainer.eval_results import MethodResult

    result = MethodResult.from_dict(loop.state.stage(f"distill/{method}/eval")["result"])
    trained = loop.state.stage(f"distill/{method}/train")
    metrics = loop.policies.manifest(trained["policy"], trained["version"]).metrics
    selection = metrics.get("selection") or {}
    share = (result.mean - base.mean) / (iro.mean - base.mean) if iro.mean > base.mean else None
    drop = result.distinct2 / base.distinct2 - 1
    return {"method": method, "seed": seed, "policy": f"{trained['policy']}@{trained['version']}",
            "reward": result.mean, "ci": [result.ci_low, result.ci_high], "share_of_gain": share,
            "distinct2": result.distinct2, "distinct2_vs_base": drop, "kl_to_base": result.kl_to_base,
            "tokens_per_prompt": result.tokens_per_prompt, "distill_seconds": trained.get("distill_seconds"),
            "checkpoint": selection.get("chosen_step"), "eligible_at_distillation": selection.get("eligible"),
            "checkpoints": len(selection.get("checkpoints") or []), "why": selection.get("why"),
            "inside": share is not None and share >= min_share and drop >= -max_drop}


def table(rows: list[dict[str, Any]], iro, base, *, min_share: float, max_drop: float) -> str:
    lines = [f"Base {base.mean:+.3f} (distinct-2 {base.distinct2:.3f}); {iro.label} {iro.mean:+.3f} at "
             f"{iro.tokens_per_prompt:.0f} tokens/prompt: its gain is {iro.mean - base.mean:+.3f}, so "
             f"{min_share:.0%} of it is {base.mean + min_share * (iro.mean - base.mean):+.3f}. Bounds: share >= "
             f"{min_share:.0%}, distinct-2 at most {max_drop:.0%} below base's.", "",
             "| method | seed | reward [95% CI] | share of the gain | distinct-2 (vs base) | KL to base | "
             "checkpoint (step, of) | distillation s | inside the bounds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = "-" if r["share_of_gain"] is None else f"{r['share_of_gain']:.0%}"
        kl = "-" if r["kl_to_base"] is None else f"{r['kl_to_base']:.3f}"
        secs = "-" if r["distill_seconds"] is None else f"{r['distill_seconds']:.0f}"
        lines.append(f"| {r['method']} | {r['seed']} | {r['reward']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | "
                     f"{share} | {r['distinct2']:.3f} ({r['distinct2_vs_base']:+.1%}) | {kl} | "
                     f"{r['checkpoint']}, {r['checkpoints']} | {secs} | {'yes' if r['inside'] else '**no**'} |")
    inside = sum(r["inside"] for r in rows)
    lines += ["", f"{inside} of {len(rows)} runs inside both bounds."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, *, min_share: float, max_drop: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, marker in zip(sorted({r["method"] for r in rows}), "osD^"):
        mine = [r for r in rows if r["method"] == method and r["share_of_gain"] is not None]
        ax.scatter([100 * r["distinct2_vs_base"] for r in mine], [100 * r["share_of_gain"] for r in mine],
                   marker=marker, label=method)
        for r in mine:
            ax.annotate(f"seed {r['seed']}", (100 * r["distinct2_vs_base"], 100 * r["share_of_gain"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.axhline(100 * min_share, color="grey", ls="--", lw=1)
    ax.axvline(-100 * max_drop, color="grey", ls="--", lw=1)
    ax.set_xlabel("distinct-2 vs base (%)")
    ax.set_ylabel("share of IRO's gain over base (%)")
    ax.set_title("Distilled policies per seed (inside the bounds: upper right)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="A finished `iro loop` run directory.")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="apa,is-dpo")
    parser.add_argument("--preset", default="full", help="Distillation preset (trainer/presets/distill).")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="A distillation option KEY=VALUE over the preset (repeatable; apa.lam=... for one method).")
    parser.add_argument("--tag", default="", help="Names the copies RUN-<tag>seed<S> and the policies "
                        "<value>-<tag>seed<S>-<method>: another sweep of the same run (other --set options).")
    parser.add_argument("--distill-from", default="last", help="What to distil from: last (iteration T's training "
                        "rollouts), base (the base model's samples), or a search of the final policy as KEY=VALUE "
                        "pairs joined by commas (e.g. mode=pf,k=16,l=8): collected once, in the first seed's "
                        "copy, and shared by the others.")
    parser.add_argument("--server", default=None)
    parser.add_argument("--admin-key", default=None)
    parser.add_argument("--values-dir", type=Path, required=True)
    parser.add_argument("--policies-dir", type=Path, required=True)
    parser.add_argument("--min-share", type=float, default=0.70)
    parser.add_argument("--max-drop", type=float, default=0.10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from trainer.loop import IroLoop
    from trainer.rollout_config import DEFAULT_SERVER
    from trainer.options import nest, parse_override

    options = nest(dict(parse_override(o) for o in args.overrides))
    methods = [m for m in args.methods.split(",") if m]
    bounds = {"min_share": args.min_share, "max_drop": args.max_drop}
    source = (args.distill_from if args.distill_from in ("last", "base")
              else dict(parse_override(kv) for kv in args.distill_from.split(",") if kv))
    rows, iro, base = [], None, None
    for seed in (int(s) for s in args.seeds.split(",")):
        run = seed_run(args.run, seed, args.tag)
        if source != "last" and (shared := share_data(args.run, run, source)) is not None:
            print(f"seed {seed}: the distillation rollouts of {shared}", flush=True)
        loop = IroLoop(seed_config(args.run, seed, methods, options, args.preset, args.tag, source), run_dir=run,
                       values_dir=args.values_dir, server=args.server or DEFAULT_SERVER, admin_key=args.admin_key,
                       policies_dir=args.policies_dir)
        print(f"seed {seed}: {loop.run()}", flush=True)
        iros, baselines = loop.results()
        iro, base = iros[-1], next(r for r in baselines if r.kind == "base")
        rows += [row(loop, m, seed, iro, base, **bounds) for m in methods]
    rows.sort(key=lambda r: (r["method"], r["seed"]))
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.distill_seeds " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "seeds.json").write_text(json.dumps({"command": command, "run": str(args.run), **bounds,
                                                      "base": base.to_dict(), "iro": iro.to_dict(), "rows": rows},
                                                     indent=1))
    text = table(rows, iro, base, **bounds)
    (args.out / "seeds.md").write_text(f"`{command}`\n\n{text}")
    plot(rows, args.out / "seeds.png", **bounds)
    print(text)


if __name__ == "__main__":
    main()
