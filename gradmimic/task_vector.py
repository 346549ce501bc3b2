"""Reference weights and the task vector ``T = W_ref - W_t`` (arXiv 2501.06708, Eq. 1).

The task vector points from the current weights to the reference's; a sample whose negative gradient aligns with
it moves the model towards the reference.  That only means something when both live in the same parameter space
(same architecture and, in practice, a shared initialisation or pretraining): we check names, shapes and dtypes
here, and report ``alignment`` each step (cosine of ``T`` with the mean negative gradient) so users can see it.
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

Reference = Union[str, os.PathLike, nn.Module, Mapping[str, torch.Tensor]]

_PREFIXES = ("module.", "_orig_mod.")


def load_state_dict(source: Union[str, os.PathLike, bytes], flat: bool = True,
                    name: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a torch checkpoint (a path or the file's bytes), never running code.

    The one loader for weights.  The format is read from the content, not the name: safetensors holds no code,
    and torch files are opened with ``weights_only=True``, which refuses any pickle that would build an object
    other than tensors and plain containers (``ValueError`` naming the file).  With ``flat`` (the default) the
    result is a mapping of tensors: a bare state dict, or one nested under ``state_dict`` / ``model``, with DDP /
    compile prefixes stripped; ``flat=False`` returns a torch file's object as loaded (an optimiser's state).
    ``name``: how errors call bytes (their URL, say).
    """
    import io

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name, head, size, opened = name or "<bytes>", data[:9], len(data), io.BytesIO(data)
    else:  # a path is read by the library itself (safetensors maps it), never copied into memory first
        name = os.fspath(source)
        if not os.path.exists(name):
            raise FileNotFoundError(f"weights file not found: {name}")
        with open(name, "rb") as f:
            head = f.read(9)
        size, opened = os.path.getsize(name), name
    if _is_safetensors(head, size):
        from safetensors.torch import load, load_file

        try:
            state = load(data) if isinstance(opened, io.BytesIO) else load_file(name, device="cpu")
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"{name}: not a readable safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(opened, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            import pickle

            why = ("it holds objects other than tensors, which only unpickling code could build"
                   if isinstance(exc, pickle.UnpicklingError) else
                   f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}")
            raise ValueError(f"{name}: refused: not a safetensors file nor a weights-only torch checkpoint "
                             f"({why})") from None
    if not flat:
        return state
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"{name}: expected a mapping of tensors, found {type(state).__name__}")
    out = {}
    for k, v in state.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        if isinstance(v, torch.Tensor):
            out[k] = v
    return out


def _is_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file (``head``: its first 9 bytes, ``size``: its length): an 8-byte little-endian header
    length, then that many bytes of a JSON object."""
    if size < 10 or len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def reference_tensors(
    reference: Reference, params: Mapping[str, torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """The reference's copy of each mimic parameter, validated and detached, on the parameter's device."""
    if isinstance(reference, (str, os.PathLike)):
        state = load_state_dict(reference)
    elif isinstance(reference, nn.Module):
        state = dict(reference.state_dict())
    elif isinstance(reference, Mapping):
        state = dict(reference)
    else:
        raise TypeError(f"reference must be a path, an nn.Module or a state dict, not {type(reference).__name__}")
    out = {}
    for name, p in params.items():
        if name not in state:
            raise KeyError(f"reference has no parameter {name!r} (it has {len(state)} tensors)")
        ref = state[name]
        if tuple(ref.shape) != tuple(p.shape):
            raise ValueError(
                f"reference parameter {name!r} has shape {tuple(ref.shape)} but the model's has {tuple(p.shape)}"
            )
        if ref.dtype != p.dtype:
            raise ValueError(f"reference parameter {name!r} has dtype {ref.dtype} but the model's has {p.dtype}")
        out[name] = ref.detach().to(p.device).clone()
    return out


def task_vectors(
    reference: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """``T = W_ref - W_t`` per parameter (detached)."""
    return {name: reference[name] - params[name].detach() for name in params}


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum(t.double().pow(2).sum() for t in tensors))
