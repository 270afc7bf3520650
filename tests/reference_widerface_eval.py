"""Slow, loop-based WIDER FACE evaluator used only to cross-check utils.evaluation.widerface_eval.

A plain step-by-step transcription of the official MATLAB protocol, sharing no code with the
fast evaluator: its own .mat reading, per-image score sort, per-prediction greedy matching
with a recall list, a 1000-step threshold loop per image and the VOC AP loop.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
from scipy.io import loadmat

SETTINGS = ("easy", "medium", "hard")


def _text(entry) -> str:
    return str(np.asarray(entry).ravel()[0])


def load_reference_gt(gt_dir: str, events: Optional[Sequence[str]] = None) -> dict:
    """Official layout: per event, image names, face boxes and per setting the keep lists."""
    full = loadmat(os.path.join(gt_dir, "wider_face_val.mat"))
    settings = {s: loadmat(os.path.join(gt_dir, f"wider_{s}_val.mat")) for s in SETTINGS}
    gt: dict = {"events": [], "files": [], "boxes": [], "keep": {s: [] for s in SETTINGS}}
    for i in range(full["event_list"].shape[0]):
        event = _text(full["event_list"][i][0])
        if events is not None and event not in events:
            continue
        file_cell = full["file_list"][i][0]
        box_cell = full["face_bbx_list"][i][0]
        gt["events"].append(event)
        gt["files"].append([_text(file_cell[j][0]) for j in range(file_cell.shape[0])])
        gt["boxes"].append([np.asarray(box_cell[j][0], dtype=float).reshape(-1, 4) for j in range(box_cell.shape[0])])
        for s in SETTINGS:
            keep_cell = settings[s]["gt_list"][i][0]
            gt["keep"][s].append([np.asarray(keep_cell[j][0]).astype(int).ravel() for j in range(keep_cell.shape[0])])
    return gt


def _overlaps_with(gt_boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of one x1 y1 x2 y2 box with every gt box, +1 pixel convention (MATLAB boxoverlap)."""
    x1 = np.maximum(gt_boxes[:, 0], box[0])
    y1 = np.maximum(gt_boxes[:, 1], box[1])
    x2 = np.minimum(gt_boxes[:, 2], box[2])
    y2 = np.minimum(gt_boxes[:, 3], box[3])
    w = x2 - x1 + 1
    h = y2 - y1 + 1
    inter = w * h
    g_area = (gt_boxes[:, 2] - gt_boxes[:, 0] + 1) * (gt_boxes[:, 3] - gt_boxes[:, 1] + 1)
    b_area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        o = inter / (g_area + b_area - inter)
    o[(w <= 0) | (h <= 0)] = 0
    return o


def _image_eval(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray, iou_thresh: float):
    pred = pred.copy()
    gt = gt.copy()
    pred[:, 2] = pred[:, 0] + pred[:, 2]
    pred[:, 3] = pred[:, 1] + pred[:, 3]
    gt[:, 2] = gt[:, 0] + gt[:, 2]
    gt[:, 3] = gt[:, 1] + gt[:, 3]
    recall_list = np.zeros(len(gt))
    proposal_list = np.ones(len(pred))
    pred_recall = np.zeros(len(pred))
    for h in range(len(pred)):
        overlaps = _overlaps_with(gt, pred[h, :4])
        max_idx = int(np.argmax(overlaps))  # first index on ties, like MATLAB max
        if overlaps[max_idx] >= iou_thresh:
            if ignore[max_idx] == 0:
                recall_list[max_idx] = -1
                proposal_list[h] = -1
            elif recall_list[max_idx] == 0:
                recall_list[max_idx] = 1
        pred_recall[h] = np.sum(recall_list == 1)
    return pred_recall, proposal_list


def _image_pr_info(thresh_num: int, pred: np.ndarray, proposal_list, pred_recall) -> np.ndarray:
    info = np.zeros((thresh_num, 2))
    last = -1  # last index with score >= thresh (scores sorted); only grows as thresh falls
    proposals = 0  # entries of proposal_list[: last + 1] equal to 1
    for t in range(1, thresh_num + 1):
        thresh = 1 - t / thresh_num
        while last + 1 < len(pred) and pred[last + 1, 4] >= thresh:
            last += 1
            proposals += proposal_list[last] == 1
        if last >= 0:
            info[t - 1, 0] = proposals
            info[t - 1, 1] = pred_recall[last]
    return info


def _voc_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    mrec = [0.0] + list(rec) + [1.0]
    mpre = [0.0] + list(prec) + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        if math.isnan(mpre[i]) or mpre[i + 1] > mpre[i]:  # MATLAB max skips NaN
            mpre[i] = mpre[i + 1]
    ap = 0.0
    for i in range(1, len(mrec)):
        if mrec[i] != mrec[i - 1]:
            ap += (mrec[i] - mrec[i - 1]) * mpre[i]
    return ap


def reference_evaluate(
    preds: Mapping[str, Mapping[str, np.ndarray]],
    gt_dir: str,
    events: Optional[Sequence[str]] = None,
    iou_thresh: float = 0.5,
    thresh_num: int = 1000,
) -> Dict[str, dict]:
    """{setting: {"ap", "precision", "recall"}}; every gt image must have an entry in preds."""
    gt = load_reference_gt(gt_dir, events)
    # norm_score: min / max over every prediction, then (s - min) / (max - min).
    max_score, min_score = -math.inf, math.inf
    for i, event in enumerate(gt["events"]):
        for name in gt["files"][i]:
            p = np.asarray(preds[event][name], dtype=float).reshape(-1, 5)
            for s in p[:, 4]:
                max_score = max(max_score, s)
                min_score = min(min_score, s)
    norm: List[List[np.ndarray]] = []
    for i, event in enumerate(gt["events"]):
        norm.append([])
        for name in gt["files"][i]:
            p = np.asarray(preds[event][name], dtype=float).reshape(-1, 5).copy()
            if max_score == min_score:
                p[:, 4] = 1.0  # the fast evaluator's documented choice for constant scores
            else:
                p[:, 4] = (p[:, 4] - min_score) / (max_score - min_score)
            order = np.argsort(-p[:, 4], kind="stable")  # MATLAB sort 'descend' is stable
            norm[-1].append(p[order])

    results = {}
    for setting in SETTINGS:
        pr_curve = np.zeros((thresh_num, 2))
        count_face = 0
        for i in range(len(gt["events"])):
            for j in range(len(gt["files"][i])):
                gt_boxes = gt["boxes"][i][j]
                pred = norm[i][j]
                keep_index = gt["keep"][setting][i][j]
                count_face += len(keep_index)
                if len(gt_boxes) == 0 or len(pred) == 0:
                    continue
                ignore = np.zeros(len(gt_boxes))
                for k in keep_index:
                    ignore[k - 1] = 1
                pred_recall, proposal_list = _image_eval(pred, gt_boxes, ignore, iou_thresh)
                pr_curve += _image_pr_info(thresh_num, pred, proposal_list, pred_recall)
        precision = np.zeros(thresh_num)
        recall = np.zeros(thresh_num)
        for t in range(thresh_num):
            precision[t] = pr_curve[t, 1] / pr_curve[t, 0] if pr_curve[t, 0] > 0 else math.nan
            recall[t] = pr_curve[t, 1] / count_face
        results[setting] = {"ap": _voc_ap(recall, precision), "precision": precision, "recall": recall}
    return results
