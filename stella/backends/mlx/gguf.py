"""Import a llama-architecture GGUF file into an mlx-lm model directory.

mlx-lm has no GGUF importer, but MLX reads GGUF: quantized weights arrive as
MLX affine-quantized triples (weight, scales, biases). This module renames the
tensors, writes `config.json` with the quantization layout, and rebuilds the
tokenizer (`tokenizer.json`) from the GGUF vocabulary and merges without
transformers' torch-based GGUF path. Everything here touches MLX, so it must run
on the thread that owns MLX.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

# GGUF block tensor names -> mlx-lm llama module names.
_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
CONTROL = 3  # GGUF token type of special tokens


class GGUFError(Exception):
    """The GGUF file can't be imported (wrong architecture, missing metadata)."""


class OutputError(GGUFError):
    """The import's output directory can't be written (disk full, no permission)."""


TMP_PREFIX = ".import-"  # an import's files while it writes them


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_key(path: Path) -> str:
    """Name of the cache directory for a GGUF file: its size and a SHA-256 prefix."""
    return f"{path.stat().st_size}-{file_digest(path)[:16]}"


def _meta(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    value = metadata.get(key, default)
    if value is None:
        raise GGUFError(f"GGUF metadata has no {key!r}")
    # MLX returns scalars as 0-d arrays and strings as str; lists as lists.
    if hasattr(value, "item"):
        value = value.item()
    return value


def _rename(name: str) -> str:
    base, _, suffix = name.rpartition(".")
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        if part not in _BLOCK:
            raise GGUFError(f"unexpected tensor {name!r}")
        return f"model.layers.{layer}.{_BLOCK[part]}.{suffix}"
    if base in _TOP:
        return f"{_TOP[base]}.{suffix}"
    raise GGUFError(f"unexpected tensor {name!r}")


def _quant_bits(weights: dict[str, Any], module: str) -> tuple[int, int] | None:
    """(bits, group_size) of a quantized module, from the array shapes.

    The GGUF types MLX reads (Q4_0, Q4_1, Q8_0) all quantize in blocks of 32.
    """
    scales = weights.get(f"{module}.scales")
    if scales is None:
        return None
    group = 32
    packed_bits = weights[f"{module}.weight"].shape[-1] * 32  # uint32 words
    in_features = scales.shape[-1] * group
    bits, rest = divmod(packed_bits, in_features)
    return (bits, group) if not rest and bits in (2, 3, 4, 5, 6, 8) else None


def _umask() -> int:
    """The process's umask (read by setting it, and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_parent(out: Path) -> None:
    """Make the directory `out` goes in, or say why it cannot be (an OutputError)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # mkdir's word for a file where a directory should be
        raise OutputError(f"cannot write {out}: {exc.filename} is not a directory") from exc
    except OSError as exc:
        raise OutputError(f"cannot write {exc.filename or out}: {exc.strerror or exc}") from exc


# GGUF metadata value types (the spec's gguf_metadata_value_type) of a fixed size.
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
# ggml tensor types: (elements per block, bytes per block), as ggml's type traits.
_GGML_TYPES = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
}
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 8  # arrays of arrays: real files have none; a bound on a corrupt one


class _Header:
    """A GGUF file's header read through a buffered file, every read bounds-checked
    against the file's size (nothing is read that the file does not hold)."""

    def __init__(self, fh: Any, size: int) -> None:
        self.fh = fh
        self.size = size
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        """The next `n` bytes; a GGUFError if the file ends first."""
        if n > self.size - self.pos:
            raise GGUFError(f"{what} runs past the end of the file (at byte {self.pos})")
        data = self.fh.read(n)
        self.pos += n
        return cast(bytes, data)

    def skip(self, n: int, what: str) -> None:
        """Pass `n` bytes without reading them."""
        if n > self.size - self.pos:
            raise GGUFError(f"{what} runs past the end of the file (at byte {self.pos})")
        self.fh.seek(n, os.SEEK_CUR)
        self.pos += n

    def u32(self, what: str) -> int:
        """A little-endian uint32."""
        return cast(int, struct.unpack("<I", self.take(4, what))[0])

    def u64(self, what: str) -> int:
        """A little-endian uint64."""
        return cast(int, struct.unpack("<Q", self.take(8, what))[0])

    def string(self, what: str) -> str:
        """A gguf_string_t: a uint64 length and that many bytes of UTF-8."""
        raw = self.take(self.u64(what), what)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise GGUFError(f"{what} is not UTF-8 (at byte {self.pos})") from None

    def value(self, kind: int, what: str, depth: int = 0) -> Any:
        """A metadata value of type `kind`: a scalar's int; strings and arrays are passed."""
        if kind in _SCALAR_SIZE:
            raw = self.take(_SCALAR_SIZE[kind], what)
            return int.from_bytes(raw, "little")
        if kind == _STRING:  # passed: a value's bytes are MLX's and the tokenizer's to read
            self.skip(self.u64(what), what)
            return None
        if kind != _ARRAY or depth >= _MAX_NESTING:
            raise GGUFError(f"{what} has an unknown value type {kind}")
        item, count = self.u32(what), self.u64(what)
        if item in _SCALAR_SIZE:
            self.skip(count * _SCALAR_SIZE[item], what)
            return None
        for _ in range(count):  # each item takes at least 8 bytes: bounded by the size
            self.value(item, what, depth + 1)
        return None


