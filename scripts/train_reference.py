#!/usr/bin/python3
"""Trains the PyTorch reference of the Flex-MoE model (tests/model_reference.py) the way
flexmoe_train trains the C model, on the problem flexmoe_train exports, in float32 on one thread:
the accuracy and throughput peer of the C trainer (scripts/accuracy.py runs both).

    scripts/train_reference.py PROBLEM.safetensors [--json] [--epochs N]
    scripts/train_reference.py --selftest
    scripts/train_reference.py --example-problem FILE [--data DIR] [--missing-rate P] [--seed N]

PROBLEM (flexmoe_train --export-problem FILE) is a safetensors file holding
  __metadata__["config"]    the model's configuration, as model_reference.parse_config reads it
  __metadata__["training"]  JSON {"epochs", "batch_size", "warmup_epochs" (0: none), "lr", "beta1",
                            "beta2", "eps", "weight_decay", "dropout" (0: none), "seed",
                            "missing_rate"}
  every parameter of the model under model_reference's names and shapes (F32): the initial weights
  data.features.<m> F32 [N, F_m]  standardised, zero where missing
  data.observed I32 [N, M] (0/1, at least one 1 per row), data.labels I32 [N]
  data.train, data.validation, data.test I32 [n]: row indices
Other tensors are ignored.

The recipe (flexmoe.h's fm_model_train): epoch e = 1..epochs goes through the training rows in
batches of batch_size (the last one smaller): in the curriculum's order (most observed modalities
first, ties in data.train's order) while e <= warmup_epochs, shuffled after (torch.Generator seeded
with the seed; it does not reproduce the C trainer's draws). Each step is a training forward
(inverted dropout at rate `dropout` on the attention's and the SMoE's outputs where
model_reference applies its masks, fresh N(0, 1) gate noise), the loss task cross-entropy +
gate_loss_weight * gate loss, the backward and torch.optim.Adam. After each epoch the validation
rows are evaluated in inference (no dropout, no noise); the weights of the epoch of strictly best
validation accuracy (the first of equals) are kept and restored at the end for the test metrics:
accuracy, macro-F1 (over the classes among the labels or the predictions) and one-vs-rest macro AUC
(over the classes with positives and negatives; Mann-Whitney, ties sharing their mean rank) from
the softmax probabilities.

The forward is model_reference's model restructured for training speed, the same arithmetic up to
summation order (--selftest checks the loss, the logits and every gradient against
model_reference.forward in float64): the M modality chunks go through the shared SMoE in one pass
(model_reference runs the SMoE, and so its expert loop, once per chunk), with each chunk's gate
loss kept; the experts' rows come from one sorted gather and go back by one scatter-add
(model_reference copies the whole output once per expert); the stacked expert weights are unbound
once and the bank gathered once for all modalities (indexing w1[e] per expert or bank[c, m] per
modality, as model_reference does, makes each of those backwards fill and add a zero gradient of
the whole tensor); dropout masks come from torch.rand (bernoulli_ is 4x slower here). On the
handwritten digits' shapes (6 views, d 128, 16 experts, batches of 16) this trains about 2.5x
faster than model_reference.forward would. Throughput (train_samples_per_second) counts the
training steps only (batch assembly, forward, backward, Adam; not the evaluations). The process
runs on one thread (torch, OpenMP, OpenBLAS) and, as bench/bench_main.cpp does for its PyTorch
peers, keeps freed memory in glibc's heap (--glibc-defaults: not) so that PyTorch's per-step
allocations do not go through page faults.

Exit status: 0, 1 when training fails (a non-finite loss), 2 for a bad command line or problem
file (the message names what is missing or wrong)."""
import os

# Before torch loads its BLAS and OpenMP runtime: one thread each.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import io
import json
import math
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import model_reference as ref  # noqa: E402

PROG = "train_reference.py"


class ProblemError(Exception):
    """A problem file that cannot be trained on: reported with exit status 2."""


class TrainingError(Exception):
    """Training that cannot go on (a non-finite loss): exit status 1."""


# ---- the process ---------------------------------------------------------------------------------

_INTEROP_SET = False


def single_thread():
    """One thread for torch, intra- and inter-op (set_num_interop_threads aborts the process when
    called twice, so once per process)."""
    global _INTEROP_SET
    torch.set_num_threads(1)
    if not _INTEROP_SET:
        torch.set_num_interop_threads(1)
        _INTEROP_SET = True


def keep_freed_memory():
    """glibc keeps freed memory in the heap (mmap threshold 32 MiB, trim threshold 1 GiB, top pad
    64 MiB), as bench/bench_main.cpp sets for its PyTorch peers. Returns what was done, in words."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
        ok = (libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
              and libc.mallopt(M_TOP_PAD, 64 << 20))
    except (OSError, AttributeError):
        ok = False
    return "glibc: freed memory kept (mmap threshold 32 MiB, no trim)" if ok else "glibc defaults (mallopt failed)"


def blas_name():
    """The BLAS torch's matmuls go through, with OpenBLAS's core name when it is OpenBLAS."""
    for name in ("libopenblas.so.0", "libopenblas.so"):
        try:
            lib = ctypes.CDLL(name)
            lib.openblas_get_corename.restype = ctypes.c_char_p
            with contextlib.suppress(AttributeError):
                lib.openblas_set_num_threads(1)
            return "OpenBLAS " + lib.openblas_get_corename().decode()
        except (OSError, AttributeError):
            continue
    return "unknown"


# ---- the problem file ----------------------------------------------------------------------------

TRAINING_KEYS = {  # key -> (kind, check, what it must be)
    "epochs": (int, lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (int, lambda v: v >= 1, "an integer >= 1"),
    "warmup_epochs": (int, lambda v: v >= 0, "an integer >= 0"),
    "lr": (float, lambda v: 0 < v < math.inf, "a finite number > 0"),
    "beta1": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "beta2": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "eps": (float, lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "weight_decay": (float, lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "dropout": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "seed": (int, lambda v: 0 <= v < 2 ** 64, "an integer in [0, 2^64)"),
    "missing_rate": (float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
}
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Training:
    """__metadata__["training"]."""
    epochs: int
    batch_size: int
    warmup_epochs: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    dropout: float
    seed: int
    missing_rate: float


@dataclasses.dataclass
class Problem:
    """A checked problem file: the model's config, the recipe, the initial parameters (F32) and
    the data, each modality's features already cut into patches."""
    cfg: ref.Config
    training: Training
    params: dict                # name -> F32 tensor
    patches: list               # per modality [N, patches, P_m] F32, zero where missing
    observed: torch.Tensor      # [N, M] bool
    combination: torch.Tensor   # [N] long, Flex-MoE's combination index
    labels: torch.Tensor        # [N] long
    splits: dict                # "train" / "validation" / "test" -> [n] long


