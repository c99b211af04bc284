#!/usr/bin/python3
"""PyTorch reference of the Flex-MoE model (one transformer layer with a sparse MoE; ConfSMoE's
confidence gate, zero imputation, imputed features and ConfSMoE's two-stage imputation as options),
llm.c style:
a C test writes the parameters and a batch into a safetensors file, this script runs the forward
and the backward in float64 (float32 with --float32), dropout off unless the batch gives its masks,
and writes the logits, the losses, a few activations and every parameter's gradient into another
file to compare against.

    tests/model_reference.py IN.safetensors OUT.safetensors [--float32]
    tests/model_reference.py --selftest [--seed N]

Files (safetensors): an 8-byte little-endian header length N, N bytes of JSON
{"name": {"dtype": "F32"|"F64"|"I32"|"I64", "shape": [...], "data_offsets": [begin, end]}, ...,
"__metadata__": {"key": "string"}}, then the little-endian data (offsets count from its start).

Input. __metadata__["config"] is a JSON object with the keys modalities (M), features ([F_m]),
patches, dim (d), heads, experts (E), top_k (k), hidden (H), classes (C), gate_loss_weight,
attention_residual, noise_epsilon and layernorm_eps, all required, and optionally (absent = the
first value, Flex-MoE's model; any other value is rejected):
    gate             "noisy" (FastMoE's noisy top-k gate) or "confidence" (ConfSMoE's gate)
    confidence_mode  "token" or "expert_mean" (the latter with gate "confidence" only)
    imputation       "bank" (the missing-modality bank), "zero" (zero tokens), "features"
                     (ConfSMoE's stage-1 imputation: the batch carries imputed features for the
                     missing modalities, encoded like observed ones) or "two_stage" (ConfSMoE's
                     two stages: "features", then stage 2 in the SMoE block, see Model)
and the optional number (absent = its default; any other value is rejected; accepted with every
imputation, used by "two_stage" only)
    impute_keep      in (0, 1], default 0.25: the fraction of stage 2's attention weights kept
Parameters (F32, dense weights stored [in, out]: y = x @ W + b, except the probes):
    encoder.{m}.weight [P_m, d], encoder.{m}.bias [d]     P_m = ceil(F_m / patches)
    bank [2^M - 1, M, patches, d]                          tokens of a missing modality
                                                           (imputation "bank" only)
    position [M * patches, d]
    attention.norm.{weight,bias} [d], attention.q.weight [d, d], attention.kv.weight [d, 2d]
        (K then V), attention.out.weight [d, d], attention.out.bias [d]
    moe.norm.{weight,bias} [d], moe.gate.weight [d, E],
    moe.noise.weight [d, E]                                (gate "noisy" only)
    moe.w1 [E, d, H], moe.b1 [E, H], moe.w2 [E, H, d], moe.b2 [E, d]
    moe.confidence.w [E, d], moe.confidence.b [E],         (gate "confidence" only, all six)
    moe.confidence.norm.{weight,bias} [d],
    moe.probe.weight [E, C, d], moe.probe.bias [E, C]      (expert e's probe: nn.Linear(d, C)
                                                           layout, logits = W_e h + b_e)
    moe.impute.q.weight [d, d], moe.impute.kv.weight [d, 2d]  (imputation "two_stage" only, all
        (K's columns then V's; no biases),                    four: stage 2's attention and its
    moe.impute.norm.{weight,bias} [d]                         LayerNorm)
    head.weight [M * d, C], head.bias [C]
A parameter of another gate or imputation is rejected, as is a missing one.
And the batch: input.features.{m} F32 [B, F_m] (rows of samples missing m are ignored, except with
imputation "features" or "two_stage": there they are m's imputed features, read, and must be
finite),
input.observed I32 [B, M] (0/1), input.labels I32 [B], and optionally input.class_weights F32 [C],
input.gate_noise F32 [M, B * patches, E] (the noisy gate's N(0, 1) draws; present = training gate;
ignored by the confidence gate), input.combination I32 [B] (checked against the index computed
from input.observed) and the dropout masks, each optional on its own (absent = no dropout there):
finite factors (0 or 1/(1-p) for rate p, any finite value accepted) multiplying a residual branch's
output elementwise before the residual:
    input.dropout.attention F32 [B, M * patches, d]   the attention's output a (after the output
                                                      projection and its bias): x + mask * a, or
                                                      mask * a without attention_residual
    input.dropout.moe F32 [M, B * patches, d]         chunk m's SMoE output y (rows b * patches + p,
                                                      as input.gate_noise): x + mask[m] * y

Model. A sample's combination index c numbers its set of observed modalities in Flex-MoE's order:
by size M, M-1, ..., 1, each size in lexicographic order (0 = all modalities). Each observed
modality's features, zero-padded to patches * P_m, become patches rows of P_m values, encoded by
its linear encoder into patches tokens; a missing modality takes bank[c, m] (imputation "bank"),
zeros (imputation "zero") or, with imputation "features" or "two_stage" (its stage 1), the tokens
of its input.features.{m} row computed exactly as an observed modality's (zero-padded into
patches, encoder.{m}, so the encoder's gradient has the missing rows' terms too); the observed
mask still marks it missing for everything else (c, the S-Router's targets, the token groups, and
stage 2). The M * patches tokens plus the position embedding go through pre-LN
multi-head attention (with the residual when attention_residual), then each modality's chunk of
tokens x through x + SMoE(u), u = LayerNorm(x; moe.norm) (each branch times its dropout mask when
given).
Gate "noisy": FastMoE's noisy top-k gate (noisy = clean + noise * (softplus(u W_noise) +
noise_epsilon) in training, clean = u W_gate), the top k experts GELU(u W1 + b1) W2 + b2 weighted by
the softmax of their noisy logits, and Flex-MoE's gate loss: the cross-entropy of the noisy logits
toward c mod E over the tokens of samples missing a modality, plus cv^2 of the experts' importance
and load per token group (full-modality samples, the others).
Gate "confidence" (ConfSMoE): each token's experts are the top k of its clean logits (no noise,
even in training); slot s = (token t, its i-th expert e_s) has the expert output
h_s = GELU(u_t W1[e_s] + b1[e_s]) W2[e_s] + b2[e_s],
    n_s = LayerNorm(h_s) without affine,
    a_s = sigmoid(moe.confidence.w[e_s] . n_s + moe.confidence.b[e_s])   (flexmoe.h's u_s),
    c_s = a_s ("token"), or the mean of a over every slot routed to e_s in the whole batch: all
          chunks (modalities), all samples and all k together ("expert_mean"),
    y_t = LayerNorm(u_t + sum_i c_{t,i} h_{t,i}; moe.confidence.norm.weight, .bias),
    p_s = softmax(moe.probe.weight[e_s] @ stop_gradient(h_s) + moe.probe.bias[e_s]),
    target_s = stop_gradient(p_s[label of t's sample]),
    confidence_loss = mean over all slots (chunks, samples, k) of (c_s - target_s)^2,
    probe_loss = mean over all slots of -log p_s[label],
and the gate loss is the S-Router term alone: the cross-entropy of the clean logits toward c mod E
over the tokens of samples missing a modality (no balance term), so the router learns from it
only (the top-k selection has no gradient) and no probe gradient reaches the experts;
noise_epsilon and input.gate_noise are unused.
Imputation "two_stage", stage 2 (ConfSMoE's cross-modal imputation in the SMoE block, after the
SMoE's output y and before its dropout mask and residual, with either gate): chunk m's row
r = b * patches + p has y[m, r] (the noisy gate's gate-weighted sum of its k expert outputs, or the
confidence gate's LayerNorm(u + sum c h)) and the expert outputs
h[m, r, i] = GELU(u W1[e_i] + b1[e_i]) W2[e_i] + b2[e_i], i = 0..k-1 in the routing order (best
first, as out.indices). For each sample b whose observed set O_b is not every modality:
    slots j = 0..n_b-1, n_b = |O_b| * patches * k: (m', p', i) for m' in O_b ascending, p' = 0..
          patches-1, i = 0..k-1 (m' outermost, i innermost); K_j = h_j Wk, V_j = h_j Wv, [Wk | Wv] =
          moe.impute.kv.weight (missing modalities' slots are never keys),
    for each missing modality m of b and patch p, row r = b * patches + p:
      q = (mean over i of h[m, r, i]) moe.impute.q.weight   (the token's own slots),
      a = softmax over j of (q . K_j) / sqrt(d),
      kept = the count = ceil(impute_keep * n_b) (clamped to [1, n_b]) largest a_j, ties toward
             the lower j; a constant for the gradient, which flows through the kept a_j (and the
             softmax into every score) only; the others are zeroed, not renormalised,
      z[m, r] = sum over kept j of a_j V_j,
      y'[m, r] = LayerNorm(y[m, r] + z[m, r]; moe.impute.norm.weight, .bias);
every other row keeps y' = y (samples with every modality observed are untouched), and the chunk
is x + y' (times its dropout mask). The gradient reaches h from the queries, the keys and the
values (and y), so the experts, the gate, the LayerNorms, the attention and the encoders.
Every LayerNorm has eps = layernorm_eps and GELU is erf's. Mean-pooling each chunk and a linear
head give the logits; loss = cross-entropy (class-weighted when given) + gate_loss_weight * the sum
of the chunks' gate losses (+ confidence_loss + probe_loss with gate "confidence").

Output (F64, or F32 with --float32): out.logits [B, C], out.loss, out.task_loss, out.gate_loss,
out.confidence_loss, out.probe_loss [] (the last two 0 with gate "noisy"), act.tokens,
act.attention, act.moe [B, M * patches, d] (the tokens after the embedding, the attention and the
SMoE), act.pooled [B, M * d], act.impute [M, B * patches, d] (stage 2's z in the rows of missing
modalities, rows as input.dropout.moe; 0 elsewhere, and everywhere without imputation
"two_stage"), out.impute_margin [] (impute_margin: how close stage 2's kept sets are to changing;
1 without "two_stage"), out.indices I32 [M, B * patches, k] (each chunk's experts, best first: by
noisy logit, or by clean logit with gate "confidence") and grad.<name> for every parameter of the input
(zeros where it gets no gradient);
__metadata__ holds the input's "config" and the "dtype"."""
import argparse
import contextlib
import ctypes
import dataclasses
import io
import itertools
import json
import math
import os
import struct
import sys
import tempfile
import time
from typing import Optional

import torch
import torch.nn.functional as F

if sys.byteorder != "little":
    sys.exit("model_reference.py: safetensors data is little-endian; this host is not")

DTYPES = {"F32": torch.float32, "F64": torch.float64, "I32": torch.int32, "I64": torch.int64}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
CV_EPSILON = 1e-10  # FastMoE's cv_squared: var / (mean^2 + 1e-10)


class InputError(Exception):
    """A malformed input file: reported on stderr with exit status 1."""


# ---- safetensors ---------------------------------------------------------------------------------