def check_header(src: Path) -> None:
    """Refuse a file whose GGUF header is not whole and consistent (per the GGUF spec:
    version, metadata, tensor infos, each tensor's data inside the file), reading the
    header alone: MLX's reader trusts it, and a corrupt one crashes the process."""
    size = src.stat().st_size
    with src.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise GGUFError(f"{src} is not a GGUF file (it does not start with GGUF)")
        head = _Header(fh, size)
        head.pos = 4
        try:
            _check_header(head)
        except GGUFError as exc:
            raise GGUFError(f"{src} is a corrupt GGUF file: {exc}") from None


def _check_header(head: _Header) -> None:
    version = head.u32("the version")
    if version not in (2, 3):
        raise GGUFError(f"version {version} (versions 2 and 3 are known)")
    tensors, kvs = head.u64("the tensor count"), head.u64("the metadata count")
    # Each entry takes some bytes: counts the file cannot hold are found before a loop.
    if tensors * 24 + kvs * 12 > head.size:
        raise GGUFError(f"{tensors} tensors and {kvs} metadata entries do not fit in the file")
    alignment = 32
    for i in range(kvs):
        key = head.string(f"metadata key {i}")
        value = head.value(head.u32(f"metadata {key!r}"), f"metadata {key!r}")
        if key == "general.alignment":
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise GGUFError(f"general.alignment {value!r} is not a power of two")
            alignment = value
    infos: list[tuple[str, int, int]] = []
    names: set[str] = set()
    for i in range(tensors):
        name = head.string(f"tensor {i}'s name")
        if name in names:
            raise GGUFError(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = head.u32(f"tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise GGUFError(f"tensor {name!r} has {n_dims} dimensions")
        dims = [head.u64(f"tensor {name!r}") for _ in range(n_dims)]
        kind = head.u32(f"tensor {name!r}")
        if kind not in _GGML_TYPES:
            raise GGUFError(f"tensor {name!r} has an unknown type {kind}")
        block, block_bytes = _GGML_TYPES[kind]
        if dims[0] % block:
            raise GGUFError(f"tensor {name!r}: a row of {dims[0]} is not whole blocks")
        count = math.prod(dims)
        infos.append((name, head.u64(f"tensor {name!r}"), count // block * block_bytes))
    data = -(-head.pos // alignment) * alignment  # the data section starts aligned
    for name, offset, nbytes in infos:
        if offset % alignment:
            raise GGUFError(f"tensor {name!r}'s offset {offset} is not aligned to {alignment}")
        if data + offset + nbytes > head.size:
            raise GGUFError(
                f"tensor {name!r} ({nbytes} bytes at {data + offset}) runs past the end of "
                f"the file ({head.size} bytes): an incomplete download?"
            )


def import_gguf(src: Path, out: Path) -> Path:
    """Convert `src` (.gguf) into an mlx-lm model directory at `out`; returns `out`."""
    import mlx.core as mx

    src = Path(src)
    out = Path(out)
    _check_out(out)
    check_header(src)  # before mx.load, which a corrupt header crashes
    # mx.load's stub gives one return type for every format and flag; with metadata
    # asked for, a GGUF file loads as (tensors, metadata).
    tensors, metadata = cast(
        tuple[dict[str, mx.array], dict[str, Any]], mx.load(str(src), return_metadata=True)
    )
    arch = _meta(metadata, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"{src.name}: architecture {arch!r} is not supported (llama only)")
    weights = {_rename(k): v for k, v in tensors.items()}
    hidden = int(_meta(metadata, "llama.embedding_length"))
    vocab_tokens = list(_meta(metadata, "tokenizer.ggml.tokens"))
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(_meta(metadata, "llama.block_count")),
        "intermediate_size": int(_meta(metadata, "llama.feed_forward_length")),
        "num_attention_heads": int(_meta(metadata, "llama.attention.head_count")),
        "num_key_value_heads": int(
            _meta(
                metadata,
                "llama.attention.head_count_kv",
                metadata.get("llama.attention.head_count"),
            )
        ),
        "rms_norm_eps": float(_meta(metadata, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_meta(metadata, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_meta(metadata, "llama.context_length", 2048)),
        "vocab_size": len(vocab_tokens),
        # GGUF stores Q and K permuted for interleaved rotary embeddings.
        "rope_traditional": True,
        "tie_word_embeddings": "lm_head.weight" not in weights,
    }
    quant: dict[str, Any] = {}
    for module in sorted({k.rsplit(".", 1)[0] for k in weights if k.endswith(".scales")}):
        found = _quant_bits(weights, module)
        if found is None:
            raise GGUFError(f"{module}: unsupported quantization layout")
        bits, group = found
        quant.setdefault("_default", (bits, group))
        quant[module] = {"group_size": group, "bits": bits}
    if quant:
        # The most common layout is the default; others are per-module overrides.
        counts: dict[tuple[int, int], int] = {}
        for key, q in quant.items():
            if key != "_default":
                pair = (q["bits"], q["group_size"])
                counts[pair] = counts.get(pair, 0) + 1
        bits, group = max(counts, key=lambda p: counts[p])
        layout: dict[str, Any] = {"group_size": group, "bits": bits}
        for key, q in quant.items():
            if key != "_default" and (q["bits"], q["group_size"]) != (bits, group):
                layout[key] = q
        config["quantization"] = layout
        config["quantization_config"] = layout
    # An earlier import stays whole until the new one is: the new one is written to a
    # temporary directory first. A new OUT is that directory renamed (atomic). An
    # existing one (an earlier import, an empty directory) gets it inside and the files
    # move within OUT: renaming over OUT itself fails on a mount point (EBUSY), and
    # OUT's parent may be a directory we cannot write.
    make_parent(out)
    with _place_locked(out) as (replace, locked):
        _check_out(out)  # again: another import may have made it while this one waited
        place = out if replace else out.parent
        if locked:
            _remove_leftovers(place, inside_out=replace)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=place))
        except OSError as exc:
            raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc
        # Said of a failure where an import was: it is still there, whole.
        earlier = replace and any(os.path.lexists(out / n) for n in IMPORT_FILES)
        kept = " (the earlier import there is as it was)" if earlier else ""
        try:
            try:
                with open(tmp / WORK_LOCK, "w") as owner:
                    _flock(owner.fileno())  # held: a later import leaves this directory be
                    mx.save_safetensors(
                        str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"}
                    )
                    (tmp / "config.json").write_text(json.dumps(config, indent=2))
                    _write_tokenizer(tmp, metadata, vocab_tokens)
                    if replace:
                        _move_in(tmp, out)
                        shutil.rmtree(tmp, ignore_errors=True)  # the earlier import's files
                    else:
                        # mkdtemp's directory is its owner's alone; the model is for
                        # whoever may read the place it goes (a container's user that
                        # did not build it).
                        tmp.chmod(0o777 & ~_umask())
                        (tmp / WORK_LOCK).unlink()
                        os.replace(tmp, out)
            except OSError as exc:
                raise OutputError(f"cannot write {out}: {exc.strerror or exc}{kept}") from exc
            except RuntimeError as exc:  # MLX's writer: "[write] Unable to write N bytes ..."
                why = str(exc).removeprefix("[write] ")
                raise OutputError(f"cannot write {out}: {why}{kept}") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


WORK_LOCK = "lock"  # in an import's work directory: held by the import while it runs


@contextmanager
def _place_locked(out: Path) -> Iterator[tuple[bool, bool]]:
    """Hold the lock of the place an import into `out` works in: (replace, locked).

    An import into an existing OUT works inside it and locks it; one into a new OUT
    works beside it and locks its parent. Imports into one OUT take turns: at once, the
    second one's rename over the first one's result failed and their moves into an
    existing OUT interleaved. `locked` is False where the file system has no flock
    (NFS takes only a write lock, and a directory opens only to read): no turns there.
    """
    while True:
        replace = out.is_dir()
        try:
            fd = os.open(out if replace else out.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            fd = -1
        if fd < 0:
            yield replace, False
            return
        try:
            locked = _flock(fd)
            # Unless the place to lock changed while this one waited (the import before
            # it made OUT): then that one.
            if not locked or out.is_dir() == replace:
                yield replace, locked
                return
        finally:
            os.close(fd)


def _flock(fd: int, *, wait: bool = True) -> bool:
    """Take an exclusive flock on `fd`; False if it is held (not waiting) or unsupported."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _remove_leftovers(place: Path, *, inside_out: bool) -> None:
    """Remove the work directories of imports that were killed, from where imports work.

    The caller holds the place's lock, so no import is starting there. A work directory
    whose lock can be taken is no running import's. Inside OUT every .import-* is an
    import's (OUT holds nothing else); beside OUT, one without the lock file may be
    someone else's, and stays.
    """
    try:
        found = [p for p in place.iterdir() if p.name.startswith(TMP_PREFIX)]
    except OSError:
        return
    for work in found:
        if work.is_symlink() or not work.is_dir():
            continue
        try:
            fd = os.open(work / WORK_LOCK, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            if inside_out:
                shutil.rmtree(work, ignore_errors=True)
            continue
        except OSError:
            continue
        try:
            # Not taken: a running import's (or a file system with no flock to tell).
            if _flock(fd, wait=False):
                shutil.rmtree(work, ignore_errors=True)
        finally:
            os.close(fd)


def _move_in(tmp: Path, out: Path) -> None:
    """Replace the import in `out` with the one written in `tmp`, or leave the earlier one.

    The earlier files go aside into `tmp` first, then the new ones in; a failure midway
    (a full disk) puts the earlier ones back. config.json goes aside first and in
    last: the server takes a directory holding one for a model, so a mix of two imports
    (one killed midway) never has one.
    """
    aside = tmp / "earlier"
    aside.mkdir()
    order = sorted(IMPORT_FILES, key=lambda n: n != "config.json")  # config.json first
    moved_aside: list[str] = []
    moved_in: list[str] = []
    try:
        for name in order:
            if os.path.lexists(out / name):
                os.replace(out / name, aside / name)
                moved_aside.append(name)
        for name in reversed(order):
            os.replace(tmp / name, out / name)
            moved_in.append(name)
    except BaseException as exc:
        # (A Ctrl-C stays one, whichever way the putting back went.)
        if not _put_back(out, aside, moved_aside, moved_in) and isinstance(exc, Exception):
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise OutputError(
                f"cannot write {out}: {why}, and the earlier import could not be put back: "
                "it has no config.json (not a model) until an import there succeeds"
            ) from exc
        raise


def _put_back(out: Path, aside: Path, moved_aside: list[str], moved_in: list[str]) -> bool:
    """Undo a part-done `_move_in`; False if the earlier import could not be put back."""
    whole = True
    for name in moved_in:
        if name not in moved_aside:  # new beside the earlier import: it goes
            try:
                (out / name).unlink()
            except FileNotFoundError:
                pass
            except OSError:
                whole = False
    # config.json last, and only onto the earlier import whole again.
    for name in sorted(moved_aside, key=lambda n: n == "config.json"):
        if name == "config.json" and not whole:
            break
        try:
            os.replace(aside / name, out / name)
        except OSError:
            whole = False
    return whole


# What an import writes: an existing directory holding only these is a model to replace.
IMPORT_FILES = frozenset(
    {
        "config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
)


def _check_out(out: Path) -> None:
    """Refuse an output path whose replacement would destroy anything but an import."""
    if not out.exists():
        return
    if not out.is_dir():
        raise GGUFError(f"{out}: exists and is not a directory; give a new directory")
    here = Path.cwd().resolve()
    if out.resolve() in (here, *here.parents):
        raise GGUFError(f"{out}: is the current directory (or holds it); give a new directory")
    # A .import-* directory is one a killed import left there.
    others = sorted(
        p.name
        for p in out.iterdir()
        if p.name not in IMPORT_FILES and not p.name.startswith(TMP_PREFIX)
    )
    if others:
        raise GGUFError(
            f"{out}: holds files an import does not write ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); give a new or an empty directory"
        )


def _write_tokenizer(out: Path, metadata: dict[str, Any], tokens: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    merges_raw = list(_meta(metadata, "tokenizer.ggml.merges"))
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    types = list(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    special = [tokens[i] for i, t in enumerate(types) if int(t) == CONTROL]
    tokenizer.add_special_tokens(special)
    try:
        tokenizer.save(str(out / "tokenizer.json"))
    except Exception as exc:  # tokenizers' own, for an OS error: "File too large (os error 27)"
        raise OSError(str(exc)) from exc

    def token(key: str) -> str | None:
        idx = metadata.get(key)
        return tokens[int(idx.item() if hasattr(idx, "item") else idx)] if idx is not None else None

    template = metadata.get("tokenizer.chat_template")
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "additional_special_tokens": special,
        "model_max_length": int(_meta(metadata, "llama.context_length", 2048)),
        "clean_up_tokenization_spaces": False,
    }
    if template:
        tok_config["chat_template"] = str(template)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: v for k, v in tok_config.items() if k.endswith("_token") and v})
    )
