"""The text ``bifrost demo`` writes: the summary (``WORKDIR/demo/summary.txt``, also printed) and the per-row notes of
its grid, from the report ``bifrost_jax.demo`` builds."""
from __future__ import annotations

import os


def accuracy_words(acc: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in acc.items())


def understanding_notes(und: dict, rows: int) -> list[str]:
    """One line per grid row: the colour and shape questions about its image and the answer (after = before)."""
    notes = []
    for i in range(rows):
        qa = [f"{e['question']} -> {e['answer_after']!r}" for e in und["examples"]
              if e["image"] == i and e["kind"] in ("color", "shape")]
        notes.append("; ".join(qa))
    return notes


def format_understanding(und: dict) -> list[str]:
    lines = [f"understanding: questions about {und['num_images']} held-out images (unseen colour-shape pairs), "
             f"greedy answers, exact match (accuracy / chance):"]
    kinds = list(und["before"]["accuracy"])
    lines.append(f"  {'':<15}" + "".join(f"{k:>10}" for k in kinds))
    chance = und["before"]["chance"]
    lines.append(f"  {'chance':<15}" + "".join(f"{chance[k]:>10.3f}" if k in chance else f"{'-':>10}"
                                              for k in kinds))
    for name in ("before", "after"):
        acc = und[name]["accuracy"]
        lines.append(f"  {name:<15}" + "".join(f"{acc[k]:>10.3f}" for k in kinds))
    lines.append(f"  before = the understanding phase's model; after = the mllm phase's MLLM (its frozen base) after "
                 f"the generation branch trained:")
    lines.append(f"  {und['answers_identical']}/{und['answers']} answers and "
                 f"{und['weights'] - len(und['weights_differing'])}/{und['weights']} weights bit-identical"
                 + ("" if und["identical"] else "  <-- NOT IDENTICAL"))
    for e in und["examples"][:6]:
        lines.append(f"  image {e['image']}: {e['question']} -> {e['answer_after']!r} (truth {e['truth']!r})")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# summary

def format_summary(report: dict, phases: dict, workdir: str, *, total_seconds: float, fast: bool) -> str:
    w = os.path.abspath(workdir)
    ev = report
    lines = ["=" * 78, "Bifrost-1 (JAX) embedded demo" + ("  [--fast: a quick look, not the reported numbers]"
                                                        if fast else ""), "=" * 78]
    lines.append("phases (tiny models trained from scratch on the shapes data, CPU):")
    for name, p in phases.items():
        m = p.get("last_metrics") or {}
        loss = m.get("loss")
        how = (f"trained {p['seconds']:.0f} s" if p["status"] == "trained"
               else "reused" + (f" (trained in {p['trained_seconds']:.0f} s)" if p.get("trained_seconds") else ""))
        lines.append(f"  {name:<13} {p['steps']:>5} steps  {how:<28}"
                     + (f" final loss {loss:.4g}" if loss is not None else "") + f"   {w}/{name}/checkpoints")
    lines += format_understanding(ev["understanding"]) if ev.get("understanding") else []
    s = ev["seconds_per_image"]
    lines.append(f"generation: {ev['num_prompts']} held-out prompts (unseen colour-shape pairs), "
                 f"{ev['image_size'][0]}x{ev['image_size'][1]} px, MAR {ev['sampling']['mar_steps']} steps, "
                 f"FLUX {ev['sampling']['flux_steps']} steps")
    lines.append(f"  per image: MLLM {s['mllm'] * 1e3:.1f} ms + diffusion {s['diffusion'] * 1e3:.1f} ms "
                 f"(after {ev['seconds_compile']:.0f} s of compilation)")
    lines.append("shapes checker (accuracy / chance):")
    names = [k for k in ("bifrost", "flux_alone", "reconstruction", "ground_truth") if k in ev["scores"]]
    attrs = [a for a in ("color", "shape", "count", "relation", "position", "overall")
             if ev["scores"]["bifrost"]["counts"].get(a)]
    lines.append(f"  {'':<15}" + "".join(f"{a:>10}" for a in attrs))
    chance = ev["scores"]["bifrost"]["chance"]
    lines.append(f"  {'chance':<15}" + "".join(f"{chance[a]:>10.3f}" for a in attrs))
    for k in names:
        acc = ev["scores"][k]["accuracy"]
        lines.append(f"  {k:<15}" + "".join(f"{acc[a]:>10.3f}" for a in attrs))
    lines.append("  bifrost = MLLM (MAR) -> CLIP latents -> ControlNet + FLUX; flux_alone = same FLUX, ControlNet "
                 "off;")
    lines.append("  reconstruction = the ground-truth image's ViT latents -> ControlNet + FLUX; ground_truth = the "
                 "real images")
    lines.append("  (the checker's ceiling at this resolution). The ViT is the understanding phase's (pretrained "
                 "on the shapes data).")
    if ev.get("data_layout"):
        lines.append(f"  Shapes data layout: {ev['data_layout']} (configs/demo.py says why).")
    lines.append("outputs:")
    lines.append(f"  grid        {ev['grid']}  (each row's prompt and each column's name written on it)")
    lines.append(f"  report      {os.path.join(w, 'demo', 'report.json')}")
    lines.append(f"  data        {os.path.join(w, 'data', 'shapes')}")
    lines.append(f"  logs        {w}/<phase>/metrics.jsonl")
    lines.append(f"total time: {total_seconds:.0f} s")
    lines.append("=" * 78)
    return "\n".join(lines)
