"""The quality report as markdown tables."""

from __future__ import annotations


def _fmt(value: float | None, percent: bool) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def _params(params: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in params.items()) or "–"


def experiment_one(section: dict, title: str) -> list[str]:
    accuracy = section["higher_is_better"]
    domains = section["domains"]
    unit = "accuracy %" if accuracy else "loss, nats/byte"
    norm = "merged ÷ expert" if accuracy else "share of the base→expert gap closed"
    lines = [f"### {title}", "", f"Per-domain test {unit}; normalised = {norm}, averaged over domains.", ""]
    head = ["model / method", "setting", *domains, "average", "normalised %", "merge s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in section["references"]:
        cells = [entry["name"], ""] + [_fmt(entry["test"][d], accuracy) for d in domains]
        cells += [_fmt(entry["average"], accuracy), f"{100 * entry['normalised_average']:.1f}", ""]
        lines.append("| " + " | ".join(cells) + " |")
    for entry in section["methods"]:
        cells = [entry["method"], f"{entry['setting']}: {_params(entry['params'])}"]
        cells += [_fmt(entry["test"][d], accuracy) for d in domains]
        cells += [_fmt(entry["average"], accuracy), f"{100 * entry['normalised_average']:.1f}", f"{entry['seconds']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Room for merging (test split): each expert on its own domain against the base there, and on the",
              "other domains.", ""]
    lines += ["| domain | expert (own) | base (own) | expert gain | expert on other domains | other experts here |",
              "|---|---|---|---|---|---|"]
    for m in section["margins"]:
        lines.append(f"| {m['domain']} | {_fmt(m['expert_own'], accuracy)} | {_fmt(m['base_own'], accuracy)} | "
                     f"{_fmt(m['gain_own'], accuracy)} | {_fmt(m['expert_others'], accuracy)} | "
                     f"{_fmt(m['other_experts_here'], accuracy)} |")
    return lines + [""]


def scaling(section: dict) -> list[str]:
    lines = ["### Experiment 2: normalised held-in score (test, %) vs number of experts and width", ""]
    for key, label in (("by_experts", "experts"), ("by_width", "width")):
        points = section[key]
        if not points:
            continue
        methods = list(points[0]["methods"])
        head = [label, "base", *methods]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in points:
            value = p["experts"] if key == "by_experts" else f"{p['width']}x ({p['experts']} experts)"
            cells = [str(value), f"{100 * p['base']:.1f}"] + [f"{100 * p['methods'][m]:.1f}" for m in methods]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def different_init(section: dict) -> list[str]:
    lines = ["### Experiment 3: models from different initialisations (clean digits, test accuracy %)", "",
             "Label split: model A saw only digits 0–4, model B only 5–9, either with ten-way heads or with",
             "their own five-way heads (A's outputs read as 0–4, B's as 5–9; PLeaS merges with",
             "`label_spaces: separate`, so its head predicts over the union). Accuracy is joint, over all ten",
             "digits. Averaging cannot merge heads of different classes (–). PLeaS reads 1,000 unlabeled",
             "training images; data-free rows read 1,000 generic images (or noisy digits) refined for 200 steps to",
             "both models' batch-norm statistics. \"Tuned\": the merged model then takes 300 Adam steps toward the",
             "sources' combined outputs on those inputs (the data-free default; \"not tuned\" leaves it out).", ""]
    names = list(section)
    head = ["model / method", *names]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = list(dict.fromkeys(r["name"] for n in names for r in section[n]))
    for row in rows:
        cells = [row] + [_fmt(next((r["accuracy"] for r in section[n] if r["name"] == row), None), True) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def different_init_text(rows: list[dict]) -> list[str]:
    lines = ["### Experiment 3 (text): byte-level Llamas from different initialisations (test loss, nats/byte)", "",
             "Both trained from scratch on the same prose and code with seeds 1 and 2. PLeaS reads 1,000 unlabeled",
             "training windows of 64 bytes (or random token ids, data-free). Wider merges keep some attention heads,",
             "MLP units and stream units of both models side by side. \"Tuned\": 300 Adam steps of the merged model",
             "toward the mean of both models' logits on those inputs (the data-free default). Lower is better.", ""]
    domains = list(rows[0]["scores"])
    head = ["model / method", *domains, "average", "compute ×", "seconds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        scores = [row["scores"][d] for d in domains]
        cells = [row["name"], *(_fmt(v, False) for v in scores), _fmt(sum(scores) / len(scores), False),
                 f"{row['compute_ratio']:.2f}" if "compute_ratio" in row else "–",
                 f"{row['seconds']:.0f}" if "seconds" in row else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def twin(section: dict, reference: dict, title: str) -> list[str]:
    """Twin-Merging rows beside experiment 1's references and its task arithmetic and TIES rows."""
    accuracy = section["higher_is_better"]
    domains = section["domains"]
    unit = "accuracy %" if accuracy else "loss, nats/byte"
    lines = [f"### {title}", "",
             f"Per-domain test {unit} on one shuffled test set mixing every domain (each row of a batch routed on its",
             "own); normalised as in experiment 1. Storage: the factors' bytes over the dense deltas they replace.",
             "Time: routed twin (router included) over the shared model alone, same batch, the two run in turn 25 times; "
             "median of the ratios" + ("; in brackets, over the shared model converted to channels-last memory format "
                                      "(its fastest layout on a CPU)." if accuracy else "."), ""]
    head = ["model / method", *domains, "average", "normalised %", "router acc. %", "storage %", "time ×"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    picks = [e for e in reference["references"] if e["name"].startswith("expert") or e["name"] == "multitask"]
    picks += [e for e in reference["methods"] if e["method"] in ("task_arithmetic", "ties")]
    for entry in picks:
        name = entry["name"] if "name" in entry else f"{entry['method']} ({entry['setting']})"
        cells = [name] + [_fmt(entry["test"][d], accuracy) for d in domains]
        cells += [_fmt(entry["average"], accuracy), f"{100 * entry['normalised_average']:.1f}", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    for row in section["rows"]:
        cells = [f"**{row['name']}**"] + [_fmt(row["scores"][d], accuracy) for d in domains]
        speed = f"{row['overhead']['ratio']:.2f}" if row.get("overhead") else "–"
        if (row.get("overhead") or {}).get("channels_last"):
            speed += f" ({row['overhead']['channels_last']['ratio']:.2f})"
        cells += [_fmt(row["average"], accuracy), f"**{100 * row['normalised_average']:.1f}**",
                  f"{100 * row['router_test_accuracy']:.1f}", f"{100 * row['storage_ratio']:.1f}", speed]
        lines.append("| " + " | ".join(cells) + " |")
    whole = [row for row in section["rows"] if row.get("overhead_whole_set")]
    for row in whole:
        timing = row["overhead_whole_set"]
        lines += ["", f"{row['name']} on the whole mixed test set as one batch ({timing['batch']} rows, so about "
                  f"{timing['batch'] // len(domains)} per task; 9 turns): {timing['ratio']:.2f}× the shared model "
                  f"({timing['shared_ms']:.0f} ms shared)" + (
                      f", {timing['channels_last']['ratio']:.2f}× the shared model in channels-last "
                      f"({timing['channels_last']['shared_ms']:.0f} ms)" if timing.get("channels_last") else "") + "."]
    return lines + [""]


def markdown(report: dict) -> str:
    lines = ["# Merge quality on real data", "",
             f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ",
             f"Wall time of this run: {report['wall_seconds'] / 60:.1f} min (trained models and scores cached under bench/out/quality are reused)", ""]
    lines += experiment_one(report["vision"], "Experiment 1 (vision): timm test_resnet on digit domains")
    lines += experiment_one(report["text"], "Experiment 1 (text): byte-level GPT-2 on text domains")
    if "twin" in report:
        for modality in ("vision", "text"):
            count = len(report["twin"][modality]["domains"])
            lines += twin(report["twin"][modality], report[modality],
                          f"Experiment 4 ({modality}): Twin-Merging, {count} domains mixed")
    if "scaling" in report:
        lines += scaling(report["scaling"])
    lines += different_init(report["different_init"])
    if "different_init_text" in report:
        lines += different_init_text(report["different_init_text"])
    check = report["self_merge"]
    lines += ["### Checks", "",
              f"- linear merge of an expert with itself: tensors identical = {check['identical_tensors']}; "
              f"test accuracy {check['merged_scores']} vs expert {check['expert_scores']}", ""]
    return "\n".join(lines)
