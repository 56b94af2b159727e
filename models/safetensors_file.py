"""How headswap opens a ``.safetensors`` file: through the safetensors library, without torch.

The library checks the whole header before it hands out a tensor (its size, the JSON, every
dtype, shape and offset, and that the tensors cover the data exactly) and memory-maps the
file. One check is kept on top: headswap holds only the dtypes of ``SAFETENSORS_DTYPES``.
``models/checkpoint.py`` reads tensors through ``open_safetensors`` (framework "pt"),
``models/summary.py`` a header (framework "numpy": no torch).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from safetensors import SafetensorError, safe_open

from models.errors import CheckpointError
from models.meta import cannot_read, read_checkpoint_file

# The dtypes headswap reads and writes, with torch's name for each (the name the version
# hashes, so that ``inspect`` computes it without torch). The library knows more (float8,
# unsigned 16-64 bits, complex64, packed float4/float6); a file that holds one is refused, as
# the hand-written reader did: a classifier's weights are none of these, and each one added
# here needs its torch name and a test that both readers give the same version.
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """Whether the file at ``path`` starts like a safetensors file rather than a ``torch.save`` one.

    Reads its first bytes only; raises CheckpointError naming it when unreadable.
    """
    # torch.save writes a zip (PK\x03\x04) or legacy pickle (\x80); safetensors starts with a
    # u64 length followed by '{'.
    head = read_checkpoint_file(path, 10)
    return len(head) > 9 and head[8:9] == b"{"


@contextmanager
def open_safetensors(where: str, path: str | os.PathLike[str], framework: str) -> Iterator[Any]:
    """``safetensors.safe_open(path, framework)`` once the header and the dtypes are checked.

    Raises CheckpointError, also for what the ``with`` block meets: "cannot read" (OSError),
    "corrupt safetensors file" (the library refuses the header), "unsupported safetensors dtype".
    """
    try:
        with safe_open(path, framework=framework) as f:
            for name in f.keys():  # noqa: SIM118 -- safe_open is no mapping
                code = f.get_slice(name).get_dtype()
                if code not in SAFETENSORS_DTYPES:
                    raise CheckpointError(
                        where, f"unsupported safetensors dtype: tensor {name!r} is {code}, expected one of "
                        f"{', '.join(SAFETENSORS_DTYPES)}"
                    )
            yield f
    except SafetensorError as exc:
        raise CheckpointError(where, f"corrupt safetensors file: {exc}") from None
    except OSError as exc:
        raise cannot_read(where, exc) from None
