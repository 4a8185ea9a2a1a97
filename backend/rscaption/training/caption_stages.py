"""Stages ``mapping``, ``crosslingual``, ``calibrate``, ``export`` and ``evaluate``: the prefix captioner on
top of the trained encoder, its other languages, its confidence, and its report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import TrainError
from .config import resolve_path
from .parts import plan_of, run_captioner, trained_captioner
from .rundir import Run, copy_model, du, save_checkpoint


def quick_val(cap, val_emb, val_records, beam: int = 1) -> dict:
    """Fast val scores during training (python tokenizer, no METEOR): for picking epochs only."""
    from ..evaluation.metrics import score_captions

    caps = cap.caption(val_emb.numpy(), beam_size=beam)
    cands = {r.image_id: c for r, (c, _) in zip(val_records, caps)}
    refs = {r.image_id: r.captions for r in val_records}
    s = score_captions(cands, refs, meteor=False, use_java=False)
    return {"val_CIDEr": round(s["CIDEr-D"], 3), "val_BLEU-4": round(s["BLEU-4"], 3)}


def sample_embeddings(emb: dict, plan):
    """Train embeddings as ``[n_samples, 1, D]`` in ``plan``'s order: the LiT stages write that
    layout; the CLIP stage writes ``[N, V, D]``, which is the same samples view by view."""
    tr = emb["train"]
    if emb.get("layout") != "samples" and tr.shape[1] > 1:
        tr = tr.permute(1, 0, 2).reshape(-1, 1, tr.shape[-1])
    if tr.shape[0] != len(plan.train):
        raise TrainError("embeddings do not match the training data; rerun the embed stage")
    return tr


def val_captioned(plan):
    """Indices of val images with real captions (class-only sets have written captions only)."""
    return [i for i, si in enumerate(plan.val.record_set) if plan.sets[int(si)].has_captions]


def stage_mapping(run: Run, rng):
    import torch

    from ..data.datasets import normalize_caption
    from .mapping_stage import train_mapping

    plan = plan_of(run)
    cap = run_captioner(run)
    emb = torch.load(run.dir / "embeddings.pt", weights_only=True)
    train_emb = sample_embeddings(emb, plan)
    mdir = run.dir / "mapping"
    mdir.mkdir(exist_ok=True)
    cfg = run.cfg.get("mapping", {})
    weights = cfg.get("set_weights")  # the caption sets' share of the decoder's training, if not the data's
    per_image = []
    for r in plan.train.records:
        ids, mask = cap.tokenize_captions([normalize_caption(c) for c in r.captions])
        per_image.append([row[: int(m.sum())].tolist() for row, m in zip(ids, mask)])
    seqs = [per_image[i] for i in plan.train.sample_record]
    start = 0
    ck = mdir / "last.pt"
    if ck.exists():
        st = torch.load(ck, weights_only=True)
        cap.mapping.load_state_dict(st["mapping"])
        cap.lm.load_state_dict(st["lm"])
        rng.bit_generator.state = st["rng"]
        start = st["epoch"]

    def save(epoch):
        save_checkpoint({"mapping": cap.mapping.state_dict(), "lm": cap.lm.state_dict(), "epoch": epoch,
                          "rng": rng.bit_generator.state}, ck)

    every = int(cfg.get("val_every", 0))
    epochs = int(cfg.get("epochs", 10))
    counter = {"e": start}
    val_idx = val_captioned(plan)

    def val_fn():
        counter["e"] += 1
        if val_idx and every and (counter["e"] % every == 0 or counter["e"] == epochs):
            return quick_val(cap, emb["val"][val_idx, 0], [plan.val.records[i] for i in val_idx])
        return {}

    hist = train_mapping(cap.mapping, cap.lm, train_emb, seqs, cap.tokenizer.pad_token_id, cfg, rng,
                         log=run.log, start_epoch=start, on_epoch_end=save, val_fn=val_fn,
                         loss_fn=cap.caption_loss, order_fn=lambda g: plan.epoch_order(g, weights))
    return {"epochs": epochs, "final_loss": hist[-1]["loss"] if hist else None,
            **({k: v for k, v in hist[-1].items() if k.startswith("val_")} if hist else {})}


def stage_crosslingual(run: Run, rng):
    from .crosslingual import stage_crosslingual as train_languages

    return train_languages(run, rng)


def stage_calibrate(run: Run, rng):
    """Fit the confidence model on half of every val set (``calibrate_stage``)."""
    import torch

    from .calibrate_stage import fit_scene_head, save_head

    plan = plan_of(run)
    if not len(plan.vocab):
        info = {"skipped": "no scene classes: confidence stays the LM's token probability"}
        run.log({"stage": "calibrate", **info})
        return info
    cap = trained_captioner(run)
    emb = torch.load(run.dir / "embeddings.pt", weights_only=True)
    train = sample_embeddings(emb, plan)[:, 0].numpy()
    # what epochs draw, with each sample's right classes (for the labelled prototypes)
    train = train[plan.drawable]
    train_pos = plan.scene_targets("train")[0][plan.train.sample_record][plan.drawable]
    if len(train) > 20000:
        pick = np.sort(rng.choice(len(train), 20000, replace=False))
        train, train_pos = train[pick], train_pos[pick]
    cfg = {**run.cfg.get("calibrate", {}), "seed": run.cfg.get("seed", 0)}
    template = run.cfg.get("contrastive", {}).get("prompt_template", "an aerial image of a {}.")
    head, report = fit_scene_head(cap, plan, emb["val"][:, 0].numpy(), train, cfg, rng, template,
                                  beam_size=beam_of(run), log=run.log, train_pos=train_pos,
                                  length_penalty=length_penalty_of(run))
    save_head(head, run.dir / "calibrate")
    (run.dir / "calibrate" / "report.json").write_text(json.dumps(report, indent=2))
    return {"AUROC": report["all"]["AUROC"], "ECE": report["all"]["ECE"], "temperature": report["temperature"]}


def length_penalty_of(run: Run) -> float:
    """The card's length penalty (what the pipeline decodes with), else the evaluate section's."""
    card = run.cfg.get("export", {}).get("card", {})
    lp = card.get("length_penalty", run.cfg.get("evaluate", {}).get("length_penalty", 1.0))
    return float(lp)


def beam_of(run: Run) -> int:
    """The beam width the pipeline will use with this model (the card's), so calibration and the
    report see the captions users get."""
    card = run.cfg.get("export", {}).get("card", {})
    return int(card.get("beam_size") or run.cfg.get("evaluate", {}).get("beam_size", 1))


def final_captioner(run: Run):
    """What gets exported: the trained captioner with its confidence model and other languages."""
    from .calibrate_stage import load_head

    cap = trained_captioner(run)
    head = load_head(run.dir / "calibrate")
    if head is not None:
        cap.scene = head
    if (run.dir / "crosslingual").is_dir():
        from .crosslingual import attach_decoders

        attach_decoders(cap, run.dir)
    return cap


def stage_export(run: Run, rng):
    cap = final_captioner(run)
    model_dir = run.dir / "model"
    cap.save(model_dir)
    info = {"model_dir": str(model_dir), "model_hash": cap.model_hash, "bytes": du(model_dir),
            "languages": list(getattr(cap, "languages", ["en"])), "calibrated": cap.scene is not None}
    target = run.cfg.get("export", {}).get("dir")
    if target and not run.cfg.get("_no_export_copy"):
        target = Path(resolve_path(target, run.cfg))
        copy_model(model_dir, target)
        info["exported_to"] = str(target)
    run.log({"stage": "export", **info})
    return info


def stage_evaluate(run: Run, rng):
    """Every val set of the run with the exported model (``eval.json``); the confidence figures are
    on the half of each set that calibration did not see. The main figures are computed in
    ``evaluate.precision`` (fp32: the same on every machine); each of ``evaluate.compare_precisions``
    (e.g. bf16, what ``auto`` computes in on AMX CPUs) is run again and reported beside them."""
    from ..evaluation.scene_eval import split_halves
    from ..models.registry import load_model

    plan = plan_of(run)
    e = run.cfg.get("evaluate", {})
    cap = load_model(str(run.dir / "model"), precision=e.get("precision", "fp32"))
    template = run.cfg.get("contrastive", {}).get("prompt_template", "an aerial image of a {}.")
    prompt_emb = np.asarray(cap.embed_texts(plan.vocab.prompts(template)), np.float32) if len(plan.vocab) else \
        np.zeros((0, cap.embed_dim), np.float32)
    pos, allowed = plan.scene_targets("val")
    sets = plan.val.record_set
    report_half = ~split_halves(sets, int(run.cfg.get("seed", 0))) if getattr(cap, "scene", None) else \
        np.ones(len(sets), bool)
    report = {"model": str(run.dir / "model"), "model_hash": cap.model_hash, "precision": cap.precision, "sets": {}}
    rows = _evaluate_sets(run, plan, cap, e, prompt_emb, pos, allowed, sets, report_half, report["sets"])
    report["summary"] = rows
    for precision in e.get("compare_precisions", []) or []:
        skipped = _cannot_run(precision, cap)
        if skipped:  # e.g. bf16 on an AVX2-only CPU: the comparison is extra, the main figures stand
            run.log({"stage": "evaluate", "precision": precision, "skipped": skipped})
            report[f"summary_{precision}"] = {"skipped": skipped}
            continue
        cap.precision = precision
        report[f"summary_{precision}"] = _evaluate_sets(run, plan, cap, e, prompt_emb, pos, allowed, sets,
                                                         report_half, {}, tag=precision)
    (run.dir / "eval.json").write_text(json.dumps(report, indent=2))
    return {"summary": rows}


def _cannot_run(precision, cap) -> str:
    """Why ``cap`` cannot compute in ``precision`` on this machine ("" when it can)."""
    from ..device import compute_dtype
    from ..errors import ModelError

    try:
        compute_dtype(precision, cap.device, cap.dtype)
    except ModelError as exc:
        return str(exc)
    return ""


def _evaluate_sets(run, plan, cap, e, prompt_emb, pos, allowed, sets, report_half, into: dict, tag=None) -> list:
    from ..evaluation.set_report import evaluate_set, summary_row

    rows = []
    for si, s in enumerate(plan.sets):
        m = sets == si
        if not m.any():
            continue
        rep = evaluate_set(cap, s.val, pos[m], allowed[m], prompt_emb, s.has_captions, report_half[m],
                           beam_size=int(e.get("beam_size", 3)), meteor=bool(e.get("meteor", True)) and tag is None,
                           length_penalty=length_penalty_of(run), ground_m=s.spec.ground_m)
        into[s.spec.name] = rep
        rows.append(summary_row(s.spec.name, rep))
        run.log({"stage": "evaluate", **({"precision": tag} if tag else {}), **rows[-1]})
    return rows
