"""The privacy part of a run folder: `privacy.json`, a section of `report.md`, and plots.

A run folder's privacy.json maps attack -> result; an experiment folder's maps algorithm ->
(attack -> result). The section between the markers below is replaced whenever attacks run
again, so a report never shows two versions of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from silotune.report.markdown import table
from silotune.report.plots import plt, save_figure
from silotune.run_folder import RunFolder, write_json

BEGIN, END = "<!-- privacy:begin -->", "<!-- privacy:end -->"

# Headline leakage figures (key -> label), one per attack, for sweeps and comparisons.
LEAKAGE = (
    ("extraction_excess", "extraction ROUGE-L excess over base (prefix)"),
    ("membership_auc", "membership AUC (ratio)"),
    ("inversion_bleu4", "inversion BLEU-4 (run's front)"),
)


def leakage_headlines(found: dict[str, Any]) -> dict[str, float]:
    """The headline figures of one run's attacks (only those that ran)."""
    out: dict[str, float] = {}
    if "extraction" in found:
        prefix = found["extraction"]["tuned"]["prefix"]
        out["extraction_excess"] = prefix.get("versus_base", prefix)["rouge_l"]["excess"]
    if "membership" in found:
        out["membership_auc"] = found["membership"]["loss_ratio"]["auc"]
    if "inversion" in found:
        seen = [s for s in found["inversion"]["settings"] if s["run_setting"]]
        if seen:
            out["inversion_bleu4"] = seen[0]["bleu4"]
    return out


def load_privacy(folder: Path) -> dict[str, Any]:
    """A folder's privacy.json, or {} when no attack has run on it."""
    file = RunFolder(folder).privacy
    data: dict[str, Any] = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    return data


def write_privacy(folder: Path, results: dict[str, Any], several: bool = False) -> dict[str, Any]:
    """Merge `results` into the folder's privacy.json; rewrite its report section and plots."""
    merged = {**load_privacy(folder), **results}  # later attacks replace earlier ones
    by_run = merged if several else {"": merged}
    plots = _plots(folder, by_run)
    section = privacy_markdown(by_run, [p.relative_to(folder).as_posix() for p in plots])
    _put_section(folder / "report.md", section)
    write_json(RunFolder(folder).privacy, merged)
    return merged


def _put_section(report: Path, section: str) -> None:
    text = report.read_text(encoding="utf-8") if report.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    report.write_text(text, encoding="utf-8")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def privacy_markdown(by_run: dict[str, dict[str, Any]], plots: list[str]) -> str:
    """Markdown tables for whatever attacks ran; `by_run` maps run name ("" for one) -> results."""
    lines = [BEGIN, "## Privacy", ""]
    extraction = {name: r["extraction"] for name, r in by_run.items() if "extraction" in r}
    if extraction:
        any_run = next(iter(extraction.values()))
        lines += [
            "### Training-data extraction",
            "",
            "The adversary holds the shared adapter and decodes greedily from "
            f"{any_run['members']} private training records (members) and "
            f"{any_run['non_members']} records of the same data never trained on "
            "(non-members). *Excess* = members − non-members, with a 95 % interval: what "
            "the model reproduces because it trained on the record, not because "
            "it knows the domain. *Over base*: the same excess minus the base model's, record "
            "by record on the same prompts, which also cancels any difference between the two "
            "sets of records. ROUGE-L and prefix match in %; *extracted* = share of records "
            "with ROUGE-L at or above the threshold.",
            "",
        ]
        rows = []
        for name, r in extraction.items():
            models = [(name or "tuned", r["tuned"])]
            if name == next(iter(extraction)):
                models.insert(0, ("base model", r["base"]))
            for label, result in models:
                for kind in ("instruction", "prefix"):
                    s = result[kind]
                    vs = s.get("versus_base")
                    rows.append(
                        [
                            label,
                            kind,
                            _pct(s["rouge_l"]["members"]),
                            _pct(s["rouge_l"]["non_members"]),
                            f"{_pct(s['rouge_l']['excess'])} ± {_pct(s['rouge_l']['ci95'])}",
                            f"{_pct(vs['rouge_l']['excess'])} ± {_pct(vs['rouge_l']['ci95'])}"
                            if vs
                            else "–",
                            f"{_pct(s['prefix_match']['excess'])} ± "
                            f"{_pct(s['prefix_match']['ci95'])}",
                            f"{_pct(s['extracted']['excess'])} ± {_pct(s['extracted']['ci95'])}",
                        ]
                    )
        lines += [
            table(
                [
                    "model",
                    "prompt",
                    "ROUGE-L members",
                    "ROUGE-L non-members",
                    "ROUGE-L excess",
                    "ROUGE-L excess over base",
                    "prefix-match excess",
                    "extracted excess",
                ],
                rows,
            ),
            "",
        ]
    membership = {name: r["membership"] for name, r in by_run.items() if "membership" in r}
    if membership:
        lines += [
            "### Membership inference",
            "",
            "Score = the record's loss under the tuned model ÷ its loss under the base model "
            "(lower: member). AUC 0.5 is chance; TPR at 1 % FPR is the share of members caught "
            "while wrongly accusing at most 1 % of non-members (with few non-members, a handful "
            "of records decide it). The raw loss, without the base model's calibration, is shown "
            "for comparison.",
            "",
            table(
                [
                    "model",
                    "members / non-members",
                    "AUC (ratio)",
                    "TPR @ 1 % FPR (ratio)",
                    "AUC (loss)",
                    "TPR @ 1 % FPR (loss)",
                ],
                [
                    [
                        name or "tuned",
                        f"{r['members']} / {r['non_members']}",
                        f"{r['loss_ratio']['auc']:.3f}",
                        f"{r['loss_ratio']['tpr_at_1pct_fpr']:.3f}",
                        f"{r['loss']['auc']:.3f}",
                        f"{r['loss']['tpr_at_1pct_fpr']:.3f}",
                    ]
                    for name, r in membership.items()
                ],
            ),
            "",
        ]
    inversion = {name: r["inversion"] for name, r in by_run.items() if "inversion" in r}
    for name, r in inversion.items():
        lines += [
            f"### Activation inversion{f' ({name})' if name else ''}",
            "",
            f"An honest-but-curious split server inverts client {r['victim']}'s front "
            f"activations ({r['victim_records']} training records) with a {r['inversion_model']} "
            f"inversion model trained for {r['steps']} steps on the activations of "
            f"{r['shadow_records']} colluding clients' records. Scores on the victim's own tokens "
            "(the shared prompt template is left out), in %. *covered* = share of the victim's "
            "tokens that occur in the shadow data at all (the attack cannot output others). "
            "★ marks what the server of this run received.",
            "",
            table(
                [
                    "front",
                    "noise (× RMS)",
                    "token accuracy",
                    "BLEU-4",
                    "ROUGE-1",
                    "covered",
                ],
                [
                    [
                        _front_label(s["front_blocks"]) + (" ★" if s["run_setting"] else ""),
                        f"{s['noise']:g}",
                        _pct(s["token_accuracy"]),
                        _pct(s["bleu4"]),
                        _pct(s["rouge1"]),
                        _pct(s["victim_tokens_seen_in_shadow"]),
                    ]
                    for s in r["settings"]
                ]
                + [
                    [
                        "FL-GLM paper: embeddings",
                        "0",
                        "–",
                        _pct(r["paper"]["embeddings_only"]["bleu4"]),
                        _pct(r["paper"]["embeddings_only"]["rouge1"]),
                        "–",
                    ],
                    ["FL-GLM paper: + 1 block", "0", "–", "near 0", "near 0", "–"],
                ],
            ),
            "",
        ]
        first = r["settings"][0]
        lines += [
            f"Example ({_front_label(first['front_blocks'])}, noise {first['noise']:g}; the true "
            "text is the victim's private record: this report stays with the data's owner):",
            "",
            "```text",
            f"true:      {_one_line(first['example']['true'])}",
            f"recovered: {_one_line(first['example']['recovered'])}",
            "```",
            "",
        ]
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    lines += ["", END]
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("`", "'")