def read_safetensors(path):
    """The tensors (name -> tensor, in file order) and the __metadata__ dict of a safetensors file."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise InputError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (header_length,) = struct.unpack_from("<Q", blob)
    if 8 + header_length > len(blob):
        raise InputError(f"{path}: header length {header_length} runs past the end of the file")
    try:
        header = json.loads(blob[8:8 + header_length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: header is not UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: __metadata__ is not an object of strings")
    data = memoryview(blob)[8 + header_length:]
    tensors = {name: decode_tensor(path, name, entry, data) for name, entry in header.items()}
    return tensors, metadata


def decode_tensor(path, name, entry, data):
    """One tensor of a safetensors file from its header entry and the data section."""
    def bad(what):
        return InputError(f"{path}: tensor '{name}': {what}")

    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
        raise bad(f"dtype must be one of {', '.join(DTYPES)}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise bad(f"bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= len(data)):
        raise bad(f"bad data_offsets {offsets!r} (data section of {len(data)} bytes)")
    dtype = DTYPES[entry["dtype"]]
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, shape {shape} needs {nbytes}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    # A copy of its own: aligned, and writable as torch.frombuffer wants.
    return torch.frombuffer(bytearray(data[offsets[0]:offsets[1]]), dtype=dtype).reshape(shape)


def write_safetensors(path, tensors, metadata):
    """Writes name -> tensor (dtypes of DTYPES) and a dict of strings as a safetensors file. The
    widest elements come first, so that every tensor is aligned to its element size."""
    header = {"__metadata__": metadata}
    chunks, offset = [], 0
    for name, tensor in sorted(tensors.items(), key=lambda item: -item[1].element_size()):
        tensor = tensor.detach().cpu().contiguous()
        chunk = ctypes.string_at(tensor.data_ptr(), tensor.numel() * tensor.element_size())
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(chunk)]}
        chunks.append(chunk)
        offset += len(chunk)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


# ---- configuration and inputs --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    """The model's configuration: every key of __metadata__["config"], the last four optional."""
    modalities: int          # M
    features: tuple          # F_m per modality
    patches: int             # tokens per modality
    dim: int                 # d
    heads: int
    experts: int             # E
    top_k: int               # k
    hidden: int              # H, each expert's hidden width
    classes: int             # C
    gate_loss_weight: float
    attention_residual: bool
    noise_epsilon: float
    layernorm_eps: float
    gate: str = "noisy"                 # "noisy" or "confidence"
    confidence_mode: str = "token"      # "token" or "expert_mean" (gate "confidence")
    imputation: str = "bank"            # "bank", "zero", "features" or "two_stage"
    impute_keep: float = 0.25           # in (0, 1]: stage 2's kept fraction (imputation "two_stage")

    def patch_width(self, m):
        """P_m: the features of one patch of modality m."""
        return -(-self.features[m] // self.patches)


POSITIVE_INTS = ("modalities", "patches", "dim", "heads", "experts", "top_k", "hidden", "classes")
NON_NEGATIVE_NUMBERS = ("gate_loss_weight", "noise_epsilon", "layernorm_eps")
CHOICES = {"gate": ("noisy", "confidence"), "confidence_mode": ("token", "expert_mean"),
           "imputation": ("bank", "zero", "features", "two_stage")}  # the optional keys, their default first
# The optional numbers: name -> (default, the check of a given value, what it expects).
OPTIONAL_NUMBERS = {"impute_keep": (0.25, lambda v: 0 < v <= 1, "a number in (0, 1]")}
# The imputations that encode the batch's imputed features of missing modalities (stage 1).
FEATURE_IMPUTATIONS = ("features", "two_stage")


def is_positive_int(value):
    """An int (not a bool) >= 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def parse_config(metadata):
    """The Config of __metadata__["config"], every key checked."""
    if "config" not in metadata:
        raise InputError("__metadata__ has no 'config'")
    try:
        raw = json.loads(metadata["config"])
    except json.JSONDecodeError as e:
        raise InputError(f"config is not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise InputError("config is not a JSON object")
    keys = [field.name for field in dataclasses.fields(Config)]
    missing = [k for k in keys if k not in raw and k not in CHOICES and k not in OPTIONAL_NUMBERS]
    unknown = sorted(set(raw) - set(keys))
    if missing or unknown:
        raise InputError(f"config: missing keys {missing}, unknown keys {unknown}")

    def bad(key, expected):
        return InputError(f"config '{key}' is {raw[key]!r}, expected {expected}")

    for key in POSITIVE_INTS:
        if not is_positive_int(raw[key]):
            raise bad(key, "a positive integer")
    for key in NON_NEGATIVE_NUMBERS:
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise bad(key, "a finite number >= 0")
    if not isinstance(raw["attention_residual"], bool):
        raise bad("attention_residual", "true or false")
    features = raw["features"]
    if not (isinstance(features, list) and len(features) == raw["modalities"]
            and all(is_positive_int(f) for f in features)):
        raise bad("features", f"a list of {raw['modalities']} positive integers")
    if raw["dim"] % raw["heads"]:
        raise bad("heads", f"a divisor of dim {raw['dim']}")
    if raw["top_k"] > raw["experts"]:
        raise bad("top_k", f"at most experts ({raw['experts']})")
    for key, values in CHOICES.items():
        if key in raw and (not isinstance(raw[key], str) or raw[key] not in values):
            raise bad(key, " or ".join(f'"{v}"' for v in values))
    numbers = {}
    for key, (default, valid, expected) in OPTIONAL_NUMBERS.items():
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
            raise bad(key, expected)
        numbers[key] = float(value)
    if raw.get("confidence_mode", "token") != "token" and raw.get("gate", "noisy") != "confidence":
        raise bad("confidence_mode", '"token" with gate "noisy" ("expert_mean" needs gate "confidence")')
    return Config(**dict(raw, features=tuple(features), **numbers))


def all_parameter_shapes(cfg):
    """name -> (shape, the option that has it or None for every configuration) of every parameter
    of the model's variants, in the order of the documentation."""
    M, d, E, H, C = cfg.modalities, cfg.dim, cfg.experts, cfg.hidden, cfg.classes
    shapes = {}
    for m in range(M):
        shapes[f"encoder.{m}.weight"] = ((cfg.patch_width(m), d), None)
        shapes[f"encoder.{m}.bias"] = ((d,), None)
    bank, noisy, confidence = ("imputation", "bank"), ("gate", "noisy"), ("gate", "confidence")
    two_stage = ("imputation", "two_stage")
    shapes.update({
        "bank": ((2 ** M - 1, M, cfg.patches, d), bank),
        "position": ((M * cfg.patches, d), None),
        "attention.norm.weight": ((d,), None), "attention.norm.bias": ((d,), None),
        "attention.q.weight": ((d, d), None), "attention.kv.weight": ((d, 2 * d), None),
        "attention.out.weight": ((d, d), None), "attention.out.bias": ((d,), None),
        "moe.norm.weight": ((d,), None), "moe.norm.bias": ((d,), None),
        "moe.gate.weight": ((d, E), None), "moe.noise.weight": ((d, E), noisy),
        "moe.w1": ((E, d, H), None), "moe.b1": ((E, H), None), "moe.w2": ((E, H, d), None),
        "moe.b2": ((E, d), None),
        "moe.confidence.w": ((E, d), confidence), "moe.confidence.b": ((E,), confidence),
        "moe.confidence.norm.weight": ((d,), confidence), "moe.confidence.norm.bias": ((d,), confidence),
        "moe.probe.weight": ((E, C, d), confidence), "moe.probe.bias": ((E, C), confidence),
        "moe.impute.q.weight": ((d, d), two_stage), "moe.impute.kv.weight": ((d, 2 * d), two_stage),
        "moe.impute.norm.weight": ((d,), two_stage), "moe.impute.norm.bias": ((d,), two_stage),
        "head.weight": ((M * d, C), None), "head.bias": ((C,), None),
    })
    return shapes


def parameter_shapes(cfg):
    """The name and shape of every parameter of cfg's model, in the order of the documentation."""
    return {name: shape for name, (shape, option) in all_parameter_shapes(cfg).items()
            if option is None or getattr(cfg, option[0]) == option[1]}


def parameter_notes(cfg):
    """name -> why, for the parameters that only some configurations have: the error messages'
    explanation of a missing or an unexpected one."""
    notes = {}
    for name, (_, option) in all_parameter_shapes(cfg).items():
        if option is not None:
            key, value = option
            notes[name] = (f'(config {key} "{getattr(cfg, key)}": '
                           + ("required" if getattr(cfg, key) == value else f'only {key} "{value}" has it') + ")")
    return notes


def input_specs(cfg, batch_size):
    """name -> (dtype, shape, required) of every tensor an input file may hold."""
    B, M = batch_size, cfg.modalities
    specs = {name: (torch.float32, shape, True) for name, shape in parameter_shapes(cfg).items()}
    for m in range(M):
        specs[f"input.features.{m}"] = (torch.float32, (B, cfg.features[m]), True)
    specs.update({
        "input.observed": (torch.int32, (B, M), True),
        "input.labels": (torch.int32, (B,), True),
        "input.class_weights": (torch.float32, (cfg.classes,), False),
        "input.gate_noise": (torch.float32, (M, B * cfg.patches, cfg.experts), False),
        "input.combination": (torch.int32, (B,), False),
        "input.dropout.attention": (torch.float32, (B, M * cfg.patches, cfg.dim), False),
        "input.dropout.moe": (torch.float32, (M, B * cfg.patches, cfg.dim), False),
    })
    return specs


DROPOUT_MASKS = ("input.dropout.attention", "input.dropout.moe")


def check_tensors(tensors, specs, notes=None):
    """Every required tensor present, none unknown, each with its dtype and shape; notes (name ->
    text) explain a missing or an unknown tensor."""
    notes = notes or {}

    def names(listed):
        return "s" * (len(listed) > 1) + " " + ", ".join(
            f"'{n}'" + (" " + notes[n] if n in notes else "") for n in listed)

    missing = [name for name, (_, _, required) in specs.items() if required and name not in tensors]
    if missing:
        raise InputError("missing tensor" + names(missing))
    unknown = [name for name in tensors if name not in specs]
    if unknown:
        raise InputError("unexpected tensor" + names(unknown))
    for name, tensor in tensors.items():
        dtype, shape, _ = specs[name]
        if tensor.dtype != dtype:
            raise InputError(f"tensor '{name}' is {DTYPE_NAMES[tensor.dtype]}, expected {DTYPE_NAMES[dtype]}")
        if tuple(tensor.shape) != shape:
            raise InputError(f"tensor '{name}' has shape {list(tensor.shape)}, expected {list(shape)}")


def combinations(modalities):
    """Flex-MoE's modality combinations, index 0 = all modalities: by size M, M-1, ..., 1, each size
    in lexicographic order of the modality positions (2^M - 1 tuples)."""
    return [subset for size in range(modalities, 0, -1)
            for subset in itertools.combinations(range(modalities), size)]


def combination_indices(observed):
    """Each sample's combination index from its [B, M] 0/1 observed row."""
    index = {subset: c for c, subset in enumerate(combinations(observed.shape[1]))}
    return torch.tensor([index[tuple(row.nonzero().flatten().tolist())] for row in observed], dtype=torch.long)


@dataclasses.dataclass
class Batch:
    """A checked batch, floating-point tensors in the compute dtype."""
    features: list                             # [B, F_m] per modality
    observed: torch.Tensor                     # [B, M] bool
    combination: torch.Tensor                  # [B] long
    labels: torch.Tensor                       # [B] long
    class_weights: Optional[torch.Tensor]      # [C]; None: unweighted
    gate_noise: Optional[torch.Tensor]         # [M, B * patches, E]; None: the inference gate
    dropout_attention: Optional[torch.Tensor]  # [B, M * patches, d]; None: no attention dropout
    dropout_moe: Optional[torch.Tensor]        # [M, B * patches, d]; None: no SMoE dropout


def check_batch_values(cfg, tensors):
    """Checks the batch's integer contents (0/1 observed rows with at least one modality, labels in
    range, the given combination indices if any) and returns each sample's combination index."""
    observed, labels = tensors["input.observed"], tensors["input.labels"]
    for b, row in enumerate(observed.tolist()):
        if any(v not in (0, 1) for v in row):
            raise InputError(f"tensor 'input.observed': sample {b} is {row}, expected 0 or 1 per modality")
        if not any(row):
            raise InputError(f"tensor 'input.observed': sample {b} has no observed modality")
    for b, label in enumerate(labels.tolist()):
        if not 0 <= label < cfg.classes:
            raise InputError(f"tensor 'input.labels': sample {b} has label {label}, outside [0, {cfg.classes})")
    computed = combination_indices(observed.bool())
    if "input.combination" in tensors:
        for b, (given, expected) in enumerate(zip(tensors["input.combination"].tolist(), computed.tolist())):
            if given != expected:
                raise InputError(f"tensor 'input.combination': sample {b} is {given}, but its observed "
                                 f"modalities {combinations(cfg.modalities)[expected]} are combination {expected}")
    return computed


def check_finite(tensors, names):
    """Every value of the named tensors that are present finite."""
    for name in names:
        if name in tensors:
            bad = (~torch.isfinite(tensors[name])).nonzero()
            if len(bad):
                entry = bad[0].tolist()
                raise InputError(f"tensor '{name}': entry {entry} is {tensors[name][tuple(entry)].item()}, "
                                 "expected a finite value")


def check_imputed_features(cfg, tensors):
    """With imputation "features" or "two_stage": every value of the rows of missing modalities (the imputed
    features, encoded like observed ones) finite."""
    observed = tensors["input.observed"].bool()
    for m in range(cfg.modalities):
        name = f"input.features.{m}"
        bad = (~torch.isfinite(tensors[name]) & ~observed[:, m, None]).nonzero()
        if len(bad):
            entry = bad[0].tolist()
            raise InputError(f"tensor '{name}': entry {entry} (sample {entry[0]}, missing modality {m}) is "
                             f"{tensors[name][tuple(entry)].item()}, expected a finite value: imputation "
                             f'"{cfg.imputation}" encodes the imputed features of missing modalities')


def load_problem(path, dtype):
    """The Config, the config's JSON text, the parameters (name -> tensor in dtype) and the Batch of
    an input file, every tensor and value checked."""
    tensors, metadata = read_safetensors(path)
    cfg = parse_config(metadata)
    observed = tensors.get("input.observed")
    if observed is None:
        raise InputError("missing tensor 'input.observed'")
    if observed.dim() != 2 or observed.shape[0] < 1:
        raise InputError(f"tensor 'input.observed' has shape {list(observed.shape)}, expected [B, {cfg.modalities}]")
    check_tensors(tensors, input_specs(cfg, observed.shape[0]), parameter_notes(cfg))
    combination = check_batch_values(cfg, tensors)
    check_finite(tensors, DROPOUT_MASKS)
    if cfg.imputation in FEATURE_IMPUTATIONS:
        check_imputed_features(cfg, tensors)

    def optional(name):
        return tensors[name].to(dtype) if name in tensors else None

    params = {name: tensors[name].to(dtype) for name in parameter_shapes(cfg)}
    batch = Batch(features=[tensors[f"input.features.{m}"].to(dtype) for m in range(cfg.modalities)],
                  observed=observed.bool(), combination=combination,
                  labels=tensors["input.labels"].long(), class_weights=optional("input.class_weights"),
                  gate_noise=optional("input.gate_noise"),
                  dropout_attention=optional("input.dropout.attention"), dropout_moe=optional("input.dropout.moe"))
    return cfg, metadata["config"], params, batch


# ---- the model -----------------------------------------------------------------------------------

def embed(cfg, p, batch):
    """[B, M * patches, d]: each modality's patches encoded (when missing: its bank tokens, zeros
    with imputation "zero", or its imputed features encoded like observed ones with imputation
    "features" or "two_stage"), plus the position embedding."""
    blocks = []
    for m, features in enumerate(batch.features):
        observed = batch.observed[:, m]
        if cfg.imputation not in FEATURE_IMPUTATIONS:
            # Rows of missing modalities may hold anything (NaN included): zeroed, so no 0 * NaN in dW.
            features = torch.where(observed[:, None], features, torch.zeros_like(features))
        width = cfg.patch_width(m)
        patches = F.pad(features, (0, cfg.patches * width - features.shape[1])).view(-1, cfg.patches, width)
        tokens = patches @ p[f"encoder.{m}.weight"] + p[f"encoder.{m}.bias"]
        if cfg.imputation in FEATURE_IMPUTATIONS:
            blocks.append(tokens)  # every row encoded, the imputed ones as the observed
        else:
            missing = p["bank"][batch.combination, m] if cfg.imputation == "bank" else torch.zeros_like(tokens)
            blocks.append(torch.where(observed[:, None, None], tokens, missing))
    return torch.cat(blocks, dim=1) + p["position"]


def apply_dropout(x, mask):
    """x times the dropout mask's factors; x itself when there is no mask."""
    return x if mask is None else mask * x


def attention(cfg, p, x, mask):
    """Pre-LN multi-head self-attention over every token of a sample, its output times the dropout
    mask (None: none), with the residual when cfg.attention_residual."""
    B, T, d = x.shape
    width = d // cfg.heads
    h = F.layer_norm(x, (d,), p["attention.norm.weight"], p["attention.norm.bias"], cfg.layernorm_eps)
    k, v = (h @ p["attention.kv.weight"]).split(d, dim=-1)

    def split_heads(t):
        return t.view(B, T, cfg.heads, width).transpose(1, 2)

    scores = split_heads(h @ p["attention.q.weight"]) @ split_heads(k).transpose(-1, -2) / math.sqrt(width)
    out = (scores.softmax(dim=-1) @ split_heads(v)).transpose(1, 2).reshape(B, T, d)
    a = apply_dropout(out @ p["attention.out.weight"] + p["attention.out.bias"], mask)
    return x + a if cfg.attention_residual else a


def experts(p, u, indices, gates, slot_outputs=False):
    """(y, h): y = sum_i gates[:, i] * expert_{indices[:, i]}(u), each expert GELU(u W1 + b1) W2 + b2
    run on its own rows only; with slot_outputs h [rows, k, d] the expert outputs (expert_outputs's),
    else None."""
    y = torch.zeros_like(u)
    h = u.new_zeros(indices.shape + (u.shape[1],)) if slot_outputs else None
    for e in range(p["moe.w1"].shape[0]):
        rows, slots = (indices == e).nonzero(as_tuple=True)
        if rows.numel():
            hidden = F.gelu(u[rows] @ p["moe.w1"][e] + p["moe.b1"][e])
            out = hidden @ p["moe.w2"][e] + p["moe.b2"][e]
            y = y.index_add(0, rows, gates[rows, slots, None] * out)
            if slot_outputs:
                h = h.index_put((rows, slots), out)
    return y, h


def sum_by_group(group, per_row):
    """[2, E]: the rows of per_row [rows, E] summed per token group (0 or 1)."""
    return torch.zeros(2, per_row.shape[1], dtype=per_row.dtype).index_add(0, group, per_row)


def probability_in_top_k(clean, noisy, std, top_values, k):
    """FastMoE's differentiable load per row and expert: P(e in the top k) when e's noise is drawn
    again, the others' noisy logits fixed: Phi((clean_e - theta) / std_e), theta the (k+1)-th noisy
    logit if e is in the top k (noisy_e above it), else the k-th. As in FastMoE, the gradient also
    flows into theta (the noisy logit of another expert)."""
    threshold_if_in, threshold_if_out = top_values[:, k:k + 1], top_values[:, k - 1:k]
    threshold = torch.where(noisy > threshold_if_in, threshold_if_in, threshold_if_out)
    return 0.5 * torch.erfc(-(clean - threshold) / std / math.sqrt(2.0))


def cv_squared(v):
    """Squared coefficient of variation over the experts (unbiased variance), 0 for one expert."""
    if v.numel() == 1:
        return torch.zeros((), dtype=v.dtype)
    return v.var(unbiased=True) / (v.mean() ** 2 + CV_EPSILON)


def router_cross_entropy(logits, combination):
    """Flex-MoE's S-Router term: mean cross-entropy of the routing logits toward combination mod E
    over the rows of samples missing a modality (combination > 0); 0 when there are none."""
    rows = combination > 0
    if not rows.any():
        return torch.zeros((), dtype=logits.dtype)
    return F.cross_entropy(logits[rows], combination[rows] % logits.shape[1])


def smoe(cfg, p, u, combination, noise, slot_outputs=False):
    """The SMoE on rows u [rows, d] with FastMoE's noisy top-k gate (the inference gate when noise
    is None). Returns y [rows, d], the gate loss (S-Router cross-entropy + the G-Router's cv^2 of
    importance and load in each token group: 0 = full-modality samples, 1 = the others), the
    top min(k + 1, E) experts of each row, best first (the first k are the routing), and with
    slot_outputs the expert outputs h [rows, k, d] in the routing order (else None)."""
    k, E = cfg.top_k, cfg.experts
    clean = u @ p["moe.gate.weight"]
    if noise is None:
        noisy, std = clean, None
    else:
        std = F.softplus(u @ p["moe.noise.weight"]) + cfg.noise_epsilon
        noisy = clean + noise * std
    top_values, top_indices = noisy.topk(min(k + 1, E), dim=1)
    gates = top_values[:, :k].softmax(dim=1)
    indices = top_indices[:, :k]
    y, h = experts(p, u, indices, gates, slot_outputs)

    group = (combination > 0).long()
    importance = torch.zeros(2, E, dtype=u.dtype).index_put(
        (group[:, None].expand_as(indices), indices), gates, accumulate=True)
    if noise is not None and k < E:
        load = sum_by_group(group, probability_in_top_k(clean, noisy, std, top_values, k))
    else:
        load = sum_by_group(group, F.one_hot(indices, E).sum(dim=1).to(u.dtype))
    balance = sum(cv_squared(importance[g]) + cv_squared(load[g]) for g in range(2))
    return y, router_cross_entropy(noisy, combination) + balance, top_indices, h


def expert_outputs(p, u, indices):
    """[rows, k, d]: h[r, i] = expert_{indices[r, i]}(u[r]), GELU(u W1 + b1) W2 + b2, each expert
    run on its own rows only."""
    h = u.new_zeros(indices.shape + (u.shape[1],))
    for e in range(p["moe.w1"].shape[0]):
        rows, slots = (indices == e).nonzero(as_tuple=True)
        if rows.numel():
            hidden = F.gelu(u[rows] @ p["moe.w1"][e] + p["moe.b1"][e])
            h = h.index_put((rows, slots), hidden @ p["moe.w2"][e] + p["moe.b2"][e])
    return h


def confidence_combine(cfg, p, u, indices, labels, frozen=None):
    """ConfSMoE's combination on every row of the batch at once (all chunks: the expert means span
    them): u [rows, d] the SMoE's inputs, indices [rows, k] their experts, labels [rows] their
    samples' labels. Returns y [rows, d], the confidence loss, the probe loss and the expert
    outputs h [rows, k, d].
    frozen (a dict; None: none) is for the finite differences of a loss with stop-gradients: when
    it has no record of them, the detached terms (the probe's input h and the targets) are recorded
    into it; when it has, they are taken from it instead of computed, so that the loss's derivative
    is the gradient that backward gives."""
    d, E, eps = cfg.dim, cfg.experts, cfg.layernorm_eps
    h = expert_outputs(p, u, indices)
    n = F.layer_norm(h, (d,), None, None, eps)
    token_confidence = torch.sigmoid((n * p["moe.confidence.w"][indices]).sum(dim=-1)
                                     + p["moe.confidence.b"][indices])
    if cfg.confidence_mode == "expert_mean":
        routed = F.one_hot(indices, E).to(u.dtype)                          # [rows, k, E]
        sums = (routed * token_confidence[..., None]).sum(dim=(0, 1))
        counts = routed.sum(dim=(0, 1)).clamp(min=1.0)                      # unused experts: not indexed
        confidence = (sums / counts)[indices]
    else:
        confidence = token_confidence
    y = F.layer_norm(u + (confidence[..., None] * h).sum(dim=1), (d,),
                     p["moe.confidence.norm.weight"], p["moe.confidence.norm.bias"], eps)
    recorded = frozen is not None and "target" in frozen
    probe_input = frozen["probe_input"] if recorded else h.detach()         # no probe gradient into h
    probe_logits = (p["moe.probe.weight"][indices] @ probe_input[..., None]).squeeze(-1) + p["moe.probe.bias"][indices]
    log_p = probe_logits.log_softmax(dim=-1).gather(-1, labels[:, None, None].expand(-1, indices.shape[1], 1))
    log_p = log_p.squeeze(-1)                                               # [rows, k]: log p_s[label]
    target = frozen["target"] if recorded else log_p.exp().detach()         # no gradient through the target
    if frozen is not None and not recorded:
        frozen.update(probe_input=probe_input.detach().clone(), target=target.clone())
    confidence_loss = ((confidence - target) ** 2).mean()
    return y, confidence_loss, -log_p.mean(), h


def chunk(x, m, patches):
    """Modality m's chunk of the tokens x [B, M * patches, d] as rows [B * patches, d] (row
    b * patches + p)."""
    return x[:, m * patches:(m + 1) * patches].reshape(-1, x.shape[2])


def smoe_layer(cfg, p, x, batch, frozen=None):
    """The SMoE of every modality's chunk of x [B, M * patches, d] (the attention's output), before
    its dropout mask and residual: (y [M, B * patches, d], h, gate_losses (one per chunk), ranking
    [M, B * patches, min(k + 1, E)] (best first; the first k are the routing), confidence_loss,
    probe_loss (None with gate "noisy")). h [M, B * patches, k, d] are the expert outputs in the
    routing order with imputation "two_stage" (stage 2's input), None otherwise.
    frozen: confidence_combine's."""
    B, P, d, k = batch.observed.shape[0], cfg.patches, cfg.dim, cfg.top_k
    row_combination = batch.combination.repeat_interleave(P)
    ys, hs, gate_losses, rankings = [], [], [], []
    confidence_loss = probe_loss = h = None
    if cfg.gate == "noisy":
        for m in range(cfg.modalities):
            u = F.layer_norm(chunk(x, m, P), (d,), p["moe.norm.weight"], p["moe.norm.bias"], cfg.layernorm_eps)
            noise = None if batch.gate_noise is None else batch.gate_noise[m]
            y, gate_loss, ranking, chunk_h = smoe(cfg, p, u, row_combination, noise, cfg.imputation == "two_stage")
            if chunk_h is not None:
                hs.append(chunk_h)
            ys.append(y)
            gate_losses.append(gate_loss)
            rankings.append(ranking)
        ys, h = torch.stack(ys), torch.stack(hs) if hs else None
    else:
        # ConfSMoE: every chunk routed by its clean logits, then combined together (rows m * B * P +
        # b * P + p, the C model's one layer call over all chunks).
        us = []
        for m in range(cfg.modalities):
            us.append(F.layer_norm(chunk(x, m, P), (d,), p["moe.norm.weight"], p["moe.norm.bias"], cfg.layernorm_eps))
            clean = us[-1] @ p["moe.gate.weight"]
            rankings.append(clean.topk(min(k + 1, cfg.experts), dim=1)[1])
            gate_losses.append(router_cross_entropy(clean, row_combination))
        ys, confidence_loss, probe_loss, h = confidence_combine(
            cfg, p, torch.cat(us), torch.cat([r[:, :k] for r in rankings]),
            batch.labels.repeat_interleave(P).repeat(cfg.modalities), frozen)
        ys = ys.view(cfg.modalities, B * P, d)
        h = h.view(cfg.modalities, B * P, k, d) if cfg.imputation == "two_stage" else None
    return ys, h, gate_losses, torch.stack(rankings), confidence_loss, probe_loss


def impute_margin(weights, kept):
    """How far the kept sets are from changing, over the rows that drop a weight: the smallest
    relative gap between the weights just kept and those just dropped, at most 1 (1 when no row
    drops any). Exactly equal weights come from identical keys (zero-padded patches encode alike),
    which are interchangeable: when the cut falls inside such a group, the gaps are those around the
    group. A float32 model keeps what this reference keeps when the margin is well above float32's
    rounding of the weights."""
    margin = 1.0
    for row, row_kept in zip(weights.detach().tolist(), kept.tolist()):
        if all(row_kept):
            continue
        cut = min(w for w, k in zip(row, row_kept) if k)
        if max(w for w, k in zip(row, row_kept) if not k) < cut:
            above, below = cut, max(w for w, k in zip(row, row_kept) if not k)
        else:  # the cut inside a group of equal weights: the group's distance from its neighbours
            above = min((w for w in row if w > cut), default=None)
            below = max((w for w in row if w < cut), default=None)
            margin = min(margin, (above - cut) / above if above is not None else 1.0)
            above = cut
        if below is not None:
            margin = min(margin, (above - below) / above)
    return margin


def impute_stage_two(cfg, p, y, h, observed, frozen=None, margins=None):
    """ConfSMoE's stage 2 (imputation "two_stage"): y [M, B * patches, d] the SMoE's outputs, h
    [M, B * patches, k, d] their expert outputs in the routing order, observed [B, M] the mask.
    Returns (y' [M, B * patches, d], z [M, B * patches, d]): for each missing modality m of a sample
    b and patch p, z the kept part of the attention of the query (the mean of the token's own k
    expert outputs) @ moe.impute.q.weight over the keys and values h @ moe.impute.kv.weight of b's
    observed modalities' slots (m', p', i nested in that order), the ceil(impute_keep * n_b)
    largest weights kept (ties toward the lower slot), not renormalised, and y' = LayerNorm(y + z;
    moe.impute.norm); y' = y and z = 0 in every other row.
    frozen (a dict; None: none): the finite differences' record of the kept sets, as
    confidence_combine's: recorded into it when it has none, taken from it when it has.
    margins (a list; None: none) receives each sample's impute_margin."""
    M, rows, k, d = h.shape
    B = observed.shape[0]
    P = rows // B
    recorded = frozen is not None and "impute_kept" in frozen
    kept_sets = frozen["impute_kept"] if recorded else {}
    w_query = p["moe.impute.q.weight"]
    w_key, w_value = p["moe.impute.kv.weight"].split(d, dim=1)
    chunks, row_indices, zs = [], [], []
    for b, row in enumerate(observed.tolist()):
        present = [m for m in range(M) if row[m]]
        absent = [m for m in range(M) if not row[m]]
        if not absent:
            continue
        block = slice(b * P, (b + 1) * P)
        slots = h[present, block].reshape(-1, d)                   # [n_b, d]: (m', p', i), i innermost
        queries = h[absent, block].mean(dim=2).reshape(-1, d) @ w_query   # [|absent| * P, d]: (m, p)
        weights = (queries @ (slots @ w_key).T / math.sqrt(d)).softmax(dim=-1)
        if recorded:
            kept = kept_sets[b]
        else:
            count = min(max(math.ceil(cfg.impute_keep * slots.shape[0]), 1), slots.shape[0])
            best = weights.detach().sort(dim=-1, descending=True, stable=True).indices[:, :count]
            kept = torch.zeros(weights.shape, dtype=torch.bool).scatter(1, best, True)
            kept_sets[b] = kept
        if margins is not None:
            margins.append(impute_margin(weights, kept))
        zs.append((weights * kept) @ (slots @ w_value))
        chunks += [m for m in absent for _ in range(P)]
        row_indices += list(range(b * P, (b + 1) * P)) * len(absent)
    if frozen is not None and not recorded:
        frozen["impute_kept"] = kept_sets
    if not zs:
        return y, torch.zeros_like(y)
    where = (torch.tensor(chunks), torch.tensor(row_indices))
    z = torch.cat(zs)
    imputed = F.layer_norm(y[where] + z, (d,), p["moe.impute.norm.weight"], p["moe.impute.norm.bias"],
                           cfg.layernorm_eps)
    return y.index_put(where, imputed), torch.zeros_like(y).index_put(where, z)


def forward(cfg, p, batch, frozen=None):
    """The model on a batch: (outputs, ranking), outputs the named tensors of the output file
    except the gradients, ranking [M, B * patches, min(k + 1, E)] each chunk's experts, best first
    (by noisy logit, or by clean logit with gate "confidence"; the first k are the routing).
    frozen: confidence_combine's and impute_stage_two's (the finite differences' record of the
    detached terms and of the kept sets)."""
    B, P, d = batch.observed.shape[0], cfg.patches, cfg.dim
    tokens = embed(cfg, p, batch)
    x = attention(cfg, p, tokens, batch.dropout_attention)
    ys, h, gate_losses, ranking, confidence_loss, probe_loss = smoe_layer(cfg, p, x, batch, frozen)
    if cfg.imputation == "two_stage":
        margins = []
        ys, imputed = impute_stage_two(cfg, p, ys, h, batch.observed, frozen, margins)
        margin = min(margins, default=1.0)
    else:
        imputed, margin = torch.zeros_like(ys), 1.0
    chunks = []
    for m in range(cfg.modalities):
        mask = None if batch.dropout_moe is None else batch.dropout_moe[m]
        chunks.append((chunk(x, m, P) + apply_dropout(ys[m], mask)).view(B, P, d))
    moe = torch.cat(chunks, dim=1)
    pooled = moe.view(B, cfg.modalities, P, d).mean(dim=2).reshape(B, cfg.modalities * d)
    logits = pooled @ p["head.weight"] + p["head.bias"]
    task_loss = F.cross_entropy(logits, batch.labels, weight=batch.class_weights)
    gate_loss = sum(gate_losses)
    loss = task_loss + cfg.gate_loss_weight * gate_loss
    if cfg.gate == "confidence":
        loss = loss + confidence_loss + probe_loss
    else:
        confidence_loss = probe_loss = torch.zeros((), dtype=logits.dtype)
    outputs = {
        "out.logits": logits, "out.loss": loss,
        "out.task_loss": task_loss, "out.gate_loss": gate_loss,
        "out.confidence_loss": confidence_loss, "out.probe_loss": probe_loss,
        "act.tokens": tokens, "act.attention": x, "act.moe": moe, "act.pooled": pooled,
        "act.impute": imputed, "out.indices": ranking[..., :cfg.top_k].int(),
        "out.impute_margin": torch.tensor(margin, dtype=logits.dtype),
    }
    return outputs, ranking


def run(in_path, out_path, dtype):
    """Reads an input file, runs the forward and the backward, writes the output file."""
    cfg, config_text, params, batch = load_problem(in_path, dtype)
    for tensor in params.values():
        tensor.requires_grad_(True)
    outputs, _ = forward(cfg, params, batch)
    outputs["out.loss"].backward()
    tensors = {name: tensor.detach() for name, tensor in outputs.items()}
    for name, tensor in params.items():
        tensors["grad." + name] = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
    write_safetensors(out_path, tensors, {"config": config_text, "dtype": DTYPE_NAMES[dtype]})


# ---- --selftest ----------------------------------------------------------------------------------

SELFTEST_CONFIG = {"modalities": 3, "features": [5, 20, 33], "patches": 16, "dim": 16, "heads": 4,
                   "experts": 4, "top_k": 2, "hidden": 32, "classes": 3, "gate_loss_weight": 0.01,
                   "attention_residual": True, "noise_epsilon": 0.01, "layernorm_eps": 1e-5}
# ConfSMoE's variants checked by finite differences, each against the model its options name.
CONFIDENCE_CONFIGS = {
    "confidence gate, token, zero imputation":
        dict(SELFTEST_CONFIG, gate="confidence", confidence_mode="token", imputation="zero"),
    "confidence gate, expert_mean, bank":
        dict(SELFTEST_CONFIG, gate="confidence", confidence_mode="expert_mean", imputation="bank",
             gate_loss_weight=0.3),
    "confidence gate, token, features imputation":
        dict(SELFTEST_CONFIG, gate="confidence", confidence_mode="token", imputation="features",
             gate_loss_weight=0.3),
}
# The noisy gate with ConfSMoE's stage-1 imputation (imputed features of the missing modalities).
FEATURES_CONFIG = dict(SELFTEST_CONFIG, imputation="features", gate_loss_weight=0.3)
# ConfSMoE's two stages with either gate, each checked by finite differences (impute_keep 0.3: a count
# ceil(0.3 * n_b) that rounds up, 20 of 64 and 10 of 32 keys; the default 0.25 with the other gate).
TWO_STAGE_CONFIGS = {
    "noisy gate, two_stage imputation":
        dict(SELFTEST_CONFIG, imputation="two_stage", impute_keep=0.3, gate_loss_weight=0.3),
    "confidence gate, token, two_stage imputation":
        dict(SELFTEST_CONFIG, gate="confidence", confidence_mode="token", imputation="two_stage",
             gate_loss_weight=0.3),
}
# One full sample, two with one modality missing, two with one observed (combinations 0, 2, 5, 6, 1):
# stage 2 has samples with two observed modalities (64 keys) and with one (32 keys).
SELFTEST_OBSERVED = [[1, 1, 1], [1, 0, 1], [0, 1, 0], [0, 0, 1], [1, 1, 0]]
FD_STEP = 1e-6
FD_TOLERANCE = 1e-6      # of each tensor's largest gradient
FD_ENTRIES = 6           # perturbed entries per parameter
SELFTEST_DROPOUT = 0.5   # the rate p of the selftest's dropout masks
# Scaled by 1/sqrt(fan-in) in the selftest's problem (the others are N(0, 0.25)).
DENSE_WEIGHTS = ("attention.q.weight", "attention.kv.weight", "attention.out.weight", "moe.gate.weight",
                 "moe.noise.weight", "moe.w1", "moe.w2", "head.weight", "moe.impute.q.weight",
                 "moe.impute.kv.weight")
# Likewise, their fan-in in their last dimension ([out, in] or [E, out, in] layouts).
DENSE_WEIGHTS_OUT_IN = ("moe.confidence.w", "moe.probe.weight")


def selftest_problem(generator, training, dropout=False, config=None):
    """Random F32 parameters and a batch of config (default SELFTEST_CONFIG) as name -> tensor: NaN
    features where a modality is missing (random imputed ones with imputation "features" or
    "two_stage"), class weights, the combination indices, when training gate noise and, with
    dropout, both dropout masks (0 or 1/(1-p), p = SELFTEST_DROPOUT)."""
    cfg = parse_config({"config": json.dumps(config or SELFTEST_CONFIG)})

    def normal(*shape, scale=1.0):
        return torch.randn(shape, generator=generator) * scale

    tensors = {name: normal(*shape, scale=0.5) for name, shape in parameter_shapes(cfg).items()}
    for name in DENSE_WEIGHTS:
        if name in tensors:
            tensors[name] *= 2.0 * tensors[name].shape[-2] ** -0.5
    for name in DENSE_WEIGHTS_OUT_IN:
        if name in tensors:
            tensors[name] *= 2.0 * tensors[name].shape[-1] ** -0.5
    for name in ("attention.norm.weight", "moe.norm.weight", "moe.confidence.norm.weight", "moe.impute.norm.weight"):
        if name in tensors:
            tensors[name] += 1.0
    observed = torch.tensor(SELFTEST_OBSERVED, dtype=torch.int32)
    B = observed.shape[0]
    for m, width in enumerate(cfg.features):
        features = normal(B, width)
        if cfg.imputation not in FEATURE_IMPUTATIONS:
            features[observed[:, m] == 0] = math.nan
        tensors[f"input.features.{m}"] = features
    tensors["input.observed"] = observed
    tensors["input.labels"] = torch.randint(cfg.classes, (B,), generator=generator, dtype=torch.int32)
    tensors["input.class_weights"] = torch.rand(cfg.classes, generator=generator) + 0.5
    tensors["input.combination"] = combination_indices(observed.bool()).int()
    if training:
        tensors["input.gate_noise"] = normal(cfg.modalities, B * cfg.patches, cfg.experts)
    if dropout:
        specs = input_specs(cfg, B)
        for name in DROPOUT_MASKS:
            keep = torch.rand(specs[name][1], generator=generator) >= SELFTEST_DROPOUT
            tensors[name] = keep / (1 - SELFTEST_DROPOUT)
    return tensors


def call_main(argv):
    """main(argv) in this process: its exit status and what it wrote on stderr."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = main(argv)
    return status, stderr.getvalue()


def check_combinations():
    """The enumeration against the M = 4 example and its size for M = 1..5."""
    expected = {0: (0, 1, 2, 3), 1: (0, 1, 2), 2: (0, 1, 3), 3: (0, 2, 3), 4: (1, 2, 3), 5: (0, 1), 14: (3,)}
    four = combinations(4)
    failures = [f"M=4: index {c} is {four[c]}, expected {subset}"
                for c, subset in expected.items() if four[c] != subset]
    for M in range(1, 6):
        table = combinations(M)
        if len(table) != 2 ** M - 1 or len(set(table)) != len(table):
            failures.append(f"M={M}: {len(set(table))} distinct of {len(table)}, expected {2 ** M - 1}")
    observed = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    if combination_indices(observed).tolist() != [0, 4, 14]:
        failures.append(f"combination_indices gives {combination_indices(observed).tolist()}, expected [0, 4, 14]")
    return failures, "M=4 example, 2^M-1 distinct for M=1..5"


def check_safetensors(tmp):
    """The writer's bytes for a known tensor, the reader on hand-made bytes, and a round trip of
    every dtype (a scalar and an empty tensor among them)."""
    failures = []
    path = os.path.join(tmp, "known.safetensors")
    write_safetensors(path, {"x": torch.tensor([1.0, -2.0])}, {"k": "v"})
    with open(path, "rb") as f:
        blob = f.read()
    header = b'{"__metadata__":{"k":"v"},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    header += b" " * (-len(header) % 8)
    if blob != struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, -2.0):
        failures.append(f"writer: unexpected bytes {blob!r}")
    header = (b'{"n":{"dtype":"I64","shape":[],"data_offsets":[4,12]},'
              b'"i":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}')
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + struct.pack("<iq", -7, 2 ** 40))
    tensors, metadata = read_safetensors(path)
    if metadata or list(tensors) != ["n", "i"] or tensors["n"].item() != 2 ** 40 or tensors["i"].tolist() != [-7]:
        failures.append(f"reader: got {tensors}, {metadata}")

    generator = torch.Generator().manual_seed(7)
    original = {"scalar": torch.tensor(3.25, dtype=torch.float64), "empty": torch.empty(0, 3),
                "f32": torch.randn(2, 3, 4, generator=generator), "f64": torch.randn(5, generator=generator).double(),
                "i32": torch.randint(-9, 9, (3, 2), generator=generator, dtype=torch.int32),
                "i64": torch.randint(-9, 9, (7,), generator=generator)}
    write_safetensors(path, original, {"config": '{"a": 1}', "dtype": "F64"})
    tensors, metadata = read_safetensors(path)
    if metadata != {"config": '{"a": 1}', "dtype": "F64"}:
        failures.append(f"round trip: metadata {metadata}")
    if sorted(tensors) != sorted(original):
        failures.append(f"round trip: names {sorted(tensors)}")
    for name, tensor in original.items():
        back = tensors.get(name)
        if back is None or back.dtype != tensor.dtype or back.shape != tensor.shape or not torch.equal(back, tensor):
            failures.append(f"round trip: '{name}' differs")
    with open(path, "rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(8))
    if header_length % 8:
        failures.append(f"header of {header_length} bytes, not a multiple of 8")
    return failures, "known bytes both ways, round trip of F32/F64/I32/I64 with a scalar and an empty tensor"


def check_output_file(cfg, tensors, dtype):
    """Every output name with its shape and dtype, all finite (the missing rows of the input hold
    NaN, except with imputation "features" or "two_stage"); act.impute 0 in every row without
    imputation "two_stage", and with it 0 exactly in the rows of observed modalities and nonzero in
    every row of a missing one."""
    B, M, P, d, k = len(SELFTEST_OBSERVED), cfg.modalities, cfg.patches, cfg.dim, cfg.top_k
    expected = {"out.logits": (B, cfg.classes), "out.loss": (), "out.task_loss": (), "out.gate_loss": (),
                "out.confidence_loss": (), "out.probe_loss": (),
                "act.tokens": (B, M * P, d), "act.attention": (B, M * P, d), "act.moe": (B, M * P, d),
                "act.pooled": (B, M * d), "act.impute": (M, B * P, d), "out.indices": (M, B * P, k),
                "out.impute_margin": ()}
    expected.update({"grad." + name: shape for name, shape in parameter_shapes(cfg).items()})
    failures = []
    if set(tensors) != set(expected):
        failures.append(f"names: missing {sorted(set(expected) - set(tensors))}, "
                        f"unexpected {sorted(set(tensors) - set(expected))}")
    for name, tensor in tensors.items():
        want = torch.int32 if name == "out.indices" else dtype
        if name in expected and (tuple(tensor.shape) != expected[name] or tensor.dtype != want):
            failures.append(f"'{name}' is {DTYPE_NAMES[tensor.dtype]} {list(tensor.shape)}, "
                            f"expected {DTYPE_NAMES[want]} {list(expected[name])}")
        elif not torch.isfinite(tensor).all():
            failures.append(f"'{name}' is not finite")
    if tuple(tensors.get("act.impute", torch.empty(0)).shape) == expected["act.impute"]:
        observed = torch.tensor(SELFTEST_OBSERVED, dtype=torch.bool).T.repeat_interleave(P, dim=1)  # [M, B * P]
        if cfg.imputation != "two_stage":
            observed = torch.ones_like(observed)
        nonzero = tensors["act.impute"].abs().amax(dim=-1) > 0
        if nonzero[observed].any() or not nonzero[~observed].all():
            failures.append("'act.impute' is not 0 exactly in the rows of observed modalities (every row "
                            "without imputation \"two_stage\") and nonzero in those of missing ones")
    return failures


def finite_difference_check(in_path, outputs, generator):
    """Central differences of the loss for FD_ENTRIES entries of every parameter (its largest
    gradient among them) against the written gradients, within FD_TOLERANCE of each tensor's
    largest gradient; perturbations that change any chunk's top-(k+1) ranking (a kink of the loss)
    are skipped, and every parameter must keep at least one entry. The confidence gate's detached
    terms (the probe's input, the targets) and stage 2's kept sets (imputation "two_stage") are held
    at their unperturbed values, as backward treats them as constants."""
    cfg, _, params, batch = load_problem(in_path, torch.float64)
    with torch.no_grad():
        frozen = {}
        base_ranking = forward(cfg, params, batch, frozen)[1]
        failures, checked, skipped, worst = [], 0, 0, 0.0
        for name, param in params.items():
            gradient = outputs["grad." + name].flatten()
            scale = gradient.abs().max().item()
            entries = [gradient.abs().argmax().item()] + torch.randint(
                gradient.numel(), (FD_ENTRIES - 1,), generator=generator).tolist()
            flat, kept = param.view(-1), 0
            for entry in entries:
                original = flat[entry].item()
                losses = []
                for step in (FD_STEP, -FD_STEP):
                    flat[entry] = original + step
                    result, ranking = forward(cfg, params, batch, frozen)
                    losses.append(result["out.loss"].item() if torch.equal(ranking, base_ranking) else None)
                flat[entry] = original
                if None in losses:
                    skipped += 1
                    continue
                kept += 1
                error = abs((losses[0] - losses[1]) / (2 * FD_STEP) - gradient[entry].item())
                worst = max(worst, error / scale if scale else error)
                if error > FD_TOLERANCE * scale:
                    failures.append(f"grad.{name}[{entry}]: finite difference off by {error:.3g} "
                                    f"(largest gradient {scale:.3g})")
            if kept == 0:
                failures.append(f"grad.{name}: every perturbation changed the routing")
            checked += kept
    return failures, checked, skipped, worst


def check_model(tmp, generator, training, dropout=False, config=None):
    """The CLI on a random problem of config (default SELFTEST_CONFIG; with dropout masks when
    dropout) in float64 (output names, shapes, finiteness, finite differences of every parameter)
    and in float32 (close to float64, same routing)."""
    config = config or SELFTEST_CONFIG
    cfg = parse_config({"config": json.dumps(config)})
    mode = (f"{cfg.gate}.{cfg.confidence_mode}.{cfg.imputation}." + ("training" if training else "inference")
            + ".dropout" * dropout)
    in_path, out64, out32 = (os.path.join(tmp, f"{mode}.{n}.safetensors") for n in ("in", "f64", "f32"))
    write_safetensors(in_path, selftest_problem(generator, training, dropout, config), {"config": json.dumps(config)})
    start = time.perf_counter()
    status, stderr = call_main([in_path, out64])
    elapsed = time.perf_counter() - start
    if status != 0:
        return [f"exit status {status}: {stderr.strip()}"], ""
    outputs, metadata = read_safetensors(out64)
    failures = check_output_file(cfg, outputs, torch.float64)
    if metadata != {"config": json.dumps(config), "dtype": "F64"}:
        failures.append(f"metadata {metadata}")
    if cfg.gate == "noisy":
        noise_gradient = outputs["grad.moe.noise.weight"].abs().max().item()
        if (noise_gradient > 0) != training:
            failures.append(f"grad.moe.noise.weight has largest entry {noise_gradient:.3g} in {mode}")
        if outputs["out.confidence_loss"].item() != 0 or outputs["out.probe_loss"].item() != 0:
            failures.append("the noisy gate has a confidence or a probe loss")
    else:
        terms = [outputs[n].item() for n in ("out.task_loss", "out.gate_loss", "out.confidence_loss", "out.probe_loss")]
        total = terms[0] + cfg.gate_loss_weight * terms[1] + terms[2] + terms[3]
        if not (terms[2] > 0 and terms[3] > 0) or abs(outputs["out.loss"].item() - total) > 1e-12 * abs(total):
            failures.append(f"out.loss {outputs['out.loss'].item()} is not task + gate_loss_weight * gate + "
                            f"confidence + probe, each > 0, of {terms}")
    start_fd = time.perf_counter()
    fd_failures, checked, skipped, worst = finite_difference_check(in_path, outputs, generator)
    fd_elapsed = time.perf_counter() - start_fd
    failures += fd_failures

    status, stderr = call_main([in_path, out32, "--float32"])
    if status != 0:
        failures.append(f"--float32: exit status {status}: {stderr.strip()}")
    else:
        single = read_safetensors(out32)[0]
        failures += [f"--float32: {f}" for f in check_output_file(cfg, single, torch.float32)]
        if not torch.equal(single["out.indices"], outputs["out.indices"]):
            failures.append("--float32: routing differs from float64")
        compared = ("out.loss", "out.logits", "act.moe", "grad.moe.w1")
        if cfg.gate == "confidence":
            compared += ("out.confidence_loss", "out.probe_loss", "grad.moe.confidence.w", "grad.moe.probe.weight")
        if cfg.imputation == "two_stage":
            compared += ("act.impute", "grad.moe.impute.q.weight", "grad.moe.impute.kv.weight")
        for name in compared:
            difference = (single[name].double() - outputs[name]).abs().max() / outputs[name].abs().max()
            if difference > 1e-4:
                failures.append(f"--float32: '{name}' differs from float64 by {difference:.3g} of its largest entry")
    detail = (f"loss {outputs['out.loss'].item():.6f}, {checked} entries within {worst:.2g} of their "
              f"tensor's largest gradient ({skipped} skipped for a routing change); "
              f"forward+backward+I/O {elapsed * 1e3:.0f} ms, finite differences {fd_elapsed:.1f} s")
    return failures, detail


def cli_outputs(tmp, tensors, config):
    """The CLI's float64 output tensors on an input of tensors and config (a dict); None and the
    failure when it does not exit with status 0."""
    in_path, out_path = (os.path.join(tmp, f"cli.{n}.safetensors") for n in ("in", "out"))
    write_safetensors(in_path, tensors, {"config": json.dumps(config)})
    status, stderr = call_main([in_path, out_path])
    if status != 0:
        return None, f"exit status {status}: {stderr.strip()}"
    return read_safetensors(out_path)[0], None


def cli_runs(tmp, variants, prefix, failures):
    """cli_outputs of each variant, a name -> (tensors, config) dict: the outputs by name, or None
    when a run failed (each failure appended to failures, after prefix)."""
    runs, failed = {}, False
    for name, (tensors, config) in variants.items():
        runs[name], failure = cli_outputs(tmp, tensors, config)
        if failure:
            failures.append(f"{prefix}{name}: {failure}")
            failed = True
    return None if failed else runs


def chunk_major(mask, batch_size):
    """The SMoE's dropout mask [M, B * patches, d] in the token layout [B, M * patches, d]."""
    M, rows, d = mask.shape
    return mask.view(M, batch_size, rows // batch_size, d).transpose(0, 1).reshape(batch_size, -1, d)


def dropout_failures(tmp, tensors, config, generator):
    """check_dropout for one config: the CLI without masks, with masks of ones, and with each mask
    alone holding zeros at 10% of its entries (ones elsewhere)."""
    cfg = parse_config({"config": json.dumps(config)})
    B = len(SELFTEST_OBSERVED)
    specs = input_specs(cfg, B)
    sparse = {name: (torch.rand(specs[name][1], generator=generator) >= 0.1).float() for name in DROPOUT_MASKS}
    inputs = {"no masks": {}, "masks of ones": {name: torch.ones(specs[name][1]) for name in DROPOUT_MASKS}}
    inputs.update({name: {name: mask} for name, mask in sparse.items()})
    failures = []
    runs = cli_runs(tmp, {label: (dict(tensors, **masks), config) for label, masks in inputs.items()}, "", failures)
    if runs is None:
        return failures
    plain = runs["no masks"]
    failures += [f"masks of ones change '{name}'"
                 for name, tensor in runs["masks of ones"].items() if not torch.equal(tensor, plain[name])]
    residual = plain["act.tokens"] if cfg.attention_residual else torch.zeros_like(plain["act.tokens"])
    expected = {"input.dropout.attention": ("act.attention", residual, plain["act.attention"]),
                "input.dropout.moe": ("act.moe", plain["act.attention"], plain["act.moe"])}
    dropped = {"input.dropout.attention": sparse["input.dropout.attention"] == 0,
               "input.dropout.moe": chunk_major(sparse["input.dropout.moe"], B) == 0}
    for name, (activation, if_dropped, if_kept) in expected.items():
        if not torch.equal(runs[name][activation], torch.where(dropped[name], if_dropped, if_kept)):
            failures.append(f"'{name}' with zeros: {activation} is not the residual where it is 0 and "
                            "the output without masks where it is 1")
    return failures


def check_dropout(tmp, generator):
    """With and without attention_residual: masks of ones give exactly the outputs and gradients of
    no masks, and a mask's zeros leave exactly the residual (x, or 0 without attention_residual, in
    act.attention; act.attention in act.moe), its ones the output without masks."""
    tensors = selftest_problem(generator, training=True)
    failures = []
    for residual in (True, False):
        config = dict(SELFTEST_CONFIG, attention_residual=residual)
        failures += [f"attention_residual {residual}: {f}" for f in dropout_failures(tmp, tensors, config, generator)]
    return failures, ("masks of ones change no output or gradient, zeros leave exactly the residual in "
                      "act.attention and act.moe, with and without attention_residual")


def confidence_by_slots(cfg, p, x, batch):
    """ConfSMoE's SMoE output act.moe [B, M * patches, d], its gate, confidence and probe losses
    from the attention's output x, one token and one slot at a time with the formulas written out:
    an independent reading of the documentation against forward's batched one."""
    B, M, P, E, k, eps = batch.observed.shape[0], cfg.modalities, cfg.patches, cfg.experts, cfg.top_k, cfg.layernorm_eps

    def normalise(v):
        return (v - v.mean()) / torch.sqrt(((v - v.mean()) ** 2).mean() + eps)

    slots, residuals, gate_loss = [], [], 0.0  # slots: (chunk, row, expert, h, token confidence, label)
    for m in range(M):
        cross_entropy, missing = 0.0, 0
        for row in range(B * P):
            b = row // P
            u = normalise(x[b, m * P + row % P]) * p["moe.norm.weight"] + p["moe.norm.bias"]
            logits = u @ p["moe.gate.weight"]
            if batch.combination[b] > 0:
                target = batch.combination[b].item() % E
                cross_entropy += torch.log(torch.exp(logits - logits.max()).sum()) + logits.max() - logits[target]
                missing += 1
            residuals.append(u)
            for e in sorted(range(E), key=lambda e: -logits[e].item())[:k]:
                h = F.gelu(u @ p["moe.w1"][e] + p["moe.b1"][e]) @ p["moe.w2"][e] + p["moe.b2"][e]
                z = p["moe.confidence.w"][e] @ normalise(h) + p["moe.confidence.b"][e]
                slots.append((m, row, e, h, 1.0 / (1.0 + torch.exp(-z)), batch.labels[b].item()))
        gate_loss += cross_entropy / missing if missing else 0.0
    if cfg.confidence_mode == "expert_mean":
        means = {e: torch.stack([s[4] for s in slots if s[2] == e]).mean() for e in {s[2] for s in slots}}
        confidences = [means[s[2]] for s in slots]
    else:
        confidences = [s[4] for s in slots]
    sums = [residual.clone() for residual in residuals]
    confidence_loss = probe_loss = 0.0
    for (m, row, e, h, _, label), c in zip(slots, confidences):
        sums[m * B * P + row] += c * h
        logits = p["moe.probe.weight"][e] @ h + p["moe.probe.bias"][e]
        probability = torch.exp(logits[label] - logits.max()) / torch.exp(logits - logits.max()).sum()
        confidence_loss += (c - probability) ** 2 / len(slots)
        probe_loss -= torch.log(probability) / len(slots)
    moe = x.clone()
    for m in range(M):
        for row in range(B * P):
            y = (normalise(sums[m * B * P + row]) * p["moe.confidence.norm.weight"] + p["moe.confidence.norm.bias"])
            if batch.dropout_moe is not None:
                y = batch.dropout_moe[m, row] * y
            moe[row // P, m * P + row % P] += y
    return moe, gate_loss, confidence_loss, probe_loss


def check_confidence(tmp, generator):
    """For each of CONFIDENCE_CONFIGS: the CLI's act.moe, gate, confidence and probe losses against
    confidence_by_slots; grad.moe.gate.weight equal to gate_loss_weight times the gradient of the
    S-Router term alone (recomputed from act.attention), and exactly zero with gate_loss_weight 0 or
    when every sample has every modality; input.gate_noise changes nothing."""
    failures = []
    for label, config in CONFIDENCE_CONFIGS.items():
        cfg = parse_config({"config": json.dumps(config)})
        P, d = cfg.patches, cfg.dim
        tensors = selftest_problem(generator, training=True, dropout=True, config=config)
        outputs, failure = cli_outputs(tmp, tensors, config)
        if failure:
            failures.append(f"{label}: {failure}")
            continue
        in_path = os.path.join(tmp, "cli.in.safetensors")
        _, _, params, batch = load_problem(in_path, torch.float64)
        with torch.no_grad():
            got = confidence_by_slots(cfg, params, outputs["act.attention"], batch)
        for name, value in zip(("act.moe", "out.gate_loss", "out.confidence_loss", "out.probe_loss"), got):
            error = (outputs[name] - value).abs().max().item() / value.abs().max().item()
            if error > 1e-12:
                failures.append(f"{label}: '{name}' differs from the per-slot computation by {error:.3g}")

        weight = params["moe.gate.weight"].clone().requires_grad_(True)
        combination = batch.combination.repeat_interleave(P)
        term = 0.0
        for m in range(cfg.modalities):
            t = outputs["act.attention"][:, m * P:(m + 1) * P].reshape(-1, d)
            u = F.layer_norm(t, (d,), params["moe.norm.weight"], params["moe.norm.bias"], cfg.layernorm_eps)
            term = term + router_cross_entropy(u @ weight, combination)
        (expected,) = torch.autograd.grad(cfg.gate_loss_weight * term, weight)
        error = (outputs["grad.moe.gate.weight"] - expected).abs().max().item()
        if not expected.abs().max().item() > 0 or error > 1e-12 * expected.abs().max().item():
            failures.append(f"{label}: grad.moe.gate.weight is off gate_loss_weight * the S-Router term's "
                            f"gradient by {error:.3g} (largest {expected.abs().max().item():.3g})")

        complete = dict(tensors, **{"input.observed": torch.ones_like(tensors["input.observed"]),
                                    "input.combination": torch.zeros_like(tensors["input.combination"])})
        for m in range(cfg.modalities):
            features = tensors[f"input.features.{m}"]
            complete[f"input.features.{m}"] = torch.where(features.isnan(), torch.ones_like(features), features)
        if "bank" in complete:
            complete.pop("bank")  # no sample needs it: imputation "zero" on the same problem
        variants = {"gate_loss_weight 0": (tensors, dict(config, gate_loss_weight=0.0)),
                    "every modality observed": (complete, dict(config, imputation="zero"))}
        for name, (inputs, variant) in variants.items():
            result, failure = cli_outputs(tmp, inputs, variant)
            if failure:
                failures.append(f"{label}, {name}: {failure}")
            elif result["grad.moe.gate.weight"].abs().max().item() != 0 or not result["grad.moe.w1"].abs().max() > 0:
                failures.append(f"{label}, {name}: grad.moe.gate.weight is not exactly 0 (or grad.moe.w1 is)")

        result, failure = cli_outputs(tmp, {n: t for n, t in tensors.items() if n != "input.gate_noise"}, config)
        if failure or any(not torch.equal(result[n], outputs[n]) for n in outputs):
            failures.append(f"{label}: input.gate_noise changes the outputs {failure or ''}")
    return failures, ("act.moe and the losses as computed slot by slot, the router's gradient is "
                      "gate_loss_weight * the S-Router term's (0 with weight 0 or no missing modality), "
                      "gate noise ignored")


def mask_gate_loss(cfg, p, attention_out, batch, combination):
    """out.gate_loss recomputed from act.attention with the given per-sample combination indices
    (the gate noise of batch, if any, with the noisy gate; the S-Router term with the confidence
    gate)."""
    B, P, d = batch.observed.shape[0], cfg.patches, cfg.dim
    rows = combination.repeat_interleave(P)
    total = 0.0
    for m in range(cfg.modalities):
        t = attention_out[:, m * P:(m + 1) * P].reshape(B * P, d)
        u = F.layer_norm(t, (d,), p["moe.norm.weight"], p["moe.norm.bias"], cfg.layernorm_eps)
        if cfg.gate == "noisy":
            total = total + smoe(cfg, p, u, rows, None if batch.gate_noise is None else batch.gate_noise[m])[1]
        else:
            total = total + router_cross_entropy(u @ p["moe.gate.weight"], rows)
    return total


def check_features(tmp, generator):
    """Imputation "features", with either gate (training, dropout masks): the imputed rows are
    encoded exactly like observed ones while the mask still marks them missing elsewhere:
    act.tokens equal to the same problem with every modality observed; with gate_loss_weight 0
    (the one term that reads the mask), every output and gradient equal to it (to 1e-12 of their
    largest entry: the encoder biases' sums run in another order), so the encoders' gradients have
    the missing rows' terms; with the gate loss, grad.encoder.{m}.bias equal to
    the sum of grad.position over m's tokens (every sample's tokens go through the encoder), which
    imputation "zero" breaks, and out.gate_loss the one recomputed from act.attention with the
    mask's combination indices (not the all-observed ones)."""
    failures = []
    for gate, config in (("noisy", FEATURES_CONFIG), ("confidence", CONFIDENCE_CONFIGS[
            "confidence gate, token, features imputation"])):
        cfg = parse_config({"config": json.dumps(config)})
        P = cfg.patches
        tensors = selftest_problem(generator, training=True, dropout=True, config=config)
        complete = dict(tensors, **{"input.observed": torch.ones_like(tensors["input.observed"]),
                                    "input.combination": torch.zeros_like(tensors["input.combination"])})
        runs = cli_runs(tmp, {
            "features": (tensors, config),
            "all observed": (complete, dict(config, imputation="zero")),
            "features, gate_loss_weight 0": (tensors, dict(config, gate_loss_weight=0.0)),
            "all observed, gate_loss_weight 0": (complete, dict(config, imputation="zero", gate_loss_weight=0.0)),
            "zero imputation": (tensors, dict(config, imputation="zero"))}, f"{gate} gate, ", failures)
        if runs is None:
            continue
        features, observed = runs["features"], runs["all observed"]
        if not torch.equal(features["act.tokens"], observed["act.tokens"]):
            failures.append(f"{gate} gate: act.tokens differ from every modality observed")
        plain, reference = runs["features, gate_loss_weight 0"], runs["all observed, gate_loss_weight 0"]
        differing = [name for name in plain if name != "out.gate_loss" and not torch.equal(plain[name], reference[name])]
        if differing:
            worst = max((plain[n].double() - reference[n].double()).abs().max().item()
                        / max(reference[n].double().abs().max().item(), 1e-300) for n in differing)
            if worst > 1e-12:
                failures.append(f"{gate} gate, gate_loss_weight 0: {differing} differ from every modality "
                                f"observed by up to {worst:.3g} of their largest entry")

        def bias_identity_error(outputs, m):
            expected = outputs["grad.position"][m * P:(m + 1) * P].sum(dim=0)
            return ((outputs[f"grad.encoder.{m}.bias"] - expected).abs().max().item()
                    / expected.abs().max().item())

        for m in range(cfg.modalities):
            error = bias_identity_error(features, m)
            if error > 1e-12:
                failures.append(f"{gate} gate: grad.encoder.{m}.bias is off the sum of grad.position over "
                                f"modality {m}'s tokens by {error:.3g}")
            if bias_identity_error(runs["zero imputation"], m) < 1e-6:
                failures.append(f"{gate} gate: with imputation \"zero\" grad.encoder.{m}.bias still sums "
                                "grad.position (the check would not see missing rows left out)")
            if torch.equal(features[f"grad.encoder.{m}.weight"], runs["zero imputation"][f"grad.encoder.{m}.weight"]):
                failures.append(f"{gate} gate: grad.encoder.{m}.weight is the same with imputation \"zero\"")

        in_path = os.path.join(tmp, "cli.in.safetensors")
        write_safetensors(in_path, tensors, {"config": json.dumps(config)})
        _, _, params, batch = load_problem(in_path, torch.float64)
        with torch.no_grad():
            expected = mask_gate_loss(cfg, params, features["act.attention"], batch, batch.combination)
            all_zero = mask_gate_loss(cfg, params, features["act.attention"], batch, torch.zeros_like(batch.combination))
        error = abs(features["out.gate_loss"].item() - expected.item())
        if error > 1e-12 * abs(expected.item()) or abs(all_zero.item() - expected.item()) < 1e-3 * abs(expected.item()):
            failures.append(f"{gate} gate: out.gate_loss {features['out.gate_loss'].item()} is not the one of the "
                            f"mask's combinations {expected.item()} (all observed: {all_zero.item()})")
    return failures, ("both gates: act.tokens as with every modality observed; with gate_loss_weight 0 every "
                      "output and gradient too, to 1e-12 (encoder gradients with the missing rows' terms); "
                      "grad.encoder.{m}.bias = sum of grad.position over m's tokens (not with \"zero\"); "
                      "the gate loss from the mask's combinations")


def two_stage_by_token(cfg, p, y, h, observed):
    """Stage 2 one missing token at a time with the formulas written out, from the SMoE's outputs
    y [M, B * patches, d] and their expert outputs h [M, B * patches, k, d] (routing order): an
    independent reading of the documentation against impute_stage_two's batched one. Returns
    (y', z), both [M, B * patches, d]."""
    M, rows, k, d = h.shape
    B = observed.shape[0]
    P, eps = rows // B, cfg.layernorm_eps
    w_key, w_value = p["moe.impute.kv.weight"][:, :d], p["moe.impute.kv.weight"][:, d:]
    imputed, z = y.clone(), torch.zeros_like(y)
    for b in range(B):
        present = [m for m in range(M) if observed[b, m]]
        keys, values = [], []
        for m in present:
            for patch in range(P):
                for i in range(k):
                    keys.append(h[m, b * P + patch, i] @ w_key)
                    values.append(h[m, b * P + patch, i] @ w_value)
        n = len(keys)
        count = min(max(math.ceil(cfg.impute_keep * n), 1), n)
        for m in (m for m in range(M) if m not in present):
            for patch in range(P):
                row = b * P + patch
                query = (sum(h[m, row, i] for i in range(k)) / k) @ p["moe.impute.q.weight"]
                scores = [(query @ key).item() / math.sqrt(d) for key in keys]
                exps = [math.exp(score - max(scores)) for score in scores]
                weights = [e / sum(exps) for e in exps]
                kept = sorted(range(n), key=lambda j: (-weights[j], j))[:count]
                z[m, row] = sum(weights[j] * values[j] for j in kept)
                v = y[m, row] + z[m, row]
                v = (v - v.mean()) / torch.sqrt(((v - v.mean()) ** 2).mean() + eps)
                imputed[m, row] = v * p["moe.impute.norm.weight"] + p["moe.impute.norm.bias"]
    return imputed, z


def dense_attention(cfg, p, h, observed, largest_only=False):
    """z [M, B * patches, d] of stage 2 with every key kept (plain attention: softmax(q K^T /
    sqrt(d)) V), or with the largest weight alone (largest_only), for impute_keep 1 and tiny."""
    M, rows, k, d = h.shape
    B = observed.shape[0]
    P = rows // B
    z = torch.zeros(M, rows, d, dtype=h.dtype)
    for b in range(B):
        present, absent = observed[b].nonzero().flatten(), (~observed[b]).nonzero().flatten()
        slots = h[present, b * P:(b + 1) * P].reshape(-1, d)
        keys, values = slots @ p["moe.impute.kv.weight"][:, :d], slots @ p["moe.impute.kv.weight"][:, d:]
        for m in absent.tolist():
            queries = h[m, b * P:(b + 1) * P].mean(dim=1) @ p["moe.impute.q.weight"]
            weights = torch.softmax(queries @ keys.T / math.sqrt(d), dim=1)
            if largest_only:
                best, j = weights.max(dim=1)
                z[m, b * P:(b + 1) * P] = best[:, None] * values[j]
            else:
                z[m, b * P:(b + 1) * P] = weights @ values
    return z


def tie_failures(cfg, generator):
    """impute_stage_two against two_stage_by_token where the kept set's cut falls inside groups of
    exactly tied weights (so the slot order and the tie-break toward the lower slot decide which
    values are summed): random y and h of the selftest's batch shape with h[..., 0] in {0, 1, 2} and
    moe.impute.kv.weight's key columns e_0 (K_j = (h_j0, 0, ..., 0): three exact score values)."""
    M, B, P, k, d = cfg.modalities, len(SELFTEST_OBSERVED), cfg.patches, cfg.top_k, cfg.dim
    observed = torch.tensor(SELFTEST_OBSERVED, dtype=torch.bool)
    y = torch.randn(M, B * P, d, generator=generator, dtype=torch.float64)
    h = torch.randn(M, B * P, k, d, generator=generator, dtype=torch.float64)
    h[..., 0] = torch.randint(3, (M, B * P, k), generator=generator).double()
    w_key = torch.zeros(d, d, dtype=torch.float64)
    w_key[0, 0] = 1.0
    p = {"moe.impute.q.weight": torch.randn(d, d, generator=generator, dtype=torch.float64),
         "moe.impute.kv.weight": torch.cat([w_key, torch.randn(d, d, generator=generator, dtype=torch.float64)], dim=1),
         "moe.impute.norm.weight": torch.rand(d, generator=generator, dtype=torch.float64) + 0.5,
         "moe.impute.norm.bias": torch.randn(d, generator=generator, dtype=torch.float64)}
    failures, cut_in_ties = [], 0
    for b in range(B):  # the setup: exact ties at the cut of some queries
        present, absent = observed[b].nonzero().flatten(), (~observed[b]).nonzero().flatten()
        if len(absent):
            slots = h[present, b * P:(b + 1) * P].reshape(-1, d)
            queries = h[absent, b * P:(b + 1) * P].mean(dim=2).reshape(-1, d) @ p["moe.impute.q.weight"]
            weights = (queries @ (slots @ w_key).T / math.sqrt(d)).softmax(dim=-1)
            count = math.ceil(cfg.impute_keep * slots.shape[0])
            ranked = weights.sort(dim=-1, descending=True).values
            cut_in_ties += (ranked[:, count - 1] == ranked[:, count]).sum().item()
            if len(set(weights[0].tolist())) > 3:
                failures.append(f"ties: sample {b}'s weights of three score values are not three values")
    if cut_in_ties < 10:
        failures.append(f"ties: the cut falls inside a group of tied weights for {cut_in_ties} queries only")
    got, expected = impute_stage_two(cfg, p, y, h, observed), two_stage_by_token(cfg, p, y, h, observed)
    for name, g, e in zip(("y'", "z"), got, expected):
        error = (g - e).abs().max().item() / e.abs().max().item()
        if error > 1e-12:
            failures.append(f"ties: {name} differs from the per-token stage 2 by {error:.3g}")
    return failures


def check_two_stage(tmp, generator):
    """Imputation "two_stage", with either gate (training, dropout masks): act.impute and act.moe
    against two_stage_by_token from the same SMoE outputs and expert outputs (recomputed from
    act.attention); impute_keep 1 gives plain attention over every key and a tiny impute_keep the
    largest weight's value alone (and 0.25/0.3 neither); with every modality observed, the outputs
    of imputation "features" exactly and zero moe.impute gradients; stage 2 changes the logits of a
    batch with missing modalities; impute_keep changes nothing with imputation "bank"; and
    tie_failures."""
    failures = []

    def relative(got, expected):
        return (got - expected).abs().max().item() / max(expected.abs().max().item(), 1e-300)

    for label, config in TWO_STAGE_CONFIGS.items():
        cfg = parse_config({"config": json.dumps(config)})
        B = len(SELFTEST_OBSERVED)
        tensors = selftest_problem(generator, training=True, dropout=True, config=config)
        stage_one = {n: t for n, t in tensors.items() if not n.startswith("moe.impute.")}
        complete = dict(tensors, **{"input.observed": torch.ones_like(tensors["input.observed"]),
                                    "input.combination": torch.zeros_like(tensors["input.combination"])})
        runs = cli_runs(tmp, {
            "two_stage": (tensors, config),
            "impute_keep 1": (tensors, dict(config, impute_keep=1.0)),
            "impute_keep 1e-6": (tensors, dict(config, impute_keep=1e-6)),
            "features": (stage_one, dict(config, imputation="features")),
            "all observed": (complete, config),
            "all observed, features": ({n: t for n, t in complete.items() if not n.startswith("moe.impute.")},
                                       dict(config, imputation="features"))}, f"{label}, ", failures)
        if runs is None:
            continue
        outputs = runs["two_stage"]
        in_path = os.path.join(tmp, "cli.in.safetensors")
        write_safetensors(in_path, tensors, {"config": json.dumps(config)})
        _, _, params, batch = load_problem(in_path, torch.float64)
        with torch.no_grad():
            y, h = smoe_layer(cfg, params, outputs["act.attention"], batch)[:2]
            imputed, z = two_stage_by_token(cfg, params, y, h, batch.observed)
            expected_moe = outputs["act.attention"] + chunk_major(batch.dropout_moe * imputed, B)
            for name, got, expected in (("act.impute", outputs["act.impute"], z), ("act.moe", outputs["act.moe"], expected_moe)):
                error = relative(got, expected)
                if error > 1e-12:
                    failures.append(f"{label}: '{name}' differs from the per-token stage 2 by {error:.3g}")
            for name, expected in (("impute_keep 1", dense_attention(cfg, params, h, batch.observed)),
                                   ("impute_keep 1e-6", dense_attention(cfg, params, h, batch.observed, True))):
                if not torch.equal(runs[name]["act.attention"], outputs["act.attention"]):
                    failures.append(f"{label}, {name}: act.attention changed")
                    continue
                error = relative(runs[name]["act.impute"], expected)
                distinct = relative(outputs["act.impute"], expected)
                if error > 1e-12 or distinct < 1e-3:
                    failures.append(f"{label}, {name}: act.impute is off its {'largest key alone' if '6' in name else 'plain attention'} "
                                    f"by {error:.3g} (impute_keep {cfg.impute_keep}: by {distinct:.3g}, expected more)")

        plain, reference = runs["all observed"], runs["all observed, features"]
        differing = [n for n in reference if not torch.equal(plain[n], reference[n])]
        if differing:
            failures.append(f"{label}, every modality observed: {differing} differ from imputation \"features\"")
        nonzero = [n for n in plain if (n.startswith("grad.moe.impute.") or n == "act.impute") and plain[n].abs().max() != 0]
        if nonzero or set(plain) - set(reference) != {"grad.moe.impute." + n for n in ("q.weight", "kv.weight", "norm.weight", "norm.bias")}:
            failures.append(f"{label}, every modality observed: {nonzero} not zero, or output names "
                            f"{sorted(set(plain) - set(reference))} beyond imputation \"features\"'s")
        if relative(outputs["out.logits"], runs["features"]["out.logits"]) < 1e-3:
            failures.append(f"{label}: stage 2 leaves the logits of imputation \"features\"")
        failures += [f"{label}: {f}" for f in tie_failures(cfg, generator)]

    tensors = selftest_problem(generator, training=True, dropout=True)
    plain, failure = cli_outputs(tmp, tensors, SELFTEST_CONFIG)
    keep, failure_keep = cli_outputs(tmp, tensors, dict(SELFTEST_CONFIG, impute_keep=1))
    if failure or failure_keep or set(plain) != set(keep) or any(not torch.equal(plain[n], keep[n]) for n in plain):
        failures.append(f"impute_keep 1 with imputation \"bank\": refused or changes the outputs {failure or failure_keep or ''}")
    return failures, ("both gates: act.impute and act.moe as stage 2 token by token (1e-12); impute_keep 1 is "
                      "plain attention, 1e-6 the largest weight alone; every modality observed: \"features\"'s "
                      "outputs exactly, zero moe.impute gradients; impute_keep accepted and unused with \"bank\"; the "
                      "kept set's cut inside exact ties as token by token (slot order, ties to the lower slot)")


def check_errors(tmp, generator):
    """Malformed inputs: exit status 1 and a message naming the tensor or the config key."""
    confidence = dict(SELFTEST_CONFIG, gate="confidence")
    features = dict(SELFTEST_CONFIG, imputation="features")
    two_stage = dict(SELFTEST_CONFIG, imputation="two_stage")
    cases = [  # (name in the message, config, corruption of its problem)
        ("moe.w2", SELFTEST_CONFIG, lambda t: t.pop("moe.w2")),
        ("position", SELFTEST_CONFIG,
         lambda t: t.update(position=torch.zeros(t["position"].shape[0], t["position"].shape[1] + 1))),
        ("input.observed", SELFTEST_CONFIG, lambda t: t["input.observed"][2].zero_()),
        ("input.combination", SELFTEST_CONFIG, lambda t: t["input.combination"][1:2].add_(1)),
        ("input.dropout.moe", SELFTEST_CONFIG,
         lambda t: t.update({"input.dropout.moe": t["input.dropout.moe"][..., 1:]})),
        ("input.dropout.attention", SELFTEST_CONFIG, lambda t: t["input.dropout.attention"][1, 2, 3].fill_(math.inf)),
        ("moe.noise.weight", confidence, lambda t: t.update({"moe.noise.weight": torch.zeros(16, 4)})),
        ("moe.probe.weight", confidence, lambda t: t.pop("moe.probe.weight")),
        ("moe.probe.weight", confidence, lambda t: t.update({"moe.probe.weight": torch.zeros(4, 16, 3)})),
        ("moe.confidence.w", SELFTEST_CONFIG, lambda t: t.update({"moe.confidence.w": torch.zeros(4, 16)})),
        ("bank", dict(SELFTEST_CONFIG, imputation="zero"), lambda t: t.update(bank=torch.zeros(7, 3, 16, 16))),
        ("bank", SELFTEST_CONFIG, lambda t: t.pop("bank")),
        ("bank", features, lambda t: t.update(bank=torch.zeros(7, 3, 16, 16))),
        ("bank", dict(confidence, imputation="features"), lambda t: t.update(bank=torch.zeros(7, 3, 16, 16))),
        # Samples 1 and 3 miss modalities 1 and 0: their imputed rows are read.
        ("input.features.1", features, lambda t: t["input.features.1"][1, 3].fill_(math.nan)),
        ("input.features.0", dict(confidence, imputation="features"),
         lambda t: t["input.features.0"][3, 4].fill_(-math.inf)),
        ("gate", dict(SELFTEST_CONFIG, gate="softmax"), None),
        ("gate", dict(SELFTEST_CONFIG, gate=1), None),
        ("confidence_mode", dict(confidence, confidence_mode="mean"), None),
        ("confidence_mode", dict(SELFTEST_CONFIG, confidence_mode="expert_mean"), None),
        ("imputation", dict(SELFTEST_CONFIG, imputation="mean"), None),
        ("imputation", dict(SELFTEST_CONFIG, imputation=None), None),
        ("impute_keep", dict(two_stage, impute_keep=0), None),
        ("impute_keep", dict(two_stage, impute_keep=1.5), None),
        ("impute_keep", dict(two_stage, impute_keep="x"), None),
        ("impute_keep", dict(SELFTEST_CONFIG, impute_keep=-0.25), None),
        ("impute_keep", dict(two_stage, impute_keep=math.nan), None),
        ("impute_keep", dict(two_stage, impute_keep=True), None),
        ("moe.impute.q.weight", features, lambda t: t.update({"moe.impute.q.weight": torch.zeros(16, 16)})),
        ("moe.impute.norm.bias", dict(confidence, imputation="features"),
         lambda t: t.update({"moe.impute.norm.bias": torch.zeros(16)})),
        ("moe.impute.kv.weight", two_stage, lambda t: t.pop("moe.impute.kv.weight")),
        ("moe.impute.norm.weight", dict(confidence, imputation="two_stage"), lambda t: t.pop("moe.impute.norm.weight")),
        ("moe.impute.kv.weight", two_stage, lambda t: t.update({"moe.impute.kv.weight": torch.zeros(16, 16)})),
        ("bank", two_stage, lambda t: t.update(bank=torch.zeros(7, 3, 16, 16))),
        # Sample 2 misses modalities 0 and 2: its imputed rows are read in stage 1 of "two_stage" too.
        ("input.features.2", two_stage, lambda t: t["input.features.2"][2, 7].fill_(math.nan)),
    ]
    failures = []
    for name, config, corrupt in cases:
        try:
            tensors = selftest_problem(generator, training=True, dropout=True, config=config)
        except InputError:  # an invalid config: the problem of the default gate and imputation
            tensors = selftest_problem(generator, training=True, dropout=True)
        if corrupt:
            corrupt(tensors)
        path = os.path.join(tmp, "bad.safetensors")
        write_safetensors(path, tensors, {"config": json.dumps(config)})
        status, stderr = call_main([path, os.path.join(tmp, "bad.out.safetensors")])
        if status != 1 or f"'{name}'" not in stderr:
            failures.append(f"bad '{name}': exit status {status}, message {stderr.strip()!r}")
    return failures, ("missing tensor, wrong shape (a parameter, a dropout mask), no observed modality, wrong "
                      "combination, infinite dropout factor, a parameter of another gate or imputation (the "
                      "bank with \"features\" too, moe.impute.* without \"two_stage\") or one missing, a "
                      "non-finite imputed feature (\"two_stage\" too), an unknown gate, confidence_mode or "
                      "imputation, impute_keep outside (0, 1] or not a number: status 1, tensor or key named")


def selftest(seed):
    """Runs every check; prints the failures and a one-line summary. Returns the exit status."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        results.append(("combinations",) + check_combinations())
        results.append(("safetensors",) + check_safetensors(tmp))
        results.append(("training gate",) + check_model(tmp, generator, training=True))
        results.append(("inference gate",) + check_model(tmp, generator, training=False))
        results.append(("training gate, dropout",) + check_model(tmp, generator, training=True, dropout=True))
        results.append(("dropout masks",) + check_dropout(tmp, generator))
        for label, config in CONFIDENCE_CONFIGS.items():
            results.append((label + ", training, dropout",)
                           + check_model(tmp, generator, training=True, dropout=True, config=config))
        results.append(("noisy gate, features imputation, training, dropout",)
                       + check_model(tmp, generator, training=True, dropout=True, config=FEATURES_CONFIG))
        for label, config in TWO_STAGE_CONFIGS.items():
            results.append((label + ", training, dropout",)
                           + check_model(tmp, generator, training=True, dropout=True, config=config))
        results.append(("confidence gate",) + check_confidence(tmp, generator))
        results.append(("features imputation",) + check_features(tmp, generator))
        results.append(("two_stage imputation",) + check_two_stage(tmp, generator))
        results.append(("errors",) + check_errors(tmp, generator))
    failed = [name for name, failures, _ in results if failures]
    for name, failures, detail in results:
        for failure in failures:
            print(f"FAIL {name}: {failure}")
        if not failures:
            print(f"ok   {name}: {detail}")
    elapsed = time.perf_counter() - start
    print(f"selftest (seed {seed}): {len(results) - len(failed)} of {len(results)} checks passed"
          f"{', failed: ' + ', '.join(failed) if failed else ''} in {elapsed:.1f} s")
    return 1 if failed else 0


# ---- command line --------------------------------------------------------------------------------

def main(argv):
    """The command line: returns the exit status."""
    parser = argparse.ArgumentParser(prog="model_reference.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", nargs="?", help="safetensors file of the parameters, the batch and the config")
    parser.add_argument("output", nargs="?", help="safetensors file to write the outputs and gradients to")
    parser.add_argument("--float32", action="store_true", help="compute in float32 (default float64)")
    parser.add_argument("--selftest", action="store_true", help="check this script against itself and exit")
    parser.add_argument("--seed", type=int, default=1, help="random seed of --selftest (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the tensors are small: threads would cost more than they save
    if args.selftest:
        if args.input or args.output or args.float32:
            parser.error("--selftest takes no files and no --float32")
        return selftest(args.seed)
    if not args.output:
        parser.error("the input and output files are required")
    try:
        run(args.input, args.output, torch.float32 if args.float32 else torch.float64)
    except (InputError, OSError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
