"""The baseline measured beside vit-serve in every run: the peers' "naive" server (FastAPI, no batching, the model
called in the thread pool), doing the benchmark's per-image work with the same decode and preprocessing.

    PORT=8101 MODEL=tiny python bench/naive_server.py WORK_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from torchvision.models import ViT_B_16_Weights

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.limit import forward_top5, prepare
from bench.workload import model

LABELS = ViT_B_16_Weights.IMAGENET1K_V1.meta["categories"]
MODULE = model(os.environ.get("MODEL", "tiny"))
app = FastAPI()


def infer(data: bytes) -> dict[str, object]:
    top5 = forward_top5(MODULE, prepare(data)[None])[0]
    return {"top5": [{"index": i, "label": LABELS[i]} for i in top5]}


@app.post("/predict")
async def predict(request: Request) -> dict[str, object]:
    return await run_in_threadpool(infer, await request.body())


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8101")), log_level="warning", access_log=False)