def _front_label(blocks: int) -> str:
    return "embeddings" if blocks == 0 else f"embeddings + {blocks} block{'s' * (blocks > 1)}"


def _plots(folder: Path, by_run: dict[str, dict[str, Any]]) -> list[Path]:
    out = folder / "plots"
    out.mkdir(exist_ok=True)
    written = []
    membership = {n: r["membership"] for n, r in by_run.items() if "membership" in r}
    if membership:
        fig, ax = plt.subplots(figsize=(5, 5))
        for name, r in membership.items():
            roc = r["loss_ratio"]["roc"]
            auc = r["loss_ratio"]["auc"]
            ax.plot(roc["fpr"], roc["tpr"], label=f"{name or 'tuned'} (AUC {auc:.3f})")
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.set_title("membership inference (loss ratio)")
        ax.legend()
        written.append(save_figure(fig, out / "membership_roc.png"))
    extraction = {n: r["extraction"] for n, r in by_run.items() if "extraction" in r}
    if extraction:
        fig, ax = plt.subplots(figsize=(6, 4))
        names = [n or "tuned" for n in extraction]
        for k, kind in enumerate(("instruction", "prefix")):
            xs = [i + 0.38 * k for i in range(len(names))]
            shown = [
                r["tuned"][kind].get("versus_base", r["tuned"][kind]) for r in extraction.values()
            ]
            ys = [100 * s["rouge_l"]["excess"] for s in shown]
            err = [100 * s["rouge_l"]["ci95"] for s in shown]
            ax.bar(xs, ys, width=0.36, yerr=err, capsize=4, label=f"{kind} prompt")
        ax.set_xticks([i + 0.19 for i in range(len(names))], names)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_ylabel("ROUGE-L excess over base (%)")
        ax.set_title("training-data extraction")
        ax.legend()
        written.append(save_figure(fig, out / "extraction_excess.png"))
    for name, r in by_run.items():
        if "inversion" not in r:
            continue
        settings = r["inversion"]["settings"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for noise in sorted({s["noise"] for s in settings}):
            pts = sorted(
                (s["front_blocks"], 100 * s["bleu4"]) for s in settings if s["noise"] == noise
            )
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"noise {noise:g} × RMS")
        ax.axhline(
            100 * r["inversion"]["paper"]["embeddings_only"]["bleu4"],
            linestyle="--",
            color="grey",
            label="FL-GLM paper, embeddings only",
        )
        ax.set_xlabel("front blocks after the embeddings")
        ax.set_ylabel("BLEU-4 of recovered text (%)")
        ax.set_title("activation inversion")
        ax.legend()
        written.append(save_figure(fig, out / f"inversion{'_' + name if name else ''}.png"))
    return written
