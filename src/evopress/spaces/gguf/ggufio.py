"""Reading and writing GGUF files: the model a search starts from, the mixed-type file it exports, the imatrix.

Why gguf-py (``gguf.GGUFReader`` / ``gguf.GGUFWriter``) for the container: it is llama.cpp's own Python
package, so KV fields, tensor infos and alignment come out the way llama.cpp reads them, and nothing here
hand-rolls the binary layout. The tensor bytes themselves are ggml blocks; new ones come from
``types.quantize`` (libgguf), old ones are copied untouched so an export only changes what the search chose.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ...errors import UserError
from ...io import atomic_write
from .types import load_libgguf


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: ``shape`` is (rows, ne0) for 2-D, (ne0,) for 1-D (numpy order)."""

    name: str
    qtype: str
    shape: tuple[int, ...]


@dataclass
class Source:
    """What a search needs to know about the GGUF it starts from; the tensors stay on disk."""

    path: Path
    arch: str
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    n_head: int = 0
    n_head_kv: int = 0
    n_layer: int = 0
    tied: bool = False


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UserError("the gguf space needs gguf-py: pip install 'gguf>=0.10'") from None
    return gguf


def _open(path: Path) -> Any:
    """A GGUFReader of ``path``, or one line saying the file is no GGUF (or is cut short)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    stat = path.stat()
    return _open_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, mtime_ns: int, size: int) -> Any:
    # Parsing the KV section (a tokenizer of 50k strings) takes a while; the key makes an edited file re-read.
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path)
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on foreign or cut files
        raise UserError(f"{path} is not a GGUF file or is truncated ({type(e).__name__}: {e})".replace("\n", " ")) \
            from None
    if end > size:
        raise UserError(f"{path} is not a GGUF file or is truncated (tensor data ends at {end}, file has {size} bytes)")
    if reader.endianess != gguf.GGUFEndian.LITTLE:
        raise UserError(f"{path} is a big-endian GGUF; convert it with gguf_convert_endian.py first")
    return reader


def _scalar(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    return default if f is None else f.contents()


def read_header(path: Path) -> Source:
    """The architecture, tensors and head counts of a GGUF, without loading any tensor data."""
    reader = _open(path)
    arch = _scalar(reader, "general.architecture")
    if not arch:
        raise UserError(f"{path} has no general.architecture: not a model GGUF")
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed([int(x) for x in t.shape]))  # ggml ne -> numpy order
        tensors[t.name] = TensorInfo(t.name, t.tensor_type.name, shape)
    head = _scalar(reader, f"{arch}.attention.head_count", 0)
    head = int(head[0] if isinstance(head, list) else head)  # per-layer arrays exist (e.g. OpenELM)
    head_kv = _scalar(reader, f"{arch}.attention.head_count_kv", head)
    head_kv = int(head_kv[0] if isinstance(head_kv, list) else head_kv)
    return Source(path=Path(path), arch=str(arch), tensors=tensors, n_head=head, n_head_kv=head_kv,
                  n_layer=int(_scalar(reader, f"{arch}.block_count", 0)), tied="output.weight" not in tensors)


def _tensor(reader: Any, name: str) -> Any:
    for t in reader.tensors:
        if t.name == name:
            return t
    raise KeyError(f"{name} is not a tensor of {reader.data.filename}")


def _raw(reader: Any, t: Any) -> np.ndarray:
    """The tensor's stored bytes, uint8 [..., row bytes], as a view of the memory-mapped file."""
    raw = reader.data[t.data_offset:t.data_offset + int(t.n_bytes)]
    gguf = _gguf()
    ne = [int(x) for x in t.shape]
    block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    return raw.reshape(*reversed(ne[1:]), ne[0] // block * size)


def dequantized(source: Source, name: str) -> np.ndarray:
    """float32 [rows, ne0] of a tensor of the file, decoded by gguf-py (llama.cpp's reference decoder)."""
    gguf = _gguf()
    reader = _open(source.path)
    t = _tensor(reader, name)
    out = gguf.quants.dequantize(np.asarray(_raw(reader, t)), t.tensor_type)
    return np.ascontiguousarray(out, dtype=np.float32)


def _llama_permutation(rows: int, n_head: int) -> np.ndarray | None:
    """Row indices of convert_hf_to_gguf's ``permute(w, n_head)``: ``permute(w) == w[perm]``."""
    if n_head <= 0 or rows % (2 * n_head):
        return None
    idx = np.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def row_order(reference: np.ndarray, hf: np.ndarray, heads: Sequence[int]) -> np.ndarray:
    """Index array ``perm`` with ``reference ≈ hf[perm]``: identity or llama's q/k head permutation.

    Why: transformers un-permutes llama's q/k rows when it loads a GGUF, so weights edited on the HF side
    must be put back in GGUF row order before they are written. The tolerance (1e-2 of max |reference|)
    admits bf16 rounding of ``hf``; anything further off is a different tensor, not a reordering.
    """
    reference = np.asarray(reference, dtype=np.float32)
    hf = np.asarray(hf, dtype=np.float32)
    if reference.shape != hf.shape or reference.ndim != 2:
        raise ValueError(f"row_order: shapes differ or are not 2-D ({reference.shape} vs {hf.shape})")
    rows = reference.shape[0]
    candidates = [np.arange(rows)]
    for n in dict.fromkeys(int(h) for h in heads):
        perm = _llama_permutation(rows, n)
        if perm is not None:
            candidates.append(perm)
    errors = [float(np.max(np.abs(reference - hf[p]))) for p in candidates]
    best = int(np.argmin(errors))
    tol = 1e-2 * float(np.max(np.abs(reference)))
    if not errors[best] <= tol:
        raise ValueError(f"row_order: no row order matches (best max |diff| {errors[best]:.3g} > {tol:.3g})")
    return candidates[best]


def _copy_kv(reader: Any, writer: Any, file_type: int | None) -> None:
    """Every KV field of ``reader`` into ``writer`` in file order, strings as their exact bytes."""
    gguf = _gguf()
    VT = gguf.GGUFValueType
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == gguf.Keys.General.ARCHITECTURE:
            continue  # the reader's header pseudo-fields; GGUFWriter writes the architecture itself
        vtype = f.types[0]
        sub = None
        if f.name == gguf.Keys.General.FILE_TYPE and file_type is not None:
            value: Any = int(file_type)
        elif vtype == VT.STRING:
            value = bytes(f.parts[f.data[0]])
        elif vtype == VT.ARRAY:
            sub = f.types[-1]
            if len(f.types) != 2:
                raise UserError(f"{reader.data.filename}: nested array {f.name} is not supported")
            if sub == VT.STRING:
                value = [bytes(f.parts[i]) for i in f.data]
            else:
                value = f.contents()
            if not value:  # gguf-py's writer refuses empty arrays; llama.cpp reads a missing one the same
                continue
        else:
            value = f.contents()
        writer.add_key_value(f.name, value, vtype, sub_type=sub)
    if file_type is not None and gguf.Keys.General.FILE_TYPE not in reader.fields:
        writer.add_uint32(gguf.Keys.General.FILE_TYPE, int(file_type))


def write_gguf(source: Source, out: Path, tensors: Mapping[str, tuple[str, np.ndarray]],
               file_type: int | None = None) -> int:
    """Write ``source`` again with some tensors replaced; return the new file's size in bytes.

    ``tensors`` maps a tensor name to (type name, raw uint8 rows [rows, row bytes] in GGUF row order). Every
    other tensor keeps its type and bytes, and every KV field is kept (``general.file_type`` becomes
    ``file_type`` when given), so the result differs from the source only where the search decided.
    Tensors are streamed one at a time from the memory-mapped source; the file appears atomically.
    """
    gguf = _gguf()
    reader = _open(source.path)
    unknown = sorted(set(tensors) - {t.name for t in reader.tensors})
    if unknown:
        raise KeyError(f"not tensors of {source.path}: {', '.join(unknown)}")
    arch = _scalar(reader, gguf.Keys.General.ARCHITECTURE)

    plan: list[tuple[str, Any, np.ndarray]] = []  # (name, ggml type, uint8 bytes in numpy byte shape)
    for t in reader.tensors:
        if t.name in tensors:
            qname, raw = tensors[t.name]
            qtype = gguf.GGMLQuantizationType[qname]
            raw = np.ascontiguousarray(raw).view(np.uint8)
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            ne = [int(x) for x in t.shape]
            want = (*reversed(ne[1:]), ne[0] // block * size)
            if ne[0] % block or raw.shape != want:
                raise ValueError(f"{t.name}: {qname} bytes of shape {raw.shape}, the tensor needs {want}")
            plan.append((t.name, qtype, raw))
        else:
            plan.append((t.name, t.tensor_type, _raw(reader, t)))

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.data_alignment = reader.alignment  # general.alignment itself is copied with the KV fields
        try:
            _copy_kv(reader, writer, file_type)
            for name, qtype, raw in plan:
                writer.add_tensor_info(name, raw.shape, raw.dtype, raw.nbytes, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _, _, raw in plan:
                writer.write_tensor_data(raw)
            writer.flush()
            for f in writer.fout or ():
                os.fsync(f.fileno())
        finally:
            writer.close()

    out = Path(out)
    atomic_write(out, write)
    return out.stat().st_size


def write_imatrix(path: Path, entries: Mapping[str, np.ndarray], counts: Mapping[str, int], chunk_size: int,
                  datasets: Sequence[str]) -> None:
    """An importance matrix in llama.cpp's GGUF imatrix format, so ``llama-quantize --imatrix`` can use it.

    ``entries`` are per-column mean squares of a tensor's input; the file stores what llama-imatrix stores:
    the raw sums (``<name>.in_sum2``, ne=[ne0, 1]) and the token count (``<name>.counts``, ne=[1, 1]).
    """
    gguf = _gguf()
    if not entries:
        raise ValueError("write_imatrix: no entries")
    chunk_count = max(-(-int(c) // max(1, int(chunk_size))) for c in counts.values()) if counts else 0

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, "")  # an empty arch adds no general.architecture, as llama-imatrix
        try:
            writer.add_type("imatrix")
            writer.add_key_value(gguf.Keys.IMatrix.DATASETS, list(datasets) or [""], gguf.GGUFValueType.ARRAY,
                                 sub_type=gguf.GGUFValueType.STRING)
            writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, chunk_count)
            writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(chunk_size))
            for name, mean in entries.items():
                n = int(counts[name])
                total = (np.asarray(mean, dtype=np.float64).reshape(1, -1) * n).astype(np.float32)
                writer.add_tensor(f"{name}.in_sum2", total)
                writer.add_tensor(f"{name}.counts", np.full((1, 1), n, dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.flush()
        finally:
            writer.close()

    atomic_write(Path(path), write)


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """Per-column mean squares by tensor name, read the way llama-quantize does (sum / count)."""
    try:
        return load_libgguf().load_imatrix(path)
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not an imatrix file ({e})") from None


_REGEX_SPECIAL = set("\\^$.|?*+()[]{}")


def tensor_type_args(types: Mapping[str, str]) -> list[str]:
    """llama-quantize options that give each named tensor exactly its type (and nothing else a new type).

    Read in ggml-org/llama.cpp: tools/quantize/quantize.cpp (commit 03161a4e) and src/llama-quant.cpp
    (commits 007dbbf3 and 8784689f). ``--tensor-type PATTERN=TYPE`` splits at the first '=', lowercases
    PATTERN, and compiles it as a ``std::regex`` (ECMAScript) that is matched with ``std::regex_search``,
    i.e. unanchored, against the full GGUF tensor name *including* ``.weight``. At 007dbbf3 the first
    matching pattern wins; older versions let the last one win. Either way an anchored, dot-escaped
    ``^blk\\.0\\.attn_q\\.weight$`` selects one tensor only (plain ``blk.1.attn_q`` would also hit
    ``blk.10.``). ``--token-embedding-type`` and ``--output-tensor-type`` set token_embd.weight and
    output.weight and win over every pattern and preset rule, so those two use them. Caveats seen there:
    patterns act only when the file type's default type is quantized (not F16/BF16/F32); the shape fallback
    (e.g. Q4_K -> Q5_0 for 576-wide rows) still applies after a pattern; at 8784689f a pattern was ignored
    for a tensor whose preset type had itself fallen back, and ``--pure`` disabled patterns.
    """
    args: list[str] = []
    for name, qtype in types.items():
        if name != name.lower():
            raise ValueError(f"{name}: llama-quantize lowercases --tensor-type patterns, so it cannot match")
        if name == "token_embd.weight":
            args += ["--token-embedding-type", qtype]
        elif name == "output.weight":
            args += ["--output-tensor-type", qtype]
        else:
            pattern = "".join("\\" + c if c in _REGEX_SPECIAL else c for c in name)
            if "=" in pattern:
                raise ValueError(f"{name}: '=' cannot appear in a --tensor-type pattern")
            args += ["--tensor-type", f"^{pattern}$={qtype}"]
    return args
