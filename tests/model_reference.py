#!/usr/bin/python3
"""PyTorch reference of the Flex-MoE model (one transformer layer with a sparse MoE), llm.c style:
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
attention_residual, noise_epsilon and layernorm_eps, all required. Parameters (F32, dense weights
stored [in, out]: y = x @ W + b):
    encoder.{m}.weight [P_m, d], encoder.{m}.bias [d]     P_m = ceil(F_m / patches)
    bank [2^M - 1, M, patches, d]                          tokens of a missing modality
    position [M * patches, d]
    attention.norm.{weight,bias} [d], attention.q.weight [d, d], attention.kv.weight [d, 2d]
        (K then V), attention.out.weight [d, d], attention.out.bias [d]
    moe.norm.{weight,bias} [d], moe.gate.weight [d, E], moe.noise.weight [d, E],
    moe.w1 [E, d, H], moe.b1 [E, H], moe.w2 [E, H, d], moe.b2 [E, d]
    head.weight [M * d, C], head.bias [C]
and the batch: input.features.{m} F32 [B, F_m] (rows of samples missing m are ignored),
input.observed I32 [B, M] (0/1), input.labels I32 [B], and optionally input.class_weights F32 [C],
input.gate_noise F32 [M, B * patches, E] (the gate's N(0, 1) draws; present = training gate),
input.combination I32 [B] (checked against the index computed from input.observed) and the dropout
masks, each optional on its own (absent = no dropout there): finite factors (0 or 1/(1-p) for rate
p, any finite value accepted) multiplying a residual branch's output elementwise before the residual:
    input.dropout.attention F32 [B, M * patches, d]   the attention's output a (after the output
                                                      projection and its bias): x + mask * a, or
                                                      mask * a without attention_residual
    input.dropout.moe F32 [M, B * patches, d]         chunk m's SMoE output y (rows b * patches + p,
                                                      as input.gate_noise): x + mask[m] * y

Model. A sample's combination index c numbers its set of observed modalities in Flex-MoE's order:
by size M, M-1, ..., 1, each size in lexicographic order (0 = all modalities). Each observed
modality's features, zero-padded to patches * P_m, become patches rows of P_m values, encoded by
its linear encoder into patches tokens; a missing modality takes bank[c, m]. The M * patches tokens
plus the position embedding go through pre-LN multi-head attention (with the residual when
attention_residual), then each modality's chunk of tokens through x + SMoE(LayerNorm(x)) (each
branch times its dropout mask when given): FastMoE's noisy top-k gate (noisy = clean + noise *
(softplus(x W_noise) + noise_epsilon) in training), the top k experts GELU(x W1 + b1) W2 + b2
weighted by the softmax of their noisy logits, and Flex-MoE's gate loss: the cross-entropy of the
noisy logits toward c mod E over the tokens of samples missing a modality, plus cv^2 of the
experts' importance and load per token group (full-modality samples, the others). Mean-pooling each
chunk and a linear head give the logits; loss = cross-entropy (class-weighted when given) +
gate_loss_weight * the sum of the chunks' gate losses.

Output (F64, or F32 with --float32): out.logits [B, C], out.loss, out.task_loss, out.gate_loss [],
act.tokens, act.attention, act.moe [B, M * patches, d] (the tokens after the embedding, the
attention and the SMoE), act.pooled [B, M * d], out.indices I32 [M, B * patches, k] (each chunk's
experts, best first) and grad.<name> for every parameter (zeros where it gets no gradient);
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
    """The model's configuration: every key of __metadata__["config"], all required."""
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

    def patch_width(self, m):
        """P_m: the features of one patch of modality m."""
        return -(-self.features[m] // self.patches)


POSITIVE_INTS = ("modalities", "patches", "dim", "heads", "experts", "top_k", "hidden", "classes")
NON_NEGATIVE_NUMBERS = ("gate_loss_weight", "noise_epsilon", "layernorm_eps")


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
    missing, unknown = [k for k in keys if k not in raw], sorted(set(raw) - set(keys))
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
    return Config(**dict(raw, features=tuple(features)))


def parameter_shapes(cfg):
    """Every parameter's name and shape, in the order of the documentation."""
    M, d, E, H = cfg.modalities, cfg.dim, cfg.experts, cfg.hidden
    shapes = {}
    for m in range(M):
        shapes[f"encoder.{m}.weight"] = (cfg.patch_width(m), d)
        shapes[f"encoder.{m}.bias"] = (d,)
    shapes.update({
        "bank": (2 ** M - 1, M, cfg.patches, d),
        "position": (M * cfg.patches, d),
        "attention.norm.weight": (d,), "attention.norm.bias": (d,),
        "attention.q.weight": (d, d), "attention.kv.weight": (d, 2 * d),
        "attention.out.weight": (d, d), "attention.out.bias": (d,),
        "moe.norm.weight": (d,), "moe.norm.bias": (d,),
        "moe.gate.weight": (d, E), "moe.noise.weight": (d, E),
        "moe.w1": (E, d, H), "moe.b1": (E, H), "moe.w2": (E, H, d), "moe.b2": (E, d),
        "head.weight": (M * d, cfg.classes), "head.bias": (cfg.classes,),
    })
    return shapes


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


def check_tensors(tensors, specs):
    """Every required tensor present, none unknown, each with its dtype and shape."""
    missing = [name for name, (_, _, required) in specs.items() if required and name not in tensors]
    if missing:
        raise InputError("missing tensor" + "s" * (len(missing) > 1) + " " + ", ".join(f"'{n}'" for n in missing))
    unknown = [name for name in tensors if name not in specs]
    if unknown:
        raise InputError("unexpected tensor" + "s" * (len(unknown) > 1) + " " + ", ".join(f"'{n}'" for n in unknown))
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
    check_tensors(tensors, input_specs(cfg, observed.shape[0]))
    combination = check_batch_values(cfg, tensors)
    check_finite(tensors, DROPOUT_MASKS)

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
    """[B, M * patches, d]: each modality's patches encoded (or its bank tokens when missing), plus
    the position embedding."""
    blocks = []
    for m, features in enumerate(batch.features):
        observed = batch.observed[:, m]
        # Rows of missing modalities may hold anything (NaN included): zeroed, so no 0 * NaN in dW.
        features = torch.where(observed[:, None], features, torch.zeros_like(features))
        width = cfg.patch_width(m)
        patches = F.pad(features, (0, cfg.patches * width - features.shape[1])).view(-1, cfg.patches, width)
        tokens = patches @ p[f"encoder.{m}.weight"] + p[f"encoder.{m}.bias"]
        blocks.append(torch.where(observed[:, None, None], tokens, p["bank"][batch.combination, m]))
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


def experts(p, u, indices, gates):
    """sum_i gates[:, i] * expert_{indices[:, i]}(u), each expert GELU(u W1 + b1) W2 + b2 run on its
    own rows only."""
    y = torch.zeros_like(u)
    for e in range(p["moe.w1"].shape[0]):
        rows, slots = (indices == e).nonzero(as_tuple=True)
        if rows.numel():
            h = F.gelu(u[rows] @ p["moe.w1"][e] + p["moe.b1"][e])
            y = y.index_add(0, rows, gates[rows, slots, None] * (h @ p["moe.w2"][e] + p["moe.b2"][e]))
    return y


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


def smoe(cfg, p, u, combination, noise):
    """The SMoE on rows u [rows, d] with FastMoE's noisy top-k gate (the inference gate when noise
    is None). Returns y [rows, d], the gate loss (S-Router cross-entropy + the G-Router's cv^2 of
    importance and load in each token group: 0 = full-modality samples, 1 = the others) and the
    top min(k + 1, E) experts of each row, best first (the first k are the routing)."""
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
    y = experts(p, u, indices, gates)

    group = (combination > 0).long()
    importance = torch.zeros(2, E, dtype=u.dtype).index_put(
        (group[:, None].expand_as(indices), indices), gates, accumulate=True)
    if noise is not None and k < E:
        load = sum_by_group(group, probability_in_top_k(clean, noisy, std, top_values, k))
    else:
        load = sum_by_group(group, F.one_hot(indices, E).sum(dim=1).to(u.dtype))
    balance = sum(cv_squared(importance[g]) + cv_squared(load[g]) for g in range(2))
    return y, router_cross_entropy(noisy, combination) + balance, top_indices


def forward(cfg, p, batch):
    """The model on a batch: (outputs, ranking), outputs the named tensors of the output file
    except the gradients, ranking [M, B * patches, min(k + 1, E)] each chunk's experts, best first."""
    B, P, d = batch.observed.shape[0], cfg.patches, cfg.dim
    tokens = embed(cfg, p, batch)
    x = attention(cfg, p, tokens, batch.dropout_attention)
    row_combination = batch.combination.repeat_interleave(P)
    chunks, gate_losses, rankings = [], [], []
    for m in range(cfg.modalities):
        t = x[:, m * P:(m + 1) * P].reshape(B * P, d)
        u = F.layer_norm(t, (d,), p["moe.norm.weight"], p["moe.norm.bias"], cfg.layernorm_eps)
        noise = None if batch.gate_noise is None else batch.gate_noise[m]
        y, gate_loss, ranking = smoe(cfg, p, u, row_combination, noise)
        mask = None if batch.dropout_moe is None else batch.dropout_moe[m]
        chunks.append((t + apply_dropout(y, mask)).view(B, P, d))
        gate_losses.append(gate_loss)
        rankings.append(ranking)
    moe = torch.cat(chunks, dim=1)
    pooled = moe.view(B, cfg.modalities, P, d).mean(dim=2).reshape(B, cfg.modalities * d)
    logits = pooled @ p["head.weight"] + p["head.bias"]
    task_loss = F.cross_entropy(logits, batch.labels, weight=batch.class_weights)
    gate_loss = sum(gate_losses)
    ranking = torch.stack(rankings)
    outputs = {
        "out.logits": logits, "out.loss": task_loss + cfg.gate_loss_weight * gate_loss,
        "out.task_loss": task_loss, "out.gate_loss": gate_loss,
        "act.tokens": tokens, "act.attention": x, "act.moe": moe, "act.pooled": pooled,
        "out.indices": ranking[..., :cfg.top_k].int(),
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
# One full sample, two with one modality missing, two with one observed (combinations 0, 2, 5, 6, 1).
SELFTEST_OBSERVED = [[1, 1, 1], [1, 0, 1], [0, 1, 0], [0, 0, 1], [1, 1, 0]]
FD_STEP = 1e-6
FD_TOLERANCE = 1e-6      # of each tensor's largest gradient
FD_ENTRIES = 6           # perturbed entries per parameter
SELFTEST_DROPOUT = 0.5   # the rate p of the selftest's dropout masks
# Scaled by 1/sqrt(fan-in) in the selftest's problem (the others are N(0, 0.25)).
DENSE_WEIGHTS = ("attention.q.weight", "attention.kv.weight", "attention.out.weight", "moe.gate.weight",
                 "moe.noise.weight", "moe.w1", "moe.w2", "head.weight")


def selftest_problem(generator, training, dropout=False):
    """Random F32 parameters and a batch of SELFTEST_CONFIG as name -> tensor: NaN features where a
    modality is missing, class weights, the combination indices, when training gate noise and, with
    dropout, both dropout masks (0 or 1/(1-p), p = SELFTEST_DROPOUT)."""
    cfg = parse_config({"config": json.dumps(SELFTEST_CONFIG)})

    def normal(*shape, scale=1.0):
        return torch.randn(shape, generator=generator) * scale

    tensors = {name: normal(*shape, scale=0.5) for name, shape in parameter_shapes(cfg).items()}
    for name in DENSE_WEIGHTS:
        tensors[name] *= 2.0 * tensors[name].shape[-2] ** -0.5
    for name in ("attention.norm.weight", "moe.norm.weight"):
        tensors[name] += 1.0
    observed = torch.tensor(SELFTEST_OBSERVED, dtype=torch.int32)
    B = observed.shape[0]
    for m, width in enumerate(cfg.features):
        features = normal(B, width)
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
    """Every output name with its shape and dtype, all finite (the missing rows hold NaN)."""
    B, M, P, d, k = len(SELFTEST_OBSERVED), cfg.modalities, cfg.patches, cfg.dim, cfg.top_k
    expected = {"out.logits": (B, cfg.classes), "out.loss": (), "out.task_loss": (), "out.gate_loss": (),
                "act.tokens": (B, M * P, d), "act.attention": (B, M * P, d), "act.moe": (B, M * P, d),
                "act.pooled": (B, M * d), "out.indices": (M, B * P, k)}
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
    return failures


def finite_difference_check(in_path, outputs, generator):
    """Central differences of the loss for FD_ENTRIES entries of every parameter (its largest
    gradient among them) against the written gradients, within FD_TOLERANCE of each tensor's
    largest gradient; perturbations that change any chunk's top-(k+1) ranking (a kink of the loss)
    are skipped, and every parameter must keep at least one entry."""
    cfg, _, params, batch = load_problem(in_path, torch.float64)
    with torch.no_grad():
        base_ranking = forward(cfg, params, batch)[1]
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
                    result, ranking = forward(cfg, params, batch)
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


def check_model(tmp, generator, training, dropout=False):
    """The CLI on a random problem (with dropout masks when dropout) in float64 (output names,
    shapes, finiteness, finite differences of every parameter) and in float32 (close to float64,
    same routing)."""
    mode = ("training" if training else "inference") + ".dropout" * dropout
    in_path, out64, out32 = (os.path.join(tmp, f"{mode}.{n}.safetensors") for n in ("in", "f64", "f32"))
    write_safetensors(in_path, selftest_problem(generator, training, dropout),
                      {"config": json.dumps(SELFTEST_CONFIG)})
    cfg = parse_config({"config": json.dumps(SELFTEST_CONFIG)})
    start = time.perf_counter()
    status, stderr = call_main([in_path, out64])
    elapsed = time.perf_counter() - start
    if status != 0:
        return [f"exit status {status}: {stderr.strip()}"], ""
    outputs, metadata = read_safetensors(out64)
    failures = check_output_file(cfg, outputs, torch.float64)
    if metadata != {"config": json.dumps(SELFTEST_CONFIG), "dtype": "F64"}:
        failures.append(f"metadata {metadata}")
    noise_gradient = outputs["grad.moe.noise.weight"].abs().max().item()
    if (noise_gradient > 0) != training:
        failures.append(f"grad.moe.noise.weight has largest entry {noise_gradient:.3g} in {mode}")
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
        for name in ("out.loss", "out.logits", "act.moe", "grad.moe.w1"):
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
    runs, failures = {}, []
    for label, masks in inputs.items():
        runs[label], failure = cli_outputs(tmp, dict(tensors, **masks), config)
        if failure:
            failures.append(f"{label}: {failure}")
    if failures:
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


def check_errors(tmp, generator):
    """Malformed inputs: exit status 1 and a message naming the tensor."""
    cases = {
        "moe.w2": lambda t: t.pop("moe.w2"),
        "position": lambda t: t.update(position=torch.zeros(t["position"].shape[0], t["position"].shape[1] + 1)),
        "input.observed": lambda t: t["input.observed"][2].zero_(),
        "input.combination": lambda t: t["input.combination"][1:2].add_(1),
        "input.dropout.moe": lambda t: t.update({"input.dropout.moe": t["input.dropout.moe"][..., 1:]}),
        "input.dropout.attention": lambda t: t["input.dropout.attention"][1, 2, 3].fill_(math.inf),
    }
    failures = []
    for name, corrupt in cases.items():
        tensors = selftest_problem(generator, training=True, dropout=True)
        corrupt(tensors)
        path = os.path.join(tmp, "bad.safetensors")
        write_safetensors(path, tensors, {"config": json.dumps(SELFTEST_CONFIG)})
        status, stderr = call_main([path, os.path.join(tmp, "bad.out.safetensors")])
        if status != 1 or f"'{name}'" not in stderr:
            failures.append(f"bad '{name}': exit status {status}, message {stderr.strip()!r}")
    return failures, ("missing tensor, wrong shape (a parameter, a dropout mask), no observed modality, wrong "
                      "combination, infinite dropout factor: status 1, tensor named")


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
