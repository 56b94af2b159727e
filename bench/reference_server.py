"""The peer headswap must beat: the server a user writes from LitServe's documentation.

A plain ``LitAPI`` with LitServe's defaults (one worker, ``max_batch_size=1``, the default
timeout, no tuning of threads or memory format). It serves the same checkpoint with the
same preprocessing, loaded the documented way (``models.load_classifier`` +
``models.eval_transform``). LitServe hands ``decode_request`` the parsed JSON body, so it takes
``{"image": "<base64 JPEG>"}`` and decodes with PIL, as its examples do.

Run: ``python -m bench.reference_server --checkpoint CKPT --port PORT`` (ready when /health is 200).
"""

from __future__ import annotations

import argparse
import base64
import io
from typing import Any

import litserve as ls
import torch
from PIL import Image

from models import eval_transform, load_classifier


class ReferenceAPI(ls.LitAPI):
    def __init__(self, checkpoint: str, max_batch_size: int = 1) -> None:
        super().__init__(max_batch_size=max_batch_size)
        self.checkpoint = checkpoint

    def setup(self, device: str) -> None:
        self.model, self.meta = load_classifier(self.checkpoint)
        self.model.to(device)
        self.device = device
        self.transform = eval_transform(self.meta)

    # No annotation on ``request``, as in LitServe's docs: LitServe reads it to choose the body's
    # type, and an unannotated one gets ``request.json()``.
    def decode_request(self, request):  # noqa: ANN001
        image = Image.open(io.BytesIO(base64.b64decode(request["image"])))
        return self.transform(image)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.unsqueeze(0) if x.ndim == 3 else x  # LitServe stacks tensors when batching
        with torch.inference_mode():
            probs = self.model(batch.to(self.device)).softmax(-1).cpu()
        return probs[0] if x.ndim == 3 else probs

    def encode_response(self, output: torch.Tensor) -> dict[str, Any]:
        scores, indices = output.topk(min(5, output.shape[-1]))
        return {"predictions": [{"label": self.meta.class_names[i], "index": int(i), "score": float(s)}
                                for s, i in zip(scores.tolist(), indices.tolist())]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=1)
    args = parser.parse_args()
    server = ls.LitServer(ReferenceAPI(args.checkpoint, args.max_batch_size), accelerator="auto")
    # generate_client_file=False only keeps LitServe from writing client.py into the working directory.
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