def parse_training(metadata):
    """The Training of __metadata__["training"]; unknown keys are ignored."""
    if "training" not in metadata:
        raise ProblemError("__metadata__ has no 'training'")
    try:
        raw = json.loads(metadata["training"])
    except json.JSONDecodeError as e:
        raise ProblemError(f"__metadata__ 'training' is not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ProblemError("__metadata__ 'training' is not a JSON object")
    missing = [key for key in TRAINING_KEYS if key not in raw]
    if missing:
        raise ProblemError("__metadata__ 'training' lacks " + ", ".join(f"'{k}'" for k in missing))
    values = {}
    for key, (kind, check, expected) in TRAINING_KEYS.items():
        value = raw[key]
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or (kind is int and not float(value).is_integer()) or not check(value):
            raise ProblemError(f"training '{key}' is {value!r}, expected {expected}")
        values[key] = kind(value)
    return Training(**values)


def patch_rows(cfg, m, features):
    """[N, F_m] -> [N, patches, P_m]: zero-padded to patches * P_m, one row per patch."""
    width = cfg.patch_width(m)
    return F.pad(features, (0, cfg.patches * width - features.shape[1])).view(-1, cfg.patches, width)


def combination_table(modalities):
    """[2^M] long: the combination index of each observed-modality bit mask (bit m = modality m)."""
    table = torch.full((2 ** modalities,), -1, dtype=torch.long)
    for c, subset in enumerate(ref.combinations(modalities)):
        table[sum(1 << m for m in subset)] = c
    return table


def load_problem(path):
    """The Problem of a file; ProblemError naming what is missing or wrong."""
    try:
        tensors, metadata = ref.read_safetensors(path)
        cfg = ref.parse_config(metadata)
    except ref.InputError as e:
        raise ProblemError(str(e)) from None
    M = cfg.modalities
    problems = []  # the training metadata's and the missing tensors', reported together
    try:
        training = parse_training(metadata)
    except ProblemError as e:
        problems.append(str(e))

    expected = {name: (torch.float32, shape) for name, shape in ref.parameter_shapes(cfg).items()}
    expected.update({f"data.features.{m}": (torch.float32, None) for m in range(M)})
    expected.update({"data.observed": (torch.int32, None), "data.labels": (torch.int32, None)})
    expected.update({f"data.{split}": (torch.int32, None) for split in SPLITS})
    missing = [name for name in expected if name not in tensors]
    if missing:
        problems.append("missing tensor" + "s" * (len(missing) > 1) + " " + ", ".join(f"'{n}'" for n in missing))
    if problems:
        raise ProblemError("; ".join(problems))
    for name, (dtype, shape) in expected.items():
        tensor = tensors[name]
        if tensor.dtype != dtype:
            raise ProblemError(f"tensor '{name}' is {ref.DTYPE_NAMES[tensor.dtype]}, expected {ref.DTYPE_NAMES[dtype]}")
        if shape is not None and tuple(tensor.shape) != shape:
            raise ProblemError(f"tensor '{name}' has shape {list(tensor.shape)}, expected {list(shape)}")

    observed = tensors["data.observed"]
    if observed.dim() != 2 or observed.shape[1] != M or observed.shape[0] < 1:
        raise ProblemError(f"tensor 'data.observed' has shape {list(observed.shape)}, expected [N, {M}]")
    N = observed.shape[0]
    if not ((observed == 0) | (observed == 1)).all():
        raise ProblemError("tensor 'data.observed' holds values other than 0 and 1")
    empty = (observed.sum(dim=1) == 0).nonzero().flatten()
    if len(empty):
        raise ProblemError(f"tensor 'data.observed': sample {empty[0].item()} has no observed modality")
    labels = tensors["data.labels"]
    if tuple(labels.shape) != (N,):
        raise ProblemError(f"tensor 'data.labels' has shape {list(labels.shape)}, expected [{N}]")
    bad = ((labels < 0) | (labels >= cfg.classes)).nonzero().flatten()
    if len(bad):
        raise ProblemError(f"tensor 'data.labels': sample {bad[0].item()} has label {labels[bad[0]].item()}, "
                           f"outside [0, {cfg.classes})")
    splits = {}
    for split in SPLITS:
        rows = tensors[f"data.{split}"]
        if rows.dim() != 1 or rows.numel() < 1:
            raise ProblemError(f"tensor 'data.{split}' has shape {list(rows.shape)}, expected [n] with n >= 1")
        if ((rows < 0) | (rows >= N)).any():
            raise ProblemError(f"tensor 'data.{split}' holds a row index outside [0, {N})")
        splits[split] = rows.long()
    patches = []
    for m in range(M):
        name = f"data.features.{m}"
        features = tensors[name]
        if tuple(features.shape) != (N, cfg.features[m]):
            raise ProblemError(f"tensor '{name}' has shape {list(features.shape)}, expected [{N}, {cfg.features[m]}]")
        features = torch.where(observed[:, m:m + 1].bool(), features, torch.zeros(()))
        if not torch.isfinite(features).all():
            raise ProblemError(f"tensor '{name}' holds a non-finite value in an observed row")
        patches.append(patch_rows(cfg, m, features).contiguous())
    for name in ref.parameter_shapes(cfg):
        if not torch.isfinite(tensors[name]).all():
            raise ProblemError(f"tensor '{name}' holds a non-finite value")
    observed = observed.bool()
    masks = (observed.long() << torch.arange(M)).sum(dim=1)
    return Problem(cfg=cfg, training=training,
                   params={name: tensors[name].clone() for name in ref.parameter_shapes(cfg)},
                   patches=patches, observed=observed, combination=combination_table(M)[masks],
                   labels=labels.long(), splits=splits)


# ---- the model, vectorised -----------------------------------------------------------------------

def embed(cfg, p, patches, observed, combination):
    """model_reference.embed on patches cut in advance: [B, M * patches, d]. The bank is gathered
    once for every modality (model_reference gathers per modality, and each gather's backward
    builds a zero gradient of the whole bank)."""
    B, M, P, d = observed.shape[0], cfg.modalities, cfg.patches, cfg.dim
    tokens = torch.stack([torch.matmul(rows, p[f"encoder.{m}.weight"]) + p[f"encoder.{m}.bias"]
                          for m, rows in enumerate(patches)], dim=1)
    tokens = torch.where(observed[:, :, None, None], tokens, p["bank"][combination])
    return tokens.view(B, M * P, d) + p["position"]


def experts(p, u, indices, gates):
    """model_reference.experts: sum_i gates[:, i] * expert_{indices[:, i]}(u), every expert's rows
    gathered in one sorted copy, each expert one GEMM pair, the results scattered back at once."""
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = torch.argsort(flat)
    rows = torch.div(order, k, rounding_mode="floor")
    gathered = u.index_select(0, rows)
    # One unbind per weight tensor and one split of the rows: indexing p["moe.w1"][e] or slicing
    # the rows per expert, as model_reference does, gives each expert's backward a zero gradient
    # of the whole tensor to fill and add.
    w1, b1, w2, b2 = (p[name].unbind(0) for name in ("moe.w1", "moe.b1", "moe.w2", "moe.b2"))
    counts = torch.bincount(flat, minlength=len(w1)).tolist()
    outputs = []
    for e, x in enumerate(gathered.split(counts)):
        if counts[e]:
            h = F.gelu(torch.addmm(b1[e], x, w1[e]))
            outputs.append(torch.addmm(b2[e], h, w2[e]))
    weighted = torch.cat(outputs) * gates.reshape(-1)[order, None]
    return torch.zeros_like(u).index_add(0, rows, weighted)


def cv_squared_rows(v):
    """model_reference.cv_squared of each row of v [groups, E], summed."""
    if v.shape[1] == 1:
        return torch.zeros((), dtype=v.dtype)
    return (v.var(dim=1, unbiased=True) / (v.mean(dim=1) ** 2 + ref.CV_EPSILON)).sum()


def smoe_chunks(cfg, p, t, row_combination, noise, with_loss):
    """model_reference's SMoE of every chunk at once: t [M * rows, d] chunk-major (chunk m's rows
    at m * rows), noise [M * rows, E] or None (the inference gate). Returns y and the sum over the
    chunks of each chunk's gate loss (None unless with_loss)."""
    k, E, M = cfg.top_k, cfg.experts, cfg.modalities
    u = F.layer_norm(t, (cfg.dim,), p["moe.norm.weight"], p["moe.norm.bias"], cfg.layernorm_eps)
    clean = u @ p["moe.gate.weight"]
    if noise is None:
        noisy, std = clean, None
    else:
        std = F.softplus(u @ p["moe.noise.weight"]) + cfg.noise_epsilon
        noisy = clean + noise * std
    top_values, top_indices = noisy.topk(min(k + 1, E), dim=1)
    gates = top_values[:, :k].softmax(dim=1)
    indices = top_indices[:, :k]
    y = experts(p, u, indices, gates)
    if not with_loss:
        return y, None

    # Token group per row: 2 * chunk + (sample misses a modality), as model_reference per chunk.
    rows_per_chunk = t.shape[0] // M
    missing = row_combination > 0
    group = torch.arange(M).repeat_interleave(rows_per_chunk) * 2 + missing.long()
    importance = torch.zeros(2 * M, E, dtype=u.dtype).index_put(
        (group[:, None].expand_as(indices), indices), gates, accumulate=True)
    if noise is not None and k < E:
        per_row = ref.probability_in_top_k(clean, noisy, std, top_values, k)
    else:
        per_row = F.one_hot(indices, E).sum(dim=1).to(u.dtype)
    load = torch.zeros(2 * M, E, dtype=u.dtype).index_add(0, group, per_row)
    loss = cv_squared_rows(importance) + cv_squared_rows(load)
    count = int(missing.sum())
    if count:  # each chunk's mean over its rows of samples missing a modality: count / M rows each
        loss = loss + F.cross_entropy(noisy[missing], row_combination[missing] % E, reduction="sum") / (count // M)
    return y, loss


def forward(cfg, p, patches, observed, combination, labels=None, gate_noise=None,
            dropout_attention=None, dropout_moe=None):
    """model_reference.forward on a batch (patches per modality [B, patches, P_m], observed [B, M]
    bool, combination [B] long, labels [B] long or None), gate_noise [M, B * patches, E] or None,
    dropout masks as model_reference takes them (or None). Returns the logits [B, C] and, with
    labels, (loss, task loss, gate loss)."""
    B, M, P, d = observed.shape[0], cfg.modalities, cfg.patches, cfg.dim
    x = ref.attention(cfg, p, embed(cfg, p, patches, observed, combination), dropout_attention)
    t = x.reshape(B, M, P, d).transpose(0, 1).reshape(M * B * P, d)
    row_combination = combination.repeat_interleave(P).repeat(M)
    noise = None if gate_noise is None else gate_noise.reshape(M * B * P, cfg.experts)
    y, gate_loss = smoe_chunks(cfg, p, t, row_combination, noise, labels is not None)
    if dropout_moe is not None:
        y = y * dropout_moe.reshape(M * B * P, d)
    pooled = (t + y).view(M, B, P, d).mean(dim=2).transpose(0, 1).reshape(B, M * d)
    logits = torch.addmm(p["head.bias"], pooled, p["head.weight"])
    if labels is None:
        return logits, None
    task_loss = F.cross_entropy(logits, labels)
    return logits, (task_loss + cfg.gate_loss_weight * gate_loss, task_loss, gate_loss)


# ---- metrics -------------------------------------------------------------------------------------

def average_ranks(scores):
    """1-based ranks of scores, ties sharing their mean rank."""
    order = np.argsort(scores, kind="mergesort")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def metrics(probs, labels):
    """accuracy, macro-F1 and one-vs-rest macro AUC of probs [n, C] against labels [n] (numpy), as
    flexmoe.h's fm__score: argmax the first of equal maxima, F1 over the classes among the labels
    or the predictions, AUC over the classes with positives and negatives (0 where none)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    n, classes = probs.shape
    predictions = probs.argmax(axis=1)
    f1s, aucs = [], []
    for c in range(classes):
        predicted, actual = predictions == c, labels == c
        tp = int(np.sum(predicted & actual))
        fp, fn = int(np.sum(predicted & ~actual)), int(np.sum(~predicted & actual))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
        positives = int(actual.sum())
        if 0 < positives < n:
            rank_sum = average_ranks(probs[:, c])[actual].sum()
            aucs.append((rank_sum - positives * (positives + 1) / 2) / (positives * (n - positives)))
    return {"accuracy": float(np.mean(predictions == labels)) if n else 0.0,
            "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
            "macro_auc": float(np.mean(aucs)) if aucs else 0.0}


# ---- training ------------------------------------------------------------------------------------

def curriculum(observed, rows):
    """The training rows, most observed modalities first, ties in the given order."""
    counts = observed[rows].sum(dim=1)
    return rows[torch.sort(-counts, stable=True).indices]


def epoch_order(epoch, training, ordered, generator):
    """The rows of epoch (1-based): the curriculum's order during the warm-up, then shuffled."""
    if epoch <= training.warmup_epochs:
        return ordered
    return ordered[torch.randperm(len(ordered), generator=generator)]


class BestWeights:
    """The weights of the epoch of strictly best validation accuracy (the first of equals)."""

    def __init__(self, params):
        self.epoch, self.accuracy, self.metrics = 0, -1.0, None
        self.weights = {name: t.detach().clone() for name, t in params.items()}

    def update(self, epoch, validation, params):
        """Keeps params when validation["accuracy"] beats the best so far; True when it did."""
        if validation["accuracy"] <= self.accuracy:
            return False
        self.epoch, self.accuracy, self.metrics = epoch, validation["accuracy"], validation
        for name, t in params.items():
            self.weights[name].copy_(t.detach())
        return True

    def restore(self, params):
        with torch.no_grad():
            for name, t in params.items():
                t.copy_(self.weights[name])


def select(problem, rows):
    """The batch tensors of the rows: patches per modality, observed, combination, labels."""
    return ([patches.index_select(0, rows) for patches in problem.patches], problem.observed[rows],
            problem.combination[rows], problem.labels[rows])


def evaluate(problem, params, rows, batch_size=16):
    """The inference metrics on rows, as flexmoe.h's fm_model_evaluate (which also runs batches of
    the training's size; larger ones are slower here)."""
    probs = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            patches, observed, combination, _ = select(problem, rows[start:start + batch_size])
            logits, _ = forward(problem.cfg, params, patches, observed, combination)
            probs.append(logits.softmax(dim=1))
    return metrics(torch.cat(probs).numpy(), problem.labels[rows].numpy())


def train(problem, epochs=None, log=None):
    """Trains problem.params (in place) with the recipe; returns the result dict (the JSON keys
    but impl). log(str) gets the progress lines."""
    cfg, tr = problem.cfg, problem.training
    epochs = tr.epochs if epochs is None else epochs
    M, P, E, d, p_drop = cfg.modalities, cfg.patches, cfg.experts, cfg.dim, tr.dropout
    params = problem.params
    for tensor in params.values():
        tensor.requires_grad_(True)
    optimizer = torch.optim.Adam(list(params.values()), lr=tr.lr, betas=(tr.beta1, tr.beta2), eps=tr.eps,
                                 weight_decay=tr.weight_decay)
    generator = torch.Generator().manual_seed(tr.seed)
    ordered = curriculum(problem.observed, problem.splits["train"])
    best = BestWeights(params)
    start, train_seconds, samples, steps = time.perf_counter(), 0.0, 0, 0
    for epoch in range(1, epochs + 1):
        epoch_seconds, epoch_loss = 0.0, 0.0
        tick = time.perf_counter()
        rows = epoch_order(epoch, tr, ordered, generator)
        for first in range(0, len(rows), tr.batch_size):
            patches, observed, combination, labels = select(problem, rows[first:first + tr.batch_size])
            B = len(labels)
            noise = torch.randn(M, B * P, E, generator=generator)
            masks = [None, None]
            if p_drop > 0:  # inverted dropout; torch.rand >= p is 4x faster than bernoulli_ here
                masks = [(torch.rand(shape, generator=generator) >= p_drop).float().div_(1 - p_drop)
                         for shape in ((B, M * P, d), (M, B * P, d))]
            _, (loss, _, _) = forward(cfg, params, patches, observed, combination, labels, noise, *masks)
            if not torch.isfinite(loss):
                raise TrainingError(f"the loss is {loss.item()} at step {steps + 1} (epoch {epoch})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            samples += B
            epoch_loss += loss.item() * B
            now = time.perf_counter()
            epoch_seconds += now - tick
            tick = now
        train_seconds += epoch_seconds
        validation = evaluate(problem, params, problem.splits["validation"], tr.batch_size)
        is_best = best.update(epoch, validation, params)
        if log:
            log(f"epoch {epoch:3d}/{epochs}  loss {epoch_loss / len(rows):.4f}  validation accuracy "
                f"{validation['accuracy']:.3f}{' (best)' if is_best else '       '}  "
                f"{len(rows) / epoch_seconds if epoch_seconds else 0:.0f} samples/s")
    best.restore(params)
    test = evaluate(problem, params, problem.splits["test"], tr.batch_size)
    # missing_rate to float32's 6 digits: the C side writes 0.3 as 0.300000012
    return {"missing_rate": float(f"{tr.missing_rate:.6g}"), "seed": tr.seed, "epochs": epochs, "best_epoch": best.epoch,
            "validation_accuracy": best.accuracy, "test_accuracy": test["accuracy"],
            "test_macro_f1": test["macro_f1"], "test_macro_auc": test["macro_auc"],
            "train_samples_per_second": samples / train_seconds if train_seconds else 0.0,
            "seconds": time.perf_counter() - start, "train_seconds": train_seconds, "train_samples": samples,
            "steps": steps}


# ---- problems for testing ------------------------------------------------------------------------

DEFAULT_MODEL = {"patches": 16, "dim": 128, "heads": 4, "experts": 16, "top_k": 4, "hidden": 256,
                 "gate_loss_weight": 0.01, "attention_residual": True, "noise_epsilon": 0.01,
                 "layernorm_eps": 1e-5}
DEFAULT_TRAINING = {"epochs": 20, "batch_size": 16, "warmup_epochs": 5, "lr": 1e-3, "beta1": 0.9,
                    "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "dropout": 0.5}


def initial_parameters(cfg, generator):
    """Parameters drawn by fm_model_init's rules (flexmoe.h): nn.Linear's U(+-1/sqrt(in)) for the
    encoders, attention and head, bank N(0, 1), position 0, LayerNorms 1 and 0, the gates
    U(+-1/sqrt(E)), the experts U(+-1/sqrt(in * out)) with zero biases."""
    def uniform(shape, bound):
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound

    params = {}
    for name, shape in ref.parameter_shapes(cfg).items():
        if name.startswith(("encoder.", "attention.q", "attention.kv", "attention.out", "head.")):
            fan_in = cfg.patch_width(int(name.split(".")[1])) if name.startswith("encoder.") else (
                cfg.modalities * cfg.dim if name.startswith("head.") else cfg.dim)
            params[name] = uniform(shape, fan_in ** -0.5)
        elif name == "bank":
            params[name] = torch.randn(shape, generator=generator)
        elif name.endswith("norm.weight"):
            params[name] = torch.ones(shape)
        elif name in ("moe.gate.weight", "moe.noise.weight"):
            params[name] = uniform(shape, cfg.experts ** -0.5)
        elif name in ("moe.w1", "moe.w2"):
            params[name] = uniform(shape, (shape[1] * shape[2]) ** -0.5)
        else:  # position, LayerNorm biases, expert biases
            params[name] = torch.zeros(shape)
    return params


def synthetic_views(samples, features, classes, generator):
    """Multi-view data where view v carries bit v of the class (mod its bit count) along a direction
    of its own, buried in noise, like flexmoe_train's embedded task: (views, labels)."""
    labels = torch.arange(samples) % classes
    views = []
    for v, width in enumerate(features):
        direction = torch.randn(width, generator=generator) / math.sqrt(width / 4)
        sign = ((labels >> (v % max(1, (classes - 1).bit_length()))) & 1) * 2.0 - 1
        views.append(sign[:, None] * direction + torch.randn(samples, width, generator=generator))
    return views, labels


def read_view_csvs(directory):
    """views (float64 numpy [N, F] each, NaN rows where missing) and labels of a multi-view CSV
    directory (views.txt, <view>.csv, labels.csv; an empty line marks a missing view)."""
    with open(os.path.join(directory, "views.txt")) as f:
        names = [line.split()[0] for line in f if line.strip()]
    views = []
    for name in names:
        with open(os.path.join(directory, name + ".csv")) as f:
            lines = f.read().splitlines()
        width = max(len(line.split(",")) for line in lines if line.strip())
        views.append(np.array([[float(x) for x in line.split(",")] if line.strip() else [math.nan] * width
                               for line in lines]))
    labels = np.loadtxt(os.path.join(directory, "labels.csv"), dtype=np.int64).reshape(-1)
    return views, labels


def example_problem(path, seed=1, missing_rate=0.3, data=None, samples=200, model=None, training=None):
    """Writes a problem file as flexmoe_train --export-problem does (its own random draws): the
    multi-view CSV data of directory data, or a synthetic task of samples rows over three views;
    views dropped at missing_rate (one kept), split 70/15/15, standardised on the training rows,
    zero where missing; parameters drawn by fm_model_init's rules."""
    generator = torch.Generator().manual_seed(seed)
    if data:
        views, labels = read_view_csvs(data)
        views = [torch.from_numpy(v) for v in views]
        labels = torch.from_numpy(labels)
    else:
        views, labels = synthetic_views(samples, [12, 20, 8], 8, generator)
    N, M = len(labels), len(views)
    observed = torch.stack([torch.isfinite(v).all(dim=1) for v in views], dim=1)
    drop = torch.rand(N, M, generator=generator) < missing_rate
    kept = observed & ~drop
    for i in (~kept.any(dim=1)).nonzero().flatten().tolist():  # keep one of the sample's views
        choices = observed[i].nonzero().flatten()
        kept[i, choices[torch.randint(len(choices), (1,), generator=generator)]] = True
    order = torch.randperm(N, generator=generator)
    n_train, n_validation = int(0.7 * N), int(0.15 * N)
    train_rows = order[:n_train]
    tensors = {}
    for m, view in enumerate(views):
        rows = train_rows[kept[train_rows, m]]
        mean, std = view[rows].mean(dim=0), view[rows].std(dim=0)
        std = torch.where(std > 0, std, torch.ones(()))
        values = torch.where(kept[:, m:m + 1], (view - mean) / std, torch.zeros(()))
        tensors[f"data.features.{m}"] = values.float()
    config = dict(DEFAULT_MODEL, **(model or {}), modalities=M, features=[v.shape[1] for v in views],
                  classes=int(labels.max()) + 1)
    cfg = ref.parse_config({"config": json.dumps(config)})
    tensors.update(initial_parameters(cfg, generator))
    tensors.update({"data.observed": kept.int(), "data.labels": labels.int(),
                    "data.train": train_rows.int(), "data.validation": order[n_train:n_train + n_validation].int(),
                    "data.test": order[n_train + n_validation:].int()})
    recipe = dict(DEFAULT_TRAINING, **(training or {}), seed=seed, missing_rate=missing_rate)
    ref.write_safetensors(path, tensors, {"config": json.dumps(config), "training": json.dumps(recipe)})


# ---- --selftest ----------------------------------------------------------------------------------

SELFTEST_MODEL = {"patches": 4, "dim": 16, "heads": 2, "experts": 4, "top_k": 2, "hidden": 32}


def brute_force_metrics(probs, labels):
    """accuracy, macro-F1 and macro AUC by their definitions, O(n^2) pair counting for the AUC."""
    n, classes = probs.shape
    predictions = [max(range(classes), key=lambda c: (probs[i, c], -c)) for i in range(n)]
    f1s, aucs = [], []
    for c in range(classes):
        tp = sum(1 for i in range(n) if predictions[i] == c and labels[i] == c)
        fp = sum(1 for i in range(n) if predictions[i] == c and labels[i] != c)
        fn = sum(1 for i in range(n) if predictions[i] != c and labels[i] == c)
        if c in labels or c in predictions:
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn) if tp + fn else 0.0
            f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        positives = [probs[i, c] for i in range(n) if labels[i] == c]
        negatives = [probs[i, c] for i in range(n) if labels[i] != c]
        if positives and negatives:
            wins = sum((a > b) + 0.5 * (a == b) for a in positives for b in negatives)
            aucs.append(wins / (len(positives) * len(negatives)))
    return {"accuracy": sum(predictions[i] == labels[i] for i in range(n)) / n,
            "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0, "macro_auc": sum(aucs) / len(aucs) if aucs else 0.0}


def check_metrics():
    """metrics() against brute_force_metrics on random data with many ties (coarse scores), a
    class never predicted, a class absent from the labels, and known values."""
    failures, rng = [], np.random.default_rng(5)
    for trial in range(30):
        n, classes = int(rng.integers(2, 60)), int(rng.integers(2, 6))
        probs = rng.integers(0, 4, size=(n, classes)) / 4.0  # coarse: ties everywhere
        labels = rng.integers(0, classes - (trial % 3 == 0), size=n)
        if trial % 5 == 0:
            probs[:, classes - 1] = -1.0  # never predicted
        got, want = metrics(probs, labels), brute_force_metrics(probs, labels)
        for key in want:
            if abs(got[key] - want[key]) > 1e-12:
                failures.append(f"trial {trial}: {key} {got[key]} != brute force {want[key]}")
    known = metrics(np.array([[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.2, 0.8]]), np.array([0, 1, 1, 0]))
    expected = {"accuracy": 0.5, "macro_f1": 0.5, "macro_auc": 0.5}  # positives of 1: 0.1 0.6 vs 0.4 0.8
    if any(abs(known[k] - v) > 1e-12 for k, v in expected.items()):
        failures.append(f"known case gives {known}, expected {expected}")
    ranks = average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0]))
    if ranks.tolist() != [4.0, 1.0, 4.0, 2.0, 4.0]:
        failures.append(f"average_ranks of a triple tie gives {ranks.tolist()}")
    return failures, "30 random cases with ties against O(n^2) pair counting and the F1 definition, a known case"


def reference_batch(problem, rows, dtype, noise, masks):
    """model_reference's Batch of the problem's rows."""
    features = [problem.patches[m][rows].reshape(len(rows), -1)[:, :f].to(dtype)
                for m, f in enumerate(problem.cfg.features)]
    return ref.Batch(features=features, observed=problem.observed[rows], combination=problem.combination[rows],
                     labels=problem.labels[rows], class_weights=None, gate_noise=noise,
                     dropout_attention=masks[0], dropout_moe=masks[1])


def check_against_reference(problem):
    """The vectorised forward against model_reference.forward in float64 on 24 rows with every
    combination of 3 modalities: logits and loss in training (noise, dropout masks) and inference,
    and every parameter's gradient in training."""
    cfg, failures, generator = problem.cfg, [], torch.Generator().manual_seed(3)
    M, P, E, d = cfg.modalities, cfg.patches, cfg.experts, cfg.dim
    rows = torch.cat([(problem.combination == c).nonzero().flatten()[:4] for c in range(2 ** M - 1)])
    B = len(rows)
    worst = 0.0
    for training in (True, False):
        noise = torch.randn(M, B * P, E, generator=generator, dtype=torch.float64) if training else None
        masks = [None, None]
        if training:
            masks = [torch.empty(shape, dtype=torch.float64).bernoulli_(0.7, generator=generator) / 0.7
                     for shape in ((B, M * P, d), (M, B * P, d))]
        results = []
        for implementation in ("reference", "vectorised"):
            params = {name: t.detach().double().requires_grad_(True) for name, t in problem.params.items()}
            if implementation == "reference":
                outputs, _ = ref.forward(cfg, params, reference_batch(problem, rows, torch.float64, noise, masks))
                logits, loss = outputs["out.logits"], outputs["out.loss"]
            else:
                patches, observed, combination, labels = select(problem, rows)
                logits, (loss, _, _) = forward(cfg, params, [x.double() for x in patches], observed, combination,
                                               labels, noise, *masks)
            loss.backward()
            results.append((logits.detach(), loss.detach(), {n: t.grad for n, t in params.items()}))
        (logits0, loss0, grads0), (logits1, loss1, grads1) = results
        mode = "training" if training else "inference"
        compared = {"logits": (logits0, logits1), "loss": (loss0, loss1)}
        if training:
            compared.update({f"grad.{n}": (g, grads1[n]) for n, g in grads0.items()})
        for name, (a, b) in compared.items():
            if a is None or b is None:
                if not (a is None and b is None):
                    failures.append(f"{mode}: {name} is None on one side only")
                continue
            error = ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()
            worst = max(worst, error)
            if error > 1e-10:
                failures.append(f"{mode}: {name} differs from model_reference by {error:.3g} of its largest entry")
    return failures, (f"float64, {B} rows of every combination: logits, loss and {len(problem.params)} gradients "
                      f"within {worst:.1g} of model_reference.forward")


def check_best_weights():
    """BestWeights keeps the first of strictly best accuracies and restores those weights."""
    params = {"w": torch.zeros(2)}
    best, failures = BestWeights(params), []
    for epoch, accuracy in enumerate([0.5, 0.7, 0.7, 0.6, 0.7], start=1):
        params["w"].fill_(epoch)
        best.update(epoch, {"accuracy": accuracy}, params)
    best.restore(params)
    if best.epoch != 2 or params["w"].tolist() != [2.0, 2.0]:
        failures.append(f"best epoch {best.epoch}, restored weights {params['w'].tolist()}; expected epoch 2")
    return failures, "accuracies 0.5 0.7 0.7 0.6 0.7: epoch 2 kept and restored"


def check_order(problem):
    """The curriculum (descending observed count, ties in data.train's order) for the warm-up
    epochs, a permutation of it after."""
    training = dataclasses.replace(problem.training, warmup_epochs=1)
    rows = problem.splits["train"]
    counts = problem.observed.sum(dim=1)
    expected = [r for n in range(problem.cfg.modalities, 0, -1) for r in rows.tolist() if counts[r] == n]
    generator = torch.Generator().manual_seed(1)
    ordered = curriculum(problem.observed, rows)
    first, second = (epoch_order(e, training, ordered, generator) for e in (1, 2))
    failures = []
    if first.tolist() != expected:
        failures.append("warm-up epoch: not the curriculum's order")
    if sorted(second.tolist()) != sorted(expected) or second.tolist() == expected:
        failures.append("after the warm-up: not a shuffle of the training rows")
    return failures, "curriculum order in the warm-up, a permutation after"


def check_learning(tmp):
    """The synthetic task (8 classes, each of 3 views telling one bit) is learnt: 1200 samples, 20 %
    missing, 10 epochs well above chance (1/8; about 0.76 at best, a sample missing a view being
    ambiguous between two classes), the epoch loss falling."""
    path = os.path.join(tmp, "learn.safetensors")
    example_problem(path, seed=3, missing_rate=0.2, samples=1200, model=SELFTEST_MODEL,
                    training={"epochs": 10, "warmup_epochs": 2, "lr": 3e-3})
    lines = []
    result = train(load_problem(path), log=lines.append)
    losses = [float(line.split("loss ")[1].split()[0]) for line in lines]
    failures = []
    if result["test_accuracy"] < 0.4:
        failures.append(f"test accuracy {result['test_accuracy']:.3f} after 10 epochs, expected >= 0.4")
    if not losses[-1] < losses[0]:
        failures.append(f"epoch losses {losses} do not fall")
    return failures, (f"10 epochs: loss {losses[0]:.3f} -> {losses[-1]:.3f}, test accuracy {result['test_accuracy']:.3f}, "
                      f"AUC {result['test_macro_auc']:.3f}, {result['train_samples_per_second']:.0f} samples/s")


def call_main(argv):
    """main(argv) in this process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def check_training(tmp, path):
    """Two epochs through the command line: the JSON line's keys and ranges, the best epoch's
    validation accuracy reproduced by its restored weights."""
    status, stdout, stderr = call_main([path, "--json", "--epochs", "2"])
    if status != 0:
        return [f"exit status {status}: {stderr.strip()}"], ""
    try:
        result = json.loads(stdout)
    except json.JSONDecodeError:
        return [f"stdout is not one JSON line: {stdout!r}"], ""
    failures = []
    keys = ("impl", "missing_rate", "seed", "epochs", "best_epoch", "validation_accuracy", "test_accuracy",
            "test_macro_f1", "test_macro_auc", "train_samples_per_second", "seconds")
    missing = [k for k in keys if k not in result]
    if missing:
        return [f"JSON lacks {missing}"], ""
    if result["impl"] != "torch" or result["epochs"] != 2 or result["best_epoch"] not in (1, 2):
        failures.append(f"impl/epochs/best_epoch: {result}")
    for key in ("validation_accuracy", "test_accuracy", "test_macro_f1", "test_macro_auc"):
        if not 0 <= result[key] <= 1:
            failures.append(f"{key} {result[key]} outside [0, 1]")
    if not result["train_samples_per_second"] > 0:
        failures.append(f"train_samples_per_second {result['train_samples_per_second']}")
    if stderr.count("epoch ") < 2:
        failures.append(f"no progress line per epoch on stderr: {stderr!r}")
    # The same run in this process, to evaluate the restored weights.
    problem = load_problem(path)
    outcome = train(problem, epochs=2)
    again = evaluate(problem, problem.params, problem.splits["validation"])
    if again["accuracy"] != outcome["validation_accuracy"]:
        failures.append(f"restored weights give validation accuracy {again['accuracy']}, "
                        f"the best epoch had {outcome['validation_accuracy']}")
    if outcome["test_accuracy"] != result["test_accuracy"]:
        failures.append(f"a second run of the same seed gives test accuracy {outcome['test_accuracy']}, "
                        f"not {result['test_accuracy']}")
    status, stdout, _ = call_main([path, "--epochs", "1"])
    if status != 0 or "test accuracy" not in stdout:
        failures.append(f"without --json: status {status}, stdout {stdout!r}")
    return failures, (f"2 epochs: best epoch {result['best_epoch']}, test accuracy {result['test_accuracy']:.3f}, "
                      f"AUC {result['test_macro_auc']:.3f}, {result['train_samples_per_second']:.0f} samples/s; "
                      "restored weights reproduce the best validation accuracy; same seed, same result")


def check_errors(tmp, path):
    """Problem files lacking tensors or keys, or holding bad values: exit status 2, named."""
    tensors, metadata = ref.read_safetensors(path)
    training = json.loads(metadata["training"])
    cases = {
        "'moe.w2', 'data.test'": (lambda t, m: (t.pop("moe.w2"), t.pop("data.test"))),
        "'batch_size'": (lambda t, m: m.update(training=json.dumps({k: v for k, v in training.items()
                                                                     if k != "batch_size"}))),
        "'training'": (lambda t, m: m.pop("training")),
        "'config'": (lambda t, m: m.pop("config")),
        "'data.observed'": (lambda t, m: t["data.observed"][3].zero_()),
        "'data.labels'": (lambda t, m: t["data.labels"][0:1].fill_(99)),
        "'data.validation'": (lambda t, m: t["data.validation"][0:1].fill_(-1)),
        "'encoder.1.weight'": (lambda t, m: t.update({"encoder.1.weight": t["encoder.1.weight"][1:]})),
        "'dropout'": (lambda t, m: m.update(training=json.dumps(dict(training, dropout=1.0)))),
    }
    failures = []
    for name, corrupt in cases.items():
        bad_tensors = {k: v.clone() for k, v in tensors.items()}
        bad_metadata = dict(metadata)
        corrupt(bad_tensors, bad_metadata)
        bad = os.path.join(tmp, "bad.safetensors")
        ref.write_safetensors(bad, bad_tensors, bad_metadata)
        status, _, stderr = call_main([bad, "--json"])
        if status != 2 or name not in stderr or "Traceback" in stderr:
            failures.append(f"{name}: exit status {status}, message {stderr.strip()!r}")
    status, _, stderr = call_main([os.path.join(tmp, "absent.safetensors")])
    if status != 2 or "absent.safetensors" not in stderr:
        failures.append(f"a missing file: exit status {status}, message {stderr.strip()!r}")
    return failures, f"{len(cases) + 1} bad files: status 2, the tensor or key named"


def selftest():
    """Runs every check; prints each and the summary line. Returns the exit status."""
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "problem.safetensors")
        example_problem(path, seed=2, missing_rate=0.4, samples=240, model=SELFTEST_MODEL,
                        training={"epochs": 2, "warmup_epochs": 1})
        problem = load_problem(path)
        results.append(("metrics",) + check_metrics())
        results.append(("best weights",) + check_best_weights())
        results.append(("epoch order",) + check_order(problem))
        results.append(("forward",) + check_against_reference(problem))
        results.append(("training",) + check_training(tmp, path))
        results.append(("errors",) + check_errors(tmp, path))
        results.append(("learning",) + check_learning(tmp))
    failed = [name for name, failures, _ in results if failures]
    for name, failures, detail in results:
        for failure in failures:
            print(f"FAIL {name}: {failure}")
        if not failures:
            print(f"ok   {name}: {detail}")
    print(f"selftest took {time.perf_counter() - start:.1f} s")
    print(f"train_reference: {len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


# ---- command line --------------------------------------------------------------------------------

def main(argv):
    """The command line: returns the exit status."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("problem", nargs="?", help="the problem file (flexmoe_train --export-problem)")
    parser.add_argument("--json", action="store_true", help="one JSON line on stdout")
    parser.add_argument("--epochs", type=int, help="instead of the problem's epochs")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="leave glibc's malloc as it is (default: keep freed memory, as the benchmarks do)")
    parser.add_argument("--selftest", action="store_true", help="check this script and exit")
    parser.add_argument("--example-problem", metavar="FILE",
                        help="write a problem file for testing (synthetic, or the CSV data of --data) and exit")
    parser.add_argument("--data", metavar="DIR", help="with --example-problem: a multi-view CSV directory")
    parser.add_argument("--missing-rate", type=float, default=0.3, help="with --example-problem (default 0.3)")
    parser.add_argument("--seed", type=int, default=1, help="with --example-problem (default 1)")
    args = parser.parse_args(argv)
    single_thread()
    if args.selftest:
        return selftest()
    if args.example_problem:
        example_problem(args.example_problem, seed=args.seed, missing_rate=args.missing_rate, data=args.data)
        return 0
    if not args.problem:
        parser.error("the problem file is required")
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    malloc = "glibc defaults" if args.glibc_defaults else keep_freed_memory()

    def log(line):
        print(line, file=sys.stderr, flush=True)

    try:
        problem = load_problem(args.problem)
    except (ProblemError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    cfg, tr = problem.cfg, problem.training
    counts = {split: len(rows) for split, rows in problem.splits.items()}
    log(f"{args.problem}: {len(problem.labels)} samples ({counts['train']} train, {counts['validation']} validation, "
        f"{counts['test']} test), {cfg.modalities} modalities, {cfg.classes} classes, missing rate "
        f"{tr.missing_rate:.2f}; torch {torch.__version__} float32, 1 thread, {blas_name()}, {malloc}")
    try:
        result = train(problem, args.epochs, log)
    except TrainingError as e:
        print(f"{PROG}: error: training stopped: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(dict({"impl": "torch"}, **result, torch=torch.__version__, blas=blas_name(), malloc=malloc)))
    else:
        print(f"best epoch {result['best_epoch']} (validation accuracy {result['validation_accuracy']:.3f})")
        print(f"test accuracy {result['test_accuracy']:.3f}  macro-F1 {result['test_macro_f1']:.3f}  "
              f"macro AUC {result['test_macro_auc']:.3f}")
        print(f"training {result['train_samples_per_second']:.0f} samples/s ({result['train_samples']} samples in "
              f"{result['train_seconds']:.1f} s, one thread); {result['seconds']:.1f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
