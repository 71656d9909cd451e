"""KL(dense || candidate) per position, from the teacher's hidden-sized entries.

Full-vocabulary teacher logits would take tokens x vocab floats (hundreds of GB for a real calibration
pool). For a linear LM head (z = W s + b) the KL needs far less, because
KL(p || softmax(z)) = sum p log p - p.b - (W^T p).s + logsumexp(z): per predicted position the teacher
keeps the hidden-sized vector u = W^T p and the scalar a = sum p log p - p.b (plus the dense NLL, for
reports). A candidate's KL then costs its own LM head and one logsumexp. Heads that are not linear
(Gemma-2's logit soft-capping) keep the dense final normed hidden states instead and recompute teacher
log-probs chunk by chunk.

Precision: in a bf16/fp16 model the LM head, logsumexp and hidden-space products are computed in
float32 (``Decoder.logits``), the teacher's softmax in float64, so the identity is as exact as in a
float32 model and the dense model scores 0.

Memory: every vocabulary-sized temporary is bounded by a ``block_bytes``: positions are chunked so a
[positions, vocab] block fits it, and a half-precision head weight is upcast in blocks of vocabulary rows
that fit it. Each chunk is its own function so that its blocks are freed before the next chunk's are made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import HEAD_BLOCK_BYTES, Decoder, head_rows

HOST_BLOCK_BYTES = 32 << 20  # LM-head temporaries of a CPU model: host RAM, next to the database cache


def linear_head(decoder: Decoder) -> bool:
    """Whether logits are an affine function of the normed hidden state (the identity's condition)."""
    return isinstance(decoder.head, torch.nn.Linear) and not decoder.softcap


def block_bytes_for(device: torch.device) -> int:
    """The default bound on LM-head temporaries. On the CPU they are host RAM, which also holds the model,
    the database cache and the teacher cache, and a 1,024-position chunk of a 49k vocabulary in float64
    is 384 MiB; a smaller block costs only more passes over the head weight (a few % of its matmul)."""
    return HOST_BLOCK_BYTES if device.type == "cpu" else HEAD_BLOCK_BYTES


def chunk_positions(chunk_tokens: int, block_bytes: int, vocab: int, itemsize: int) -> int:
    """Positions per LM-head chunk: at most ``chunk_tokens``, and few enough that one [positions, vocab]
    block of ``itemsize``-byte floats fits ``block_bytes`` (1,024 positions of a 128k vocabulary in
    float64 would be 1 GiB of accelerator memory next to the model)."""
    return max(1, min(chunk_tokens, block_bytes // (itemsize * vocab)))


def fp32_product(p: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
    """p @ weight in float32, upcasting ``rows`` vocabulary rows of a bf16/fp16 head at a time
    (``head_rows``: a whole fp32 copy of a 128k-vocabulary head would be GBs of accelerator memory)."""
    out = p[:, :rows] @ weight[:rows].float()
    for i in range(rows, weight.shape[0], rows):
        out += p[:, i: i + rows] @ weight[i: i + rows].float()
    return out


def predicted(hidden: torch.Tensor) -> torch.Tensor:
    """[B, T, H] -> [B*(T-1), H]: the last position has no next token and is dropped."""
    return hidden[:, :-1].reshape(-1, hidden.shape[-1])


def logsumexp_(z: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension, overwriting ``z``: ``torch.logsumexp`` allocates another
    vocabulary-sized temporary per chunk, which on CPU costs more than the exp itself."""
    m = z.amax(dim=-1, keepdim=True)
    return z.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))


@torch.inference_mode()
def teacher_targets(decoder: Decoder, normed: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                    block_bytes: int = HEAD_BLOCK_BYTES, keep_hidden: bool = False) -> dict[str, torch.Tensor]:
    """What the KL against the dense model needs at each predicted position [N, H] (labels [N]).

    ``keep_hidden``: the normed hidden states even for a linear head. Why: the identity holds only when the
    candidate's head is the dense one; a space that compresses the head scores against a dense copy of it.
    """
    if keep_hidden or not linear_head(decoder):
        return {"hidden": normed}
    weight = decoder.head.weight
    # two float64 blocks are alive at once in a chunk (``_teacher_chunk``)
    step, rows = chunk_positions(chunk_tokens, block_bytes, len(weight), 16), head_rows(weight, block_bytes)
    chunks = [_teacher_chunk(decoder, normed[i: i + step], labels[i: i + step], block_bytes, rows)
              for i in range(0, len(normed), step)]
    return {k: torch.cat([c[k] for c in chunks]) for k in ("u", "a", "nll")}


def _teacher_chunk(decoder: Decoder, normed: torch.Tensor, labels: torch.Tensor, block_bytes: int,
                   rows: int) -> dict[str, torch.Tensor]:
    """One chunk of ``teacher_targets``. At most two float64 blocks live at once: ``log_p`` goes before
    ``p`` is rounded to float32, and p . log_p is a batched dot product, not an elementwise product."""
    weight, bias = decoder.head.weight, decoder.head.bias
    # float64 once per position: a float32 softmax over a large vocabulary sums to 1 + ~1e-5, and
    # the identity multiplies that error by logsumexp (~20), a bias the full-logit KL mostly cancels
    log_p = F.log_softmax(decoder.logits(normed, block_bytes).double(), dim=-1)
    nll = -log_p.gather(1, labels[:, None]).squeeze(1).float()
    p = log_p.exp()
    a = torch.bmm(p[:, None, :], log_p[:, :, None]).view(-1)
    del log_p
    if bias is not None:
        a -= p @ bias.double()
    return {"a": a.float(), "u": fp32_product(p.float(), weight, rows), "nll": nll}


@torch.inference_mode()
def compare(decoder: Decoder, student: torch.Tensor, targets: dict[str, torch.Tensor], chunk_tokens: int,
            block_bytes: int = HEAD_BLOCK_BYTES, teacher_head: tuple[torch.Tensor, torch.Tensor | None] | None = None
            ) -> torch.Tensor:
    """Per window, the sums of KL(teacher || student), student NLL and teacher NLL over its predicted positions.

    ``student`` holds final-normed hidden states [B, T, H]; ``targets`` the teacher's entries and the
    labels for the same positions, on the device. Per window [B, 3], not one total: windows are the
    independent units of a sample, so their spread measures its noise (``fitness.aggregate``) and their
    sources give per-source KLs. ``teacher_head``: the dense head's (weight, bias) for teacher entries kept as
    hidden states, when the candidate's own head is compressed. The float64 sums stay on the device: reading them would stall the
    device queue, so callers read many candidates' sums at once.
    """
    s = predicted(student)
    rows = torch.empty(len(s), 3, dtype=torch.float64, device=s.device)
    step = chunk_positions(chunk_tokens, block_bytes, decoder.head.weight.shape[0], 4)
    for i in range(0, len(s), step):
        rows[i: i + step] = _compare_chunk(decoder, s[i: i + step], {k: v[i: i + step] for k, v in targets.items()},
                                           block_bytes, teacher_head)
    return rows.view(student.shape[0], -1, 3).sum(1)


def _compare_chunk(decoder: Decoder, part: torch.Tensor, targets: dict[str, torch.Tensor],
                   block_bytes: int, teacher_head: tuple[torch.Tensor, torch.Tensor | None] | None) -> torch.Tensor:
    """``compare``'s terms at each position of one chunk [N, 3]."""
    z = decoder.logits(part, block_bytes)
    y = targets["labels"]
    z_y = z.gather(1, y[:, None]).squeeze(1)
    if "u" in targets:  # linear head: the hidden-space identity (module docstring)
        lse = logsumexp_(z)
        kl = targets["a"] + lse - (part.float() * targets["u"]).sum(-1)
        dense_nll = targets["nll"]
    else:
        lse = torch.logsumexp(z, dim=-1)
        log_p = F.log_softmax(decoder.logits(targets["hidden"], block_bytes, teacher_head), dim=-1)
        kl = (log_p.exp() * (log_p - (z - lse[:, None]))).sum(-1)
        dense_nll = -log_p.gather(1, y[:, None]).squeeze(1)
    return torch.stack([kl, lse - z_y, dense_nll], dim=1).double()
