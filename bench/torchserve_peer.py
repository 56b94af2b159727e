"""The second peer: TorchServe with its defaults, serving the same checkpoint as the LitServe reference.

A custom handler, as TorchServe's documentation writes one for a model it has no handler for:
it loads the checkpoint the documented way (``models.load_classifier`` + ``models.eval_transform``),
opens each raw JPEG body with PIL and answers the top 5, as the LitServe reference does. Every
setting is TorchServe's default (one worker per core, batch size 1) but what a benchmark on
loopback needs: the addresses, no token authorisation, and the Python of this environment.

TorchServe's frontend is Java: without ``java`` on the PATH (or without the ``torchserve``
package) the peer is skipped and the report says so.

This file is also the handler: ``torch-model-archiver --handler`` packs it into the archive,
and TorchServe's worker calls ``handle``.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

MODEL = "bench"


def unavailable() -> str | None:
    """Why TorchServe cannot run here (no Java, no ``torchserve``); None when it can."""
    if shutil.which("java") is None:
        return "no java on the PATH (TorchServe's frontend is Java)"
    if shutil.which("torchserve", path=str(Path(sys.executable).parent)) is None:
        return "the torchserve package is not installed (pip install -e '.[bench]')"
    return None


def archive(checkpoint: Path, store: Path) -> Path:
    """``store`` holding the model archive: this file as the handler, ``checkpoint`` beside it."""
    store.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "torch-model-archiver"), "--model-name", MODEL, "--version", "1.0",
                    "--handler", __file__, "--extra-files", str(checkpoint), "--export-path", str(store), "--force"],
                   check=True, capture_output=True, timeout=300)
    return store


def command(checkpoint: Path, port: int, management_port: int, metrics_port: int, folder: Path) -> list[str]:
    """The ``torchserve`` command (foreground) serving ``checkpoint`` on ``port``, its files in ``folder``."""
    store = archive(checkpoint, folder / "store")
    config = folder / "config.properties"
    config.write_text("\n".join([
        f"inference_address=http://127.0.0.1:{port}",
        f"management_address=http://127.0.0.1:{management_port}",
        f"metrics_address=http://127.0.0.1:{metrics_port}",
        f"model_store={store}",
        f"load_models={MODEL}.mar",
        f"python={sys.executable}",
        "disable_token_authorization=true",
        "",
    ]))
    return [str(Path(sys.executable).parent / "torchserve"), "--start", "--foreground", "--ncs",
            "--ts-config", str(config), "--log-config", str(_log_config(folder))]


def _log_config(folder: Path) -> Path:
    """log4j2 settings that keep TorchServe's access and model logs out of the measurement (its
    default writes a line per request to disk)."""
    path = folder / "log4j2.xml"
    path.write_text('<?xml version="1.0" encoding="UTF-8"?>\n<Configuration><Appenders>'
                    '<Console name="STDOUT" target="SYSTEM_OUT"><PatternLayout pattern="%d %-5p %m%n"/></Console>'
                    '</Appenders><Loggers><Root level="warn"><AppenderRef ref="STDOUT"/></Root></Loggers>'
                    '</Configuration>\n')
    return path


# --------------------------------------------------------------------------- the handler (in TorchServe's worker)


class _Handler:
    def __init__(self) -> None:
        self.ready = False

    def initialize(self, context: Any) -> None:
        from models import eval_transform, load_classifier  # noqa: PLC0415 - only in TorchServe's worker

        folder = Path(context.system_properties["model_dir"])
        checkpoint = next(folder.glob("*.safetensors"))
        self.model, self.meta = load_classifier(str(checkpoint))
        self.transform = eval_transform(self.meta)
        self.ready = True

    def handle(self, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import torch  # noqa: PLC0415
        from PIL import Image  # noqa: PLC0415

        batch = torch.stack([self.transform(Image.open(io.BytesIO(row.get("data") or row.get("body"))))
                             for row in data])
        with torch.inference_mode():
            probs = self.model(batch).softmax(-1)
        answers = []
        for row in probs:
            scores, indices = row.topk(min(5, row.shape[-1]))
            answers.append({"predictions": [{"label": self.meta.class_names[i], "index": int(i), "score": float(s)}
                                            for s, i in zip(scores.tolist(), indices.tolist())]})
        return answers


_service = _Handler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[dict[str, Any]] | None:
    """TorchServe's entry point: called once with no data to initialise, then once per batch."""
    if not _service.ready:
        _service.initialize(context)
    return None if data is None else _service.handle(data)
